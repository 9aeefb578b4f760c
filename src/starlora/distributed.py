"""Many processes: who this process is, its share of a list, and gathering the results.

starlora scales out by running the same command in N processes (``torchrun --nproc-per-node
N -m starlora ...`` or ``accelerate launch -m starlora ...``; the launcher sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``). This module is the one place that knows about the
process group:

* `world_size`, `rank`, `is_main`: from the launcher's environment (or an initialised
  ``torch.distributed``); one process when neither says otherwise;
* `setup`: joins the process group through accelerate's ``PartialState`` (gloo on the CPU,
  NCCL on GPUs, each process on GPU ``LOCAL_RANK``); the collectives below call it lazily;
* `teardown`: leaves every group when a command is done (`starlora.cli.main` calls it),
  and `leave` ends the process then, skipping the interpreter's teardown;
* `shard` / `plan`: this process's share of N items in length-sorted snake order, so every
  share costs about the same, padded to equal sizes with copies of its own shortest item;
* `gather` / `map_shards`: the per-item results of every share back in the original order,
  on the main process (or all), padding dropped; `map_groups`: shares of whole groups;
* `agree`, `on_main`, `barrier`: the main process decides, reads or writes; the others
  follow, and an error on the main process is raised on every process.

With one process every function is a no-op or calls its function directly: no process group
is needed, nothing is tokenised for sharding, nothing is copied. Python objects travel
through a gloo group (the default group on the CPU, a side group next to NCCL), so large
results never occupy GPU memory.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar

import numpy as np

from starlora.errors import StarloraError

T = TypeVar("T")
_OBJECT_GROUP: Any = None  # the gloo group for Python objects (None: the default group)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the run: 1 unless a launcher (``WORLD_SIZE``) or an initialised
    ``torch.distributed`` says more."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's index in [0, world_size()); 0 with one process."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return _env_int("RANK", 0) if world_size() > 1 else 0


def local_rank() -> int:
    """This process's index on its machine (its GPU); 0 with one process."""
    return _env_int("LOCAL_RANK", 0) if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this is the main process, the one that writes files and prints."""
    return rank() == 0


def follow_launcher() -> None:
    """Under torchrun (or ``accelerate launch``, which runs it), ask Linux to SIGKILL this
    process when its launcher dies: torchrun starts workers in their own session, so a
    launcher killed by SIGKILL would otherwise leave them running, and a rerun of the command
    would race them for the run directory. No-op elsewhere."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def setup(cpu: bool | None = None) -> None:
    """Join the launcher's process group (once; no-op with one process or when joined).

    `cpu`: use gloo and keep every process on the CPU; None: when no CUDA GPU is visible.
    On GPUs each process takes GPU ``LOCAL_RANK`` (so a model on device "auto" or "cuda"
    lands on its own GPU).
    """
    if world_size() == 1 or _initialized():
        return
    import torch
    from accelerate import PartialState

    follow_launcher()
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if launched_with_deepspeed():  # DeepSpeed sets up its group (gloo on the CPU)
        PartialState()
        joined = torch.distributed.get_world_size()  # accelerate says 1 on the CPU
    else:
        joined = PartialState(cpu=cpu).num_processes
    if joined != world_size():
        raise StarloraError(f"distributed: WORLD_SIZE is {world_size()} but accelerate set up "
                            f"{joined} process(es)")


def teardown() -> None:
    """Leave the process group (every group, the object group too) at the end of a command.

    Every process calls it once its work is done. Without it a process can exit with gloo's
    threads still running and abort at exit ("terminate called without an active exception"),
    which fails the launch although the command's work was done. No-op with one process.
    """
    global _OBJECT_GROUP
    if not _initialized():
        return
    import torch.distributed as dist

    dist.destroy_process_group()
    _OBJECT_GROUP = None


