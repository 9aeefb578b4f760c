"""Many processes: shares and gathering (in-process), then the real thing, 2 processes on gloo.

The multi-process tests launch ``torchrun --standalone --nproc-per-node 2 -m starlora ...``
(``python -m torch.distributed.run``) on the CPU with one thread per process and compare with
``python -m starlora ...`` in one process (also one thread: the thread count may change the
last bits of a float sum).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from starlora import distributed as dist
from starlora.io import read_jsonl
from starlora.train_batches import LengthGroupedBatches, ShareOfEachBatch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                    os.environ.get("PYTHONPATH")])))
ONE = [sys.executable, "-m", "starlora"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
       "-m", "starlora"]
#: DeepSpeed ZeRO-3 through the shipped accelerate config, 2 processes on the CPU (gloo), fp32
ZERO3 = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
         str(ROOT / "configs" / "accelerate" / "deepspeed-zero3.yaml"), "--num_processes", "2",
         "--mixed_precision", "no", "-m", "starlora"]
#: 2-process run vs 1 process (configs/tiny.yaml): the processes draw other LoRA dropout masks
#: in training (each for its share of a batch), so the adapters differ a little; with
#: lora.dropout 0 they agree to ~1e-5 (float sums in another order). Final training loss:
#: relative 2e-3 (measured 1.7e-4 and 3.1e-4); accuracy: one test example of 12; ECE: 0.05.
LOSS_RTOL, ACCURACY_ATOL, ECE_ATOL = 2e-3, 1 / 12, 0.05


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
def _run(cmd: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=dict(ENV, **env), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def scoring_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """11 arith problems (an odd count: one process gets a padding item) and a LoRA adapter
    of tiny-llama with non-zero B, so that MC dropout changes the scores."""
    import torch

    from starlora.adapters import attach_lora
    from starlora.models import load_model
    from starlora.tasks import get_task

    folder = tmp_path_factory.mktemp("scoring")
    data = folder / "data.jsonl"
    examples = get_task("arith").generate("train", 11, 0)
    data.write_text("".join(json.dumps({"id": ex.id, "question": ex.question,
                                        "answer": ex.answer}) + "\n" for ex in examples))
    model = attach_lora(load_model("tiny-llama", device="cpu", dtype="float32", seed=0).model,
                        r=4, dropout=0.1)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    model.save_pretrained(folder / "adapter")
    return data, folder / "adapter"


@pytest.mark.slow  # two torchrun launches (~10 s); CI runs the full suite
@pytest.mark.parametrize("passes", [1, 3])
def test_score_gives_the_same_lines_with_one_and_two_processes(
    scoring_inputs: tuple[Path, Path], tmp_path: Path, passes: int
) -> None:
    data, adapter = scoring_inputs
    args = ["score", "--model", "tiny-llama", "--adapter", str(adapter), "--task", "arith",
            "--data", str(data), "--max-new-tokens", "8", "--samples", "2",
            "--mc-passes", str(passes), "--device", "cpu"]
    _run([*ONE, *args, "--out", str(tmp_path / "one.jsonl")])
    _run([*TWO, *args, "--out", str(tmp_path / "two.jsonl")])
    one, two = (tmp_path / "one.jsonl").read_text(), (tmp_path / "two.jsonl").read_text()
    assert len(one.splitlines()) == 11 and one == two


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
"""


def _trained(tmp_path: Path, launcher: list[str]) -> tuple[dict, dict]:
    """What `TRAIN` saved when run by one process and by `launcher` (2 processes)."""
    import torch

    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    _run([sys.executable, str(script), str(tmp_path / "one.pt")])
    _run([*launcher[:-2], str(script), str(tmp_path / "two.pt")])
    one, two = (torch.load(tmp_path / f"{n}.pt") for n in ("one", "two"))
    return one, two


