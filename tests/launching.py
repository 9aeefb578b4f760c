"""Launching starlora in 2 processes, for the multi-process tests: `test_distributed.py`
(DDP under ``torchrun``) and `test_zero3.py` (DeepSpeed ZeRO-3 under ``accelerate launch``).

Every launch runs on the CPU with one thread per process and is compared with
``python -m starlora ...`` in one process (also one thread: the thread count may change the
last bits of a float sum). The shared fixtures (`scoring_inputs`, `tiny_runs`) are in
``conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlora.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                    os.environ.get("PYTHONPATH")])))
ONE = [sys.executable, "-m", "starlora"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
       "-m", "starlora"]
#: DeepSpeed ZeRO-3 through the shipped accelerate config, 2 processes on the CPU (gloo), fp32;
#: port 0: accelerate picks a free port for each launch, where every launch of the suite used
#: to share its default, 29500 (the likely cause of one CI failure whose output was lost)
ZERO3 = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
         str(ROOT / "configs" / "accelerate" / "deepspeed-zero3.yaml"), "--num_processes", "2",
         "--mixed_precision", "no", "--main_process_port", "0", "-m", "starlora"]
#: 2-process run vs 1 process (configs/tiny.yaml): the processes draw other LoRA dropout masks
#: in training (each for its share of a batch), so the adapters differ a little; with
#: lora.dropout 0 they agree to ~1e-5 (float sums in another order). Final training loss:
#: relative 2e-3 (measured 1.7e-4 and 3.1e-4); accuracy: one test example of 12; ECE: 0.05.
LOSS_RTOL, ACCURACY_ATOL, ECE_ATOL = 2e-3, 1 / 12, 0.05
#: the runs compared across process counts score STAR's base term on the base model's own
#: answers (``own``, the default until 2026-12-05): at round 0, λ = 0.9 weighs the base term
#: 9 to 1, and the adapted model's answers, which today's default scores there, follow the
#: processes' other dropout masks on this random tiny model (measured: one id of 8 swapped
#: with 2 processes and under ZeRO-3), so the selection would compare that noise, not how
#: the processes gather their scores
OWN_BASE = ["--set", "scoring.base_scores=own"]


def made_once(factory: Any, name: str, make: Callable[[Path], None]) -> Path:
    """A folder that ``make(folder)`` fills once per test session, however often the fixture
    asking for it is set up (an xdist worker may be sent a module's tests in chunks, and pytest
    then tears the module's fixtures down in between) and whichever worker asks first: under
    xdist the folder lives beside the workers' base temp dirs (this session's), made under a
    file lock. For folders the tests only read."""
    from filelock import FileLock

    base = factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"once-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            (folder / ".made").touch()
    return folder


def run(cmd: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `cmd` with `ENV` (and `env`) to the end; it must succeed. Returns what it printed."""
    proc = subprocess.run(cmd, env=dict(ENV, **env), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


#: trains one adapter (9 examples, batches of 4: the last holds one; 2 epochs, gradient
#: accumulation 2; no dropout, so both sides compute the same function) and saves what it got
TRAIN = """
import sys, torch
from starlora import distributed as dist
from starlora.config import LoraConfig, TrainingConfig
from starlora.models import load_model
from starlora.tasks import get_task
from starlora.training import train_adapter
from starlora import zero3
loaded = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
examples = get_task("arith").generate("train", 9, 0)
training = TrainingConfig(lr=1e-3, epochs=2, batch_size=4, grad_accum=2, mixed_precision="no")
result = train_adapter(loaded.model, loaded.tokenizer, get_task("arith"), examples, training,
                       LoraConfig(r=4, alpha=8, dropout=0.0), seed=1, progress=False)
lora = [(n, p) for n, p in result.model.named_parameters() if "lora" in n]
with zero3.gathered(p for _, p in lora):  # whole weights under ZeRO-3 (else a no-op)
    lora = {n: p.detach().clone() for n, p in lora}
held, whole = zero3.held_elements(result.model)
if dist.is_main():
    torch.save({"lora": lora, "held": held / whole,
                "steps": result.steps, "lrs": result.lrs, "losses": result.losses,
                "tokens": result.train_tokens}, sys.argv[1])
if dist.world_size() > 1:  # as the command line ends a launched process (`dist.leave`)
    dist.teardown()
    dist.leave(0)
"""


#: every process of a lockstep launch (`starlora.zero3.lockstep`, forced here on gloo) must
#: run as many passes: a cache that holds rank 0's share only, and a pair cut to max_length on
#: rank 1 only; writes, per rank, the positions each `make`/`forward` call computed
LOCKSTEP = """
import json, sys
from pathlib import Path
import numpy as np
from starlora import distributed as dist, zero3
zero3.enabled = lambda: True  # what is checked is each process's count of passes
from starlora.models import load_model
from starlora.scoring.cache import BaseScoreCache
from starlora.scoring.own_answers import _first_pass
from starlora.tasks import get_task
dist.setup(cpu=True)
rank, folder = dist.rank(), Path(sys.argv[1])
cache = BaseScoreCache(folder / "cache", {"test": 1}, chunk_size=2)
made = []
def make(positions):
    made.append(list(positions))
    return [{"by": rank} for _ in positions]
share = [["a", "b", "c"], ["d", "e", "e"]][rank]  # rank 1's last item: padding, a repeat
found = cache.records(share, make)
loaded = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
task = get_task("arith")
examples = task.generate("train", 2, rank)
answers = [[5, 6], [5] * (300 if rank else 2)]  # rank 1's second pair is cut to 64 tokens
passes = []
def forward(chunk, given):
    passes.append(len(chunk))
    return type("S", (), {"pe": np.zeros(len(chunk)), "me": np.zeros(len(chunk))})()
pe, _, _ = _first_pass(loaded.model, loaded.tokenizer, task, examples, answers,
                       (np.ones(2), np.ones(2)), 64, forward)
(folder / f"rank{rank}.json").write_text(json.dumps(
    {"made": made, "found": [r["by"] for r in found], "passes": passes, "pe": pe.tolist()}))
dist.teardown()
dist.leave(0)
"""


def trained(tmp_path: Path, launcher: list[str]) -> tuple[dict, dict]:
    """What `TRAIN` saved when run by one process and by `launcher` (2 processes)."""
    import torch

    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    run([sys.executable, str(script), str(tmp_path / "one.pt")])
    run([*launcher[:-2], str(script), str(tmp_path / "two.pt")])
    one, two = (torch.load(tmp_path / f"{n}.pt") for n in ("one", "two"))
    return one, two


def sampled_batches(monkeypatch) -> list[int]:
    """A list that collects the prompt rows of every sampled batch (temperature > 0) that
    `starlora.generation.generate` decodes from now on."""
    import starlora.generation as generation

    rows: list[int] = []
    real = generation.decode

    def counted(model, ids, *args, **kwargs):
        if kwargs.get("temperature", 0) > 0:
            rows.append(ids.shape[0])
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(generation, "decode", counted)
    return rows


def two_processes_in_one(fn, items, lengths, to="main"):
    """`starlora.distributed.map_shards` as two processes would compute it, in one: each
    share of `plan` handed to `fn` in turn, the results merged as `gather` merges them (for
    monkeypatching ``map_shards``)."""
    from starlora import distributed as dist

    costs = lengths() if callable(lengths) else lengths
    parts = []
    for r in range(2):
        share = dist.plan(costs, 2, r)
        got = fn([items[i] for i in share.indices])
        parts.append(list(zip(share.real, got[:share.n_real])))
    return dist.merge(parts, len(items))


def files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


def written_by(launchers: list[list[str]], finished: Path, tmp_path: Path, command: str,
               output: str, said: str) -> list[bytes]:
    """`command` run by each of `launchers` on a copy of the `finished` run without its
    `output` file: the bytes each wrote to `output` (the main process alone says `said`)."""
    written = []
    for n, launcher in enumerate(launchers):
        run_dir = tmp_path / f"launcher{n}"
        shutil.copytree(finished, run_dir)
        (run_dir / output).unlink(missing_ok=True)
        proc = run([*launcher, command, str(run_dir)])
        assert proc.stdout.count(said) == 1
        written.append((run_dir / output).read_bytes())
    return written


def outputs(run_dir: Path) -> dict:
    """What a resumed run must reproduce exactly (times left out)."""
    out = {name: read_jsonl(run_dir / name) for name in ("labelled.jsonl",)}
    out["metrics"] = [{k: r[k] for k in ("round", "n_labelled", "accuracy", "ece")}
                      for r in read_jsonl(run_dir / "metrics.jsonl")]
    for k in (0, 1):
        for name in ("scores.jsonl", "selected.jsonl", "predictions.jsonl"):
            path = run_dir / "rounds" / str(k) / name
            out[f"{k}/{name}"] = read_jsonl(path) if path.is_file() else None
        out[f"{k}/loss"] = json.loads((run_dir / f"rounds/{k}/train.json").read_text())["final_loss"]
    return out


def launch_and_kill(cmd: list[str], run_dir: Path, point, victim: str, **env: str) -> None:
    """Start `cmd`, wait until state.json satisfies `point`, then SIGKILL the launcher or
    one of its workers (`victim`: "launcher" or "worker")."""
    import psutil

    log = run_dir.with_name(run_dir.name + ".launch.log")  # what it printed, for the message
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=dict(ENV, **env), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, (f"the run ended (exit {proc.returncode}) before the "
                                         f"kill point:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                if point(json.loads((run_dir / "state.json").read_text())):
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("kill point not reached")
        if victim == "worker":
            workers = psutil.Process(proc.pid).children()
            assert len(workers) == 2
            workers[-1].send_signal(signal.SIGKILL)
            proc.wait(timeout=120)  # the launcher stops the other worker and exits
            assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # the workers follow their launcher (`starlora.distributed.follow_launcher`)
            gone, alive = psutil.wait_procs(children, timeout=30)
            assert not alive, f"workers outlived their launcher: {alive}"
