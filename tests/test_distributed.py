"""Many processes: shares and gathering (in-process), then the real thing, 2 processes on gloo
under ``torchrun --standalone --nproc-per-node 2 -m starlora ...`` (`launching.TWO`), compared
with one process. DeepSpeed ZeRO-3 is in `test_zero3.py`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from launching import (
    ACCURACY_ATOL,
    ECE_ATOL,
    ENV,
    LOCKSTEP,
    LOSS_RTOL,
    ONE,
    OWN_BASE,
    ROOT,
    TINY,
    TWO,
    files,
    launch_and_kill,
    outputs,
    run,
    trained,
    two_processes_in_one,
    written_by,
)

from starlora import distributed as dist
from starlora.io import read_jsonl
from starlora.train_batches import LengthGroupedBatches, ShareOfEachBatch


# -- shares and gathering, in one process ------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 11, 12])
def test_shares_cover_every_item_once_and_are_padded_to_one_size(world: int, n: int) -> None:
    lengths = [(7 * i) % 13 + 1 for i in range(n)]
    shares = [dist.plan(lengths, world, r) for r in range(world)]
    real = sorted(i for s in shares for i in s.real)
    assert real == list(range(n))
    size = math.ceil(n / world)
    for s in shares:
        assert len(s.indices) == size and s.total == n
        # padding: copies of its own items (an empty share copies item 0)
        assert all(i in (s.real or [0]) for i in s.indices[s.n_real:])
    if n >= world:  # snake order: totals differ by less than the longest item
        totals = [sum(lengths[i] for i in s.real) for s in shares]
        assert max(totals) - min(totals) <= max(lengths)
    # gathering drops the padding and restores the order
    parts = [[(i, f"r{i}") for i in s.real] for s in shares]
    assert dist.merge(parts, n) == [f"r{i}" for i in range(n)]


def test_merge_refuses_a_missing_or_doubled_item() -> None:
    with pytest.raises(RuntimeError, match="came twice"):
        dist.merge([[(0, "a")], [(0, "a"), (1, "b")]], 2)
    with pytest.raises(RuntimeError, match="1 of 2 items"):
        dist.merge([[(1, "b")]], 2)


def test_one_process_is_a_plain_call() -> None:
    assert dist.world_size() == 1 and dist.is_main() and dist.rank() == 0
    calls = []

    def fn(items: list[str]) -> list[str]:
        calls.append(list(items))
        return [s.upper() for s in items]

    def lengths() -> list[int]:
        raise AssertionError("one process needs no lengths")

    assert dist.map_shards(fn, ["b", "a", "c"], lengths) == ["B", "A", "C"]
    assert calls == [["b", "a", "c"]]
    assert dist.agree(lambda: 3) == 3 and dist.on_main(lambda: "x") == "x"
    with pytest.raises(ValueError, match="boom"):
        dist.on_main(lambda: (_ for _ in ()).throw(ValueError("boom")))
    dist.barrier()
    dist.setup()  # nothing to join


def test_teardown_leaves_every_group_and_is_a_no_op_without_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end of every command: the default group and the object group are destroyed."""
    import torch.distributed as torch_dist

    dist.teardown()  # nothing joined: nothing to do
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                  rank=0, world_size=1)
    try:
        # the object group, as `_group` makes it on an NCCL default group
        monkeypatch.setattr(dist, "_OBJECT_GROUP", torch_dist.new_group(backend="gloo"))
        dist.teardown()
        assert not torch_dist.is_initialized() and dist._OBJECT_GROUP is None
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def test_a_launched_process_ends_without_the_interpreters_teardown(tmp_path: Path) -> None:
    """A process of a launch (``WORLD_SIZE`` > 1) ends through `dist.leave` once its command
    is done: its exit status and what it printed (piped, so buffered) come through, and
    nothing registered with ``atexit`` runs, as nothing does in the interpreter's teardown,
    where DeepSpeed's gloo threads could abort a finished process (SIGABRT). One process
    ends as any program does."""
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "atexit.register(lambda: open(os.environ['MARK'], 'w').close())\n")
    for world in ("1", "2"):
        mark = tmp_path / f"atexit-{world}"
        env = dict(ENV, WORLD_SIZE=world, RANK="0", MARK=str(mark),
                   PYTHONPATH=os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]]))
        proc = subprocess.run([sys.executable, "-m", "starlora", "version"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("starlora ")
        assert mark.exists() == (world == "1")
    bad = subprocess.run([sys.executable, "-m", "starlora", "status", str(tmp_path / "nowhere")],
                         env=dict(ENV, WORLD_SIZE="2", RANK="0"), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "starlora: error" in bad.stderr


def test_map_groups_deals_whole_groups_cut_before_the_shares(monkeypatch) -> None:
    """Items, longest first, are cut into groups of `size` once; every process (two,
    simulated: `map_shards` hands each share of `plan` to the function in turn) gets whole
    groups with their labels, and the results come back in the items' order."""
    lengths = [3, 9, 4, 4, 8, 1, 6, 2, 5]
    items = [f"x{i}" for i in range(len(lengths))]
    seen: list[list[list[str]]] = []

    def fn(share: list[str], labels: list[int]) -> list[str]:
        groups: dict[int, list[str]] = {}
        for item, label in zip(share, labels):
            groups.setdefault(label, []).append(item)
        seen.append(list(groups.values()))
        return [item.upper() for item in share]

    whole = [["x1", "x4", "x6"], ["x8", "x2", "x3"], ["x0", "x7", "x5"]]  # 9 8 6 | 5 4 4 | 3 2 1
    assert dist.map_groups(fn, items, lengths, 3) == [i.upper() for i in items]
    assert seen == [whole]

    monkeypatch.setattr(dist, "map_shards", two_processes_in_one)
    seen.clear()
    assert dist.map_groups(fn, items, lengths, 3) == [i.upper() for i in items]
    dealt = [g for share in seen for g in share]  # 2 groups a process: one a padding copy
    assert len(seen) == 2 and len(dealt) == 4
    assert all(g in whole for g in dealt) and all(g in dealt for g in whole)

    # size 1: no groups to keep; each process scores its share as `map_shards` deals it, and
    # the lengths are asked for only there (never with one process)
    calls: list[tuple[list[str], object]] = []
    monkeypatch.undo()
    assert dist.map_groups(lambda share, labels: calls.append((share, labels)) or share,
                           items, lambda: pytest.fail("lengths asked for"), 1) == items
    assert calls == [(items, None)]


def test_each_process_takes_a_share_of_every_batch() -> None:
    lengths = [3, 9, 4, 4, 8, 1, 6, 2, 5]  # 9 examples, batches of 4: the last holds one
    batches = LengthGroupedBatches(lengths, 4, seed=0)
    whole = batches.batches(0)
    shares = [list(ShareOfEachBatch(LengthGroupedBatches(lengths, 4, seed=0), r, 2, 100))
              for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(whole) == 3
    for b, batch in enumerate(whole):
        got = [i for r in range(2) for i in shares[r][b] if i < 100]
        assert sorted(got) == sorted(batch)
    (b,) = [b for b, batch in enumerate(whole) if len(batch) == 1]
    # one example: one process takes it, the other a stand-in for it (no answer tokens)
    assert sorted([shares[0][b], shares[1][b]]) == [whole[b], [100 + whole[b][0]]]


# -- 2 processes on gloo -----------------------------------------------------------------------
@pytest.mark.slow  # two torchrun launches (~10 s); CI runs the full suite
@pytest.mark.parametrize("passes", [1, 3])
def test_score_gives_the_same_lines_with_one_and_two_processes(
    scoring_inputs: tuple[Path, Path], tmp_path: Path, passes: int
) -> None:
    data, adapter = scoring_inputs
    args = ["score", "--model", "tiny-llama", "--adapter", str(adapter), "--task", "arith",
            "--data", str(data), "--max-new-tokens", "8", "--samples", "2",
            "--mc-passes", str(passes), "--device", "cpu"]
    run([*ONE, *args, "--out", str(tmp_path / "one.jsonl")])
    run([*TWO, *args, "--out", str(tmp_path / "two.jsonl")])
    one, two = (tmp_path / "one.jsonl").read_text(), (tmp_path / "two.jsonl").read_text()
    assert len(one.splitlines()) == 11 and one == two


@pytest.mark.slow  # two torchrun launches (~10 s); CI runs the full suite
def test_bf16_greedy_scores_are_the_same_with_one_and_two_processes(
    scoring_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """In bf16 an answer's bits depend on its batch-mates unless its shapes are fixed, and a
    process's share gives each item other batch-mates than one process does. Greedy decoding
    below fp32 fixes the shapes (`starlora.generation`), and with one pass the scores are the
    generation's own measurement: the same bytes with 1 and 2 processes."""
    data, adapter = scoring_inputs
    args = ["score", "--model", "tiny-llama", "--adapter", str(adapter), "--task", "arith",
            "--data", str(data), "--max-new-tokens", "8", "--dtype", "bfloat16",
            "--device", "cpu"]
    run([*ONE, *args, "--out", str(tmp_path / "one.jsonl")])
    run([*TWO, *args, "--out", str(tmp_path / "two.jsonl")])
    one, two = (tmp_path / "one.jsonl").read_text(), (tmp_path / "two.jsonl").read_text()
    assert len(one.splitlines()) == 11 and one == two


@pytest.mark.slow  # one torchrun launch (~10 s)
def test_processes_in_lockstep_run_as_many_passes_as_each_other(tmp_path: Path) -> None:
    """Under ZeRO-3 a process that skips a forward pass the others run leaves them waiting
    for ever. Base-model records one process has on disk and another has not, and a pair cut
    to max_length on one process only, make every process compute its whole share, in the
    same chunks; the records on disk are kept, and each new one is appended once."""
    script = tmp_path / "lockstep.py"
    script.write_text(LOCKSTEP)
    cache = tmp_path / "cache"
    from starlora.scoring.cache import BaseScoreCache

    BaseScoreCache(cache, {"test": 1}).records(["a", "b", "c"], lambda ps: [{"by": "disk"}
                                                                           for _ in ps])
    run([*TWO[:-2], str(script), str(tmp_path)], timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["made"] == ranks[1]["made"] == [[0, 1], [2]]
    assert ranks[0]["found"] == ["disk"] * 3 and ranks[1]["found"] == [1, 1, 1]
    assert ranks[0]["passes"] == ranks[1]["passes"] == [2]
    # only a cut pair takes the pass's value (0 here): the others keep the generation's (1)
    assert ranks[0]["pe"] == [1.0, 1.0] and ranks[1]["pe"] == [1.0, 0.0]
    on_disk = [json.loads(line)["key"] for line in
               BaseScoreCache(cache, {"test": 1}).path.read_text().splitlines()]
    assert sorted(on_disk) == ["a", "b", "c", "d", "e"]


@pytest.mark.slow  # two torchrun launches (~10 s); CI runs the full suite
def test_two_processes_train_on_the_batches_of_one(tmp_path: Path) -> None:
    import torch

    one, two = trained(tmp_path, TWO)
    assert one["steps"] == two["steps"] == 4 and one["lrs"] == two["lrs"]
    assert one["tokens"] == two["tokens"]  # stand-ins are not counted
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)  # the whole batch's mean
    for name, p in one["lora"].items():  # the same updates, up to the order of float sums
        torch.testing.assert_close(two["lora"][name], p, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_two_process_run_selects_as_one_process_does(tiny_runs: tuple[Path, Path]) -> None:
    """The same files and the same round-0 selection as a set: the processes draw other
    training dropout masks (`LOSS_RTOL`), and the random tiny model's greedy answers follow
    such small differences, so near-tied utilities may swap ranks (measured: the top two,
    0.9590 and 0.9583 in one process). The labelled rows are the same rows."""
    one, two = tiny_runs
    assert files(one) == files(two)  # the same files, and no temporary ones left over
    ids = [sorted(r["id"] for r in read_jsonl(d / "rounds/0/selected.jsonl")) for d in tiny_runs]
    assert ids[0] and ids[0] == ids[1]
    rows = [sorted(read_jsonl(d / "labelled.jsonl"), key=lambda r: r["id"]) for d in tiny_runs]
    assert rows[0] == rows[1]
    for a, b in zip(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"),
                    strict=True):
        assert (a["round"], a["n_labelled"]) == (b["round"], b["n_labelled"])
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=ACCURACY_ATOL)
        assert a["ece"] == pytest.approx(b["ece"], abs=ECE_ATOL)
    for k in (0, 1):
        a, b = (json.loads((d / f"rounds/{k}/train.json").read_text()) for d in (one, two))
        assert a["steps"] == b["steps"] and a["n_examples"] == b["n_examples"]
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=LOSS_RTOL)
    scores = read_jsonl(two / "rounds/0/scores.jsonl")  # gathered in the pool's order
    assert [r["id"] for r in scores] == [r["id"] for r in read_jsonl(one / "rounds/0/scores.jsonl")]


@pytest.mark.slow
def test_a_killed_two_process_run_finishes_when_run_again(
    tiny_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cmd = [*TWO, "run", str(TINY), "--run-dir", str(run_dir), *OWN_BASE]  # as tiny_runs'
    launch_and_kill(cmd, run_dir, lambda s: s["phase"] == "train", "launcher")  # evaluating
    launch_and_kill(cmd, run_dir, lambda s: s["round"] == 1, "worker")  # training round 1
    run(cmd)
    assert outputs(run_dir) == outputs(tiny_runs[1])


@pytest.mark.slow  # two launches (~15 s)
def test_uncertainty_writes_the_same_file_with_one_and_two_processes(
    tiny_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """`starlora uncertainty` on a finished run: 2 processes each score a share of the test
    items (MC masks seeded per example) and the main one writes the bytes of one process."""
    one, two = written_by([ONE, TWO], tiny_runs[0], tmp_path, "uncertainty",
                          "rounds/1/test_uncertainty.jsonl", "wrote 12 test items")
    assert one == two and len(one.splitlines()) == 12


@pytest.mark.slow  # two launches (~15 s)
def test_calibrate_fits_the_same_temperature_with_one_and_two_processes(
    tiny_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """`starlora calibrate` on a finished run: 2 processes each run a share of the forward
    passes (whole batches, cut before the shares), both get the temperature, and the main
    one prints and writes the bytes one process writes."""
    one, two = written_by([ONE, TWO], tiny_runs[0], tmp_path, "calibrate",
                          "rounds/1/calibration.json", "round 1: temperature")
    assert one == two
    result = json.loads(one)
    assert result["labelled"] == 16 and set(result["signals"]) == {"answer", "msp", "perplexity"}


@pytest.mark.parametrize("name", ["multi-gpu.yaml", "deepspeed-zero3.yaml"])
def test_accelerate_configs_load_and_name_their_launch_command(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / name
    config = load_config_from_file(str(path))
    assert config.num_processes > 1 and config.compute_environment.value == "LOCAL_MACHINE"
    assert f"accelerate launch --config_file configs/accelerate/{name} -m starlora run" in (
        path.read_text())