def leave(code: int) -> NoReturn:
    """End this process of a multi-process launch with exit status `code`, now: stdout and
    stderr flushed, logging shut down, then ``os._exit``, which skips the interpreter's
    teardown. `teardown` leaves every process group, but a group lives on while anything
    refers to it, and DeepSpeed's ZeRO-3 engine and partitioned parameters do (each
    parameter's ``ds_process_group``): their gloo threads were then destroyed during the
    interpreter's exit, where one could abort the process ("terminate called without an
    active exception", SIGABRT) after its work was done and written (3 of 7 ZeRO-3 launches
    that trained, on 2 CPU processes; none of 8 since). Everything starlora writes is written and closed by
    then (atomic writes, `starlora.io`); nothing of it waits for ``atexit``."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to say
            pass
    logging.shutdown()
    os._exit(code)


def launched_with_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (its environment variable
    ``ACCELERATE_USE_DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1")


def _group() -> Any:
    """The group that carries Python objects: gloo, so pickles stay in host memory."""
    global _OBJECT_GROUP
    setup()
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if _OBJECT_GROUP is None:
        _OBJECT_GROUP = dist.new_group(backend="gloo")
    return _OBJECT_GROUP


def barrier() -> None:
    """Wait until every process gets here (no-op with one process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier(group=_group())


def broadcast(obj: T) -> T:
    """The main process's `obj` on every process (others pass anything, e.g. None)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_group())
    return box[0]


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process; every process calls it (one process: `flag`)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    box = torch.tensor([int(flag)])
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_group())
    return bool(box.item())


def agree(fn: Callable[[], T]) -> T:
    """``fn()`` computed on the main process only, its value on every process: for decisions
    read from files the main process writes (every process then takes the same branch)."""
    return broadcast(fn() if is_main() else None)


def raised_on_main(error: BaseException) -> bool:
    """Whether `error` was raised on the main process and handed to this one (`on_main`):
    the main process reports it, the others need not repeat it."""
    return getattr(error, "_starlora_from_main", False)


def _portable(error: Exception) -> Exception:
    """`error` if it survives pickling, else a plain StarloraError/RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable exception: keep its message
        text = f"{type(error).__name__}: {error}"
        if isinstance(error, StarloraError):
            copy = StarloraError(str(error))
            copy.exit_code = error.exit_code
            return copy
        return RuntimeError(f"on the main process: {text}")


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on the main process only (writes, main-only phases); every process returns
    its value, and if it raised, every process raises it (the others a copy, which
    `raised_on_main` marks). One process: ``fn()``."""
    if world_size() == 1:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as e:  # handed to the others, then raised here as it is
            broadcast(("error", _portable(e)))
            raise
    kind, value = broadcast(outcome)
    if kind == "error":
        value._starlora_from_main = True
        raise value
    return value


@dataclass(frozen=True)
class Shard:
    """One process's share of N items.

    `indices`: positions in the full list, longest item first, `n_real` real ones followed
    by padding (copies of the share's last real item, or of item 0 for an empty share) so
    that every share has ``ceil(N / world)`` items; `total`: N.
    """

    indices: list[int]
    n_real: int
    total: int

    @property
    def real(self) -> list[int]:
        return self.indices[: self.n_real]


def plan(lengths: Sequence[int], world: int, rank_: int) -> Shard:
    """Share `rank_` of `world` for items of cost `lengths` [N] (tokens): items sorted by
    length, longest first, dealt in snake order (0, 1, .., W-1, W-1, .., 0, 0, 1, ..), so the
    shares' total lengths differ by less than one item's length per row of W items; then
    padded to ``ceil(N / W)`` items."""
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} of {world} processes")
    n = len(lengths)
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    pos = np.arange(n)
    row, col = pos // world, pos % world
    owner = np.where(row % 2 == 0, col, world - 1 - col)
    mine = [int(i) for i in order[owner == rank_]]
    size = math.ceil(n / world)
    filler = mine[-1] if mine else 0
    padding = [filler] * (size - len(mine)) if n else []
    return Shard(mine + padding, len(mine), n)


def shard(lengths: Sequence[int]) -> Shard:
    """This process's `plan` (every item, in the original order, with one process)."""
    if world_size() == 1:
        return Shard(list(range(len(lengths))), len(lengths), len(lengths))
    return plan(lengths, world_size(), rank())


def gather(results: Sequence[T], share: Shard, *,
           to: Literal["main", "all"] = "main") -> list[T] | None:
    """Every share's `results` (one per ``share.indices`` entry, padding included) as one
    list of ``share.total`` in the original order, padding dropped: on the main process, or
    on every process with ``to="all"``; None on the others."""
    if len(results) != len(share.indices):
        raise ValueError(f"{len(results)} results for a share of {len(share.indices)} items")
    pairs = list(zip(share.real, results[: share.n_real]))
    if world_size() == 1:
        parts = [pairs]
    else:
        import torch.distributed as dist

        if to == "all":
            parts = [None] * world_size()
            dist.all_gather_object(parts, pairs, group=_group())
        else:
            parts = [None] * world_size() if is_main() else None
            dist.gather_object(pairs, parts, dst=0, group=_group())
            if not is_main():
                return None
    return merge(parts, share.total)


def merge(parts: Sequence[Sequence[tuple[int, T]]], total: int) -> list[T]:
    """Every process's ``(index, result)`` pairs (padding already left out) as one list of
    `total` results in index order; every index must come exactly once."""
    out: list[Any] = [None] * total
    seen = [False] * total
    for part in parts:
        for i, value in part:
            if seen[i]:
                raise RuntimeError(f"gather: item {i} came twice")
            out[i], seen[i] = value, True
    if not all(seen):
        raise RuntimeError(f"gather: {seen.count(False)} of {total} items came from no process")
    return out


def map_shards(fn: Callable[[list[T]], Sequence[Any]], items: Sequence[T],
               lengths: Sequence[int] | Callable[[], Sequence[int]], *,
               to: Literal["main", "all"] = "main") -> list[Any] | None:
    """``fn(items)`` computed in shares: each process calls `fn` on its share (a list, one
    result per item), and the results come back in the order of `items` on the main process
    (every process with ``to="all"``; None on the others). `lengths`: each item's cost
    (tokens), or a function that gives them; with one process it is never called and `fn`
    gets `items` as they are."""
    if world_size() == 1:
        return list(fn(list(items)))
    share = shard(lengths() if callable(lengths) else lengths)
    results = fn([items[i] for i in share.indices])
    return gather(list(results), share, to=to)


def map_groups(fn: Callable[[list[T], list[int] | None], Sequence[Any]], items: Sequence[T],
               lengths: Sequence[int] | Callable[[], Sequence[int]], size: int, *,
               to: Literal["main", "all"] = "main") -> list[Any] | None:
    """``fn(items, labels)`` computed in shares of whole groups, so that a batch made of one
    group is the same batch with any number of processes: `items`, longest first (`lengths`,
    or a function that gives them; ties in their order), are cut into groups of `size` before
    any process takes a share; a process takes whole groups (`map_shards` over groups) and
    calls `fn` on their items with each item's group label [len(share)] (a batch of
    `starlora.generation.generate`'s ``groups``). With `size` 1 there are no groups to keep:
    `map_shards`, with ``labels=None``. Results in the order of `items` on the main process
    (every process with ``to="all"``), None on the others."""
    if size <= 1:
        return map_shards(lambda share: fn(share, None), items, lengths, to=to)
    cost = lengths() if callable(lengths) else lengths
    order = sorted(range(len(items)), key=lambda i: (-cost[i], i))
    groups = [order[s : s + size] for s in range(0, len(order), size)]

    def share_groups(share: list[list[int]]) -> list[list[Any]]:
        results = list(fn([items[i] for g in share for i in g],
                          [n for n, g in enumerate(share) for _ in g]))
        cuts = np.cumsum([0, *map(len, share)])
        return [results[a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    per_group = map_shards(share_groups, groups,
                           lambda: [sum(cost[i] for i in g) for g in groups], to=to)
    if per_group is None:
        return None
    out: list[Any] = [None] * len(items)
    for g, results in zip(groups, per_group):
        for i, result in zip(g, results):
            out[i] = result
    return out