@pytest.mark.slow  # two torchrun launches (~10 s); CI runs the full suite
def test_two_processes_train_on_the_batches_of_one(tmp_path: Path) -> None:
    import torch

    one, two = _trained(tmp_path, TWO)
    assert one["steps"] == two["steps"] == 4 and one["lrs"] == two["lrs"]
    assert one["tokens"] == two["tokens"]  # stand-ins are not counted
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)  # the whole batch's mean
    for name, p in one["lora"].items():  # the same updates, up to the order of float sums
        torch.testing.assert_close(two["lora"][name], p, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """configs/tiny.yaml run by one process and by two."""
    folder = tmp_path_factory.mktemp("runs")
    _run([*ONE, "run", str(TINY), "--run-dir", str(folder / "one")])
    proc = _run([*TWO, "run", str(TINY), "--run-dir", str(folder / "two")])
    assert proc.stdout.count("run finished") == 1  # the main process reports, alone
    return folder / "one", folder / "two"


def _files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


@pytest.mark.slow
def test_a_two_process_run_selects_as_one_process_does(tiny_runs: tuple[Path, Path]) -> None:
    one, two = tiny_runs
    assert _files(one) == _files(two)  # the same files, and no temporary ones left over
    assert read_jsonl(one / "rounds/0/selected.jsonl") and [
        r["id"] for r in read_jsonl(one / "rounds/0/selected.jsonl")] == [
        r["id"] for r in read_jsonl(two / "rounds/0/selected.jsonl")]
    assert read_jsonl(one / "labelled.jsonl") == read_jsonl(two / "labelled.jsonl")
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


def _outputs(run_dir: Path) -> dict:
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


def _launch_and_kill(cmd: list[str], run_dir: Path, point, victim: str, **env: str) -> None:
    """Start `cmd`, wait until state.json satisfies `point`, then SIGKILL the launcher or
    one of its workers (`victim`: "launcher" or "worker")."""
    import psutil

    proc = subprocess.Popen(cmd, env=dict(ENV, **env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, "the run ended before the kill point"
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


@pytest.mark.slow
def test_a_killed_two_process_run_finishes_when_run_again(
    tiny_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cmd = [*TWO, "run", str(TINY), "--run-dir", str(run_dir)]
    _launch_and_kill(cmd, run_dir, lambda s: s["phase"] == "train", "launcher")  # evaluating
    _launch_and_kill(cmd, run_dir, lambda s: s["round"] == 1, "worker")  # training round 1
    _run(cmd)
    assert _outputs(run_dir) == _outputs(tiny_runs[1])


@pytest.mark.slow  # two launches (~15 s)
def test_uncertainty_writes_the_same_file_with_one_and_two_processes(
    tiny_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """`starlora uncertainty` on a finished run: 2 processes each score a share of the test
    items (MC masks seeded per example) and the main one writes the bytes of one process."""
    import shutil

    written = []
    for name, launcher in (("one", ONE), ("two", TWO)):
        run_dir = tmp_path / name
        shutil.copytree(tiny_runs[0], run_dir)
        (run_dir / "rounds/1/test_uncertainty.jsonl").unlink(missing_ok=True)
        proc = _run([*launcher, "uncertainty", str(run_dir)])
        assert proc.stdout.count("wrote 12 test items") == 1
        written.append((run_dir / "rounds/1/test_uncertainty.jsonl").read_bytes())
    assert written[0] == written[1] and len(written[0].splitlines()) == 12


@pytest.mark.parametrize("name", ["multi-gpu.yaml", "deepspeed-zero3.yaml"])
def test_accelerate_configs_load_and_name_their_launch_command(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / name
    config = load_config_from_file(str(path))
    assert config.num_processes > 1 and config.compute_environment.value == "LOCAL_MACHINE"
    assert f"accelerate launch --config_file configs/accelerate/{name} -m starlora run" in (
        path.read_text())


def test_deepspeed_batch_settings_are_filled_in_where_auto() -> None:
    from types import SimpleNamespace

    from starlora.config import TrainingConfig
    from starlora.training import _deepspeed_config

    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": 1, "gradient_clipping": 0.5}
    plugin = SimpleNamespace(zero_stage=3, deepspeed_config=config)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    _deepspeed_config(accelerator, TrainingConfig(batch_size=8, grad_accum=2))
    # one process here: the micro-batch is the whole batch; starlora's settings win
    assert config == {"train_micro_batch_size_per_gpu": 8, "train_batch_size": 16,
                      "gradient_accumulation_steps": 2, "gradient_clipping": 0.5}
    del config["gradient_clipping"]
    _deepspeed_config(accelerator, TrainingConfig(batch_size=8, max_grad_norm=None))
    assert config["gradient_clipping"] == 0.0 and config["gradient_accumulation_steps"] == 1


@pytest.mark.slow  # one accelerate launch with DeepSpeed (~30 s)
def test_zero3_trains_on_the_batches_of_one(tmp_path: Path) -> None:
    """ZeRO-3 (each process holds half of every weight) takes the steps of one process."""
    import torch

    one, two = _trained(tmp_path, ZERO3)
    assert one["held"] == 1 and 0.45 < two["held"] < 0.55  # each holds half of every weight
    assert one["steps"] == two["steps"] == 4 and one["lrs"] == two["lrs"]
    assert one["tokens"] == two["tokens"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for name, p in one["lora"].items():
        torch.testing.assert_close(two["lora"][name], p, rtol=1e-3, atol=1e-5)


def test_zero3_helpers_without_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process, no launcher: nothing is partitioned and every helper is a no-op; a ZeRO-3
    launch without zero3_init_flag is refused before any model loads."""
    import torch

    from starlora import zero3
    from starlora.errors import ConfigError

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    assert not zero3.requested() and not zero3.enabled()
    assert zero3.held_elements(model) == (3 * 4 + 4 + 4 * 2 + 2,) * 2
    with zero3.forward_hooks(model), zero3.gathered(model.parameters()), zero3.inference_mode():
        assert torch.is_inference_mode_enabled()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert zero3.requested()
    with pytest.raises(ConfigError, match="zero3_init_flag: true"):
        zero3.prepare_loading()


@pytest.mark.slow  # one accelerate launch with DeepSpeed (~20 s)
@pytest.mark.parametrize("passes", [1, 3])
def test_zero3_scores_as_one_process_does(scoring_inputs: tuple[Path, Path],
                                          tmp_path: Path, passes: int) -> None:
    """Gold answers: under ZeRO-3 (the plain forward path, whole weights gathered layer by
    layer) the same PE and ME as one process's fast path, to float rounding, MC passes
    included (each example's masks come from its own stream on either path)."""
    data, adapter = scoring_inputs
    args = ["score", "--model", "tiny-llama", "--adapter", str(adapter), "--task", "arith",
            "--data", str(data), "--answers", "gold", "--mc-passes", str(passes),
            "--device", "cpu"]
    _run([*ONE, *args, "--out", str(tmp_path / "one.jsonl")])
    _run([*ZERO3, *args, "--out", str(tmp_path / "two.jsonl")])
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert len(one) == 11 and [r["id"] for r in one] == [r["id"] for r in two]
    for a, b in zip(one, two):
        assert b["pe"] == pytest.approx(a["pe"], rel=1e-6)
        assert b["me"] == pytest.approx(a["me"], rel=1e-6)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.yaml under ZeRO-3, with an empty cache: the base model's scores are
    computed under ZeRO-3, not read."""
    folder = tmp_path_factory.mktemp("zero3")
    proc = _run([*ZERO3, "run", str(TINY), "--run-dir", str(folder / "run")],
                STARLORA_CACHE=str(folder / "cache"))
    assert proc.stdout.count("run finished") == 1
    return folder / "run"


@pytest.mark.slow  # one accelerate launch with DeepSpeed (~40 s)
def test_a_zero3_run_selects_as_one_process_does(tiny_runs: tuple[Path, Path],
                                                  zero3_run: Path) -> None:
    """configs/tiny.yaml under ZeRO-3: the files of one process, the same round-0 selection
    (as a set: scoring takes the plain forward path there, and near-ties may swap places),
    metrics and losses within the DDP tolerances, and adapters saved whole."""
    from safetensors.torch import load_file

    one, run_dir = tiny_runs[0], zero3_run
    assert _files(one) == _files(run_dir)
    ids = [sorted(r["id"] for r in read_jsonl(d / "rounds/0/selected.jsonl"))
           for d in (one, run_dir)]
    assert ids[0] and ids[0] == ids[1]
    assert [r["id"] for r in read_jsonl(one / "rounds/0/scores.jsonl")] == [
        r["id"] for r in read_jsonl(run_dir / "rounds/0/scores.jsonl")]
    for a, b in zip(read_jsonl(one / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl"),
                    strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=ACCURACY_ATOL)
        assert a["ece"] == pytest.approx(b["ece"], abs=ECE_ATOL)
    for k in (0, 1):
        a, b = (json.loads((d / f"rounds/{k}/train.json").read_text()) for d in (one, run_dir))
        assert a["steps"] == b["steps"]
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=LOSS_RTOL)
    a, b = (load_file(d / "rounds/1/adapter/adapter_model.safetensors") for d in (one, run_dir))
    assert {n: t.shape for n, t in a.items()} == {n: t.shape for n, t in b.items()}
    assert all(t.abs().sum() > 0 for t in b.values())


@pytest.mark.slow  # two accelerate launches with DeepSpeed (~60 s)
def test_a_killed_zero3_run_finishes_when_run_again(zero3_run: Path, tmp_path: Path) -> None:
    """Killed after round 0's training, the rerun loads the saved adapter into the
    partitioned model and ends with the outputs of an uninterrupted ZeRO-3 run."""
    run_dir, cache = tmp_path / "run", str(tmp_path / "cache")  # base scores as zero3_run's
    cmd = [*ZERO3, "run", str(TINY), "--run-dir", str(run_dir)]
    _launch_and_kill(cmd, run_dir, lambda s: s["phase"] == "train", "launcher",
                     STARLORA_CACHE=cache)
    _run(cmd, STARLORA_CACHE=cache)
    assert _outputs(run_dir) == _outputs(zero3_run)

