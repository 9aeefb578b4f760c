"""DeepSpeed ZeRO-3 (`starlora.zero3`): in one process, the helpers and the batch settings;
then the real thing, 2 processes on gloo under ``accelerate launch`` with the shipped config
(`launching.ZERO3`), compared with one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launching import (
    ACCURACY_ATOL,
    ECE_ATOL,
    LOSS_RTOL,
    ONE,
    OWN_BASE,
    TINY,
    ZERO3,
    files,
    launch_and_kill,
    made_once,
    outputs,
    run,
    trained,
    written_by,
)

from starlora.io import read_jsonl


def test_deepspeed_batch_settings_are_filled_in_where_auto() -> None:
    from types import SimpleNamespace

    from starlora.config import TrainingConfig
    from starlora.train_setup import deepspeed_config as _deepspeed_config

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

    one, two = trained(tmp_path, ZERO3)
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
    layer; tiny-llama's weights from a folder, partitioned as they load) the same PE and ME
    as one process's fast path on the built-in tiny-llama, to float rounding, MC passes
    included (each example's masks come from its own stream on either path)."""
    data, adapter = scoring_inputs
    args = ["score", "--adapter", str(adapter), "--task", "arith", "--data", str(data),
            "--answers", "gold", "--mc-passes", str(passes), "--device", "cpu"]
    run([*ONE, *args, "--model", "tiny-llama", "--out", str(tmp_path / "one.jsonl")])
    folder = saved_tiny_llama(tmp_path / "model")
    run([*ZERO3, *args, "--model", str(folder), "--out", str(tmp_path / "two.jsonl")])
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert len(one) == 11 and [r["id"] for r in one] == [r["id"] for r in two]
    for a, b in zip(one, two):
        assert b["pe"] == pytest.approx(a["pe"], rel=1e-6)
        assert b["me"] == pytest.approx(a["me"], rel=1e-6)


def saved_tiny_llama(folder: Path) -> Path:
    """`folder`, where tiny-llama's weights are saved as a user's model folder is:
    `from_pretrained` loads a folder under ZeRO-3 partitioned as it loads (a built-in tiny
    model is built whole, and partitioned only by DeepSpeed's engine)."""
    from starlora.models import load_model

    loaded = load_model("tiny-llama", device="cpu", dtype="float32", seed=0)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.yaml under ZeRO-3 on tiny-llama's weights loaded from a folder
    (`saved_tiny_llama`; ``model/`` beside the run), with an empty cache: the base model's
    scores are computed under ZeRO-3, not read."""
    def make(folder: Path) -> None:
        proc = run([*ZERO3, "run", str(TINY), "--run-dir", str(folder / "run"), *OWN_BASE,
                    "--set", f"model.name={saved_tiny_llama(folder / 'model')}"],
                   STARLORA_CACHE=str(folder / "cache"))
        assert proc.stdout.count("run finished") == 1

    return made_once(tmp_path_factory, "zero3_run", make) / "run"


@pytest.mark.slow  # one accelerate launch with DeepSpeed (~40 s)
def test_a_zero3_run_selects_as_one_process_does(tiny_runs: tuple[Path, Path],
                                                  zero3_run: Path) -> None:
    """configs/tiny.yaml under ZeRO-3 (weights from a folder, partitioned as they load): the
    files of one process on the built-in tiny-llama, the same round-0 selection
    (as a set: scoring takes the plain forward path there, and near-ties may swap places),
    metrics and losses within the DDP tolerances, and adapters saved whole."""
    from safetensors.torch import load_file

    one, run_dir = tiny_runs[0], zero3_run
    assert files(one) == files(run_dir)
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


@pytest.mark.slow  # a one-process run and an accelerate launch with DeepSpeed (~30 s)
def test_zero3_base_term_scores_the_adapted_answers_as_one_process_does(tmp_path: Path) -> None:
    """The default base term (``scoring.base_scores: adapted``) under ZeRO-3: the base model,
    adapter disabled and weights partitioned, scores the adapted model's own answers as one
    process does (tiny-llama's weights from a folder there, partitioned as they load).
    Without LoRA dropout and with one scoring pass both runs' adapters agree to
    float rounding (`launching.LOSS_RTOL`), so their answers are mostly the same text (37 of
    40 measured); where they are, the base term is the same number (fp32 scoring: in bf16 it
    would follow the batch-mates, which the shares change; 162 nats give or take 0.4 here)."""
    settings = ["--set", "lora.dropout=0", "--set", "scoring.mc_passes=1",
                "--set", "scoring.dtype=float32"]
    run([*ONE, "run", str(TINY), "--run-dir", str(tmp_path / "one"), *settings])
    run([*ZERO3, "run", str(TINY), "--run-dir", str(tmp_path / "zero3"), *settings,
         "--set", f"model.name={saved_tiny_llama(tmp_path / 'model')}"])
    one, two = (read_jsonl(tmp_path / d / "rounds/0/scores.jsonl") for d in ("one", "zero3"))
    assert [r["id"] for r in one] == [r["id"] for r in two] and len(one) == 40  # 48 - 8
    same = [(a, b) for a, b in zip(one, two) if a["answer"] == b["answer"]]
    assert len(same) >= 0.8 * len(one)
    for a, b in same:
        assert b["pe_base"] == pytest.approx(a["pe_base"], rel=1e-6)  # measured 2e-9
        assert b["pe"] == pytest.approx(a["pe"], rel=1e-4)  # the adapters: measured 2e-5


def scoring_in_float32(finished: Path, tmp_path: Path) -> Path:
    """A copy of the `finished` run whose config says float32 scoring, which ZeRO-3 resolves
    and one process on a CPU with bf16 does not: one process then scores as ZeRO-3 does."""
    import shutil

    import yaml

    copy = shutil.copytree(finished, tmp_path / "finished")
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["scoring"]["dtype"] = "float32"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


@pytest.mark.slow  # one process and an accelerate launch with DeepSpeed (~40 s)
def test_calibrate_under_zero3_fits_what_one_process_fits(zero3_run: Path, tmp_path: Path
                                                         ) -> None:
    """`starlora calibrate` under ZeRO-3 on the run's model from a folder: `from_pretrained`
    puts each process's shares where DeepSpeed wants them, and the forward passes gather them
    (each process runs as many batches). The main process writes what one process writes
    (the temperature is a grid point; the NLLs and signals agree to float rounding), both
    scoring in float32 (`scoring_in_float32`)."""
    one, zero3 = (json.loads(b) for b in written_by(
        [ONE, ZERO3], scoring_in_float32(zero3_run, tmp_path), tmp_path, "calibrate",
        "rounds/1/calibration.json", "round 1: temperature"))
    assert zero3["labelled"] == one["labelled"] == 16 and zero3["tokens"] == one["tokens"]
    assert zero3["temperature"] == one["temperature"]
    for key in ("nll_t1", "nll_fitted"):
        assert zero3[key] == pytest.approx(one[key], rel=1e-6)
    assert zero3["signals"].keys() == one["signals"].keys() == {"answer", "msp", "perplexity"}
    for name, found in one["signals"].items():
        for when in ("before", "after"):
            a, b = found[when], zero3["signals"][name][when]
            assert a.keys() == b.keys()
            assert all(b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-12) if a[k] is not None
                       else b[k] is None for k in a)


@pytest.mark.slow  # one process and an accelerate launch with DeepSpeed (~40 s)
def test_uncertainty_under_zero3_writes_what_one_process_writes(zero3_run: Path,
                                                                 tmp_path: Path) -> None:
    """`starlora uncertainty` under ZeRO-3 on the run's model from a folder: the test answers
    are generated and scored in shares, every process through as many forward passes
    (generation included: a process done early would leave the other waiting for its
    shares of the weights), and the main process writes what one process writes, both
    scoring in float32: the same items and correctness, every measure to float rounding."""
    one, zero3 = (read_jsonl_bytes(b) for b in written_by(
        [ONE, ZERO3], scoring_in_float32(zero3_run, tmp_path), tmp_path, "uncertainty",
        "rounds/1/test_uncertainty.jsonl", "wrote 12 test items"))
    assert [(r["id"], r["correct"]) for r in zero3] == [(r["id"], r["correct"]) for r in one]
    assert len(one) == 12
    for a, b in zip(one, zero3):
        assert a.keys() == b.keys()
        for k in a.keys() - {"id", "correct"}:
            assert a[k] is not None and b[k] == pytest.approx(a[k], rel=1e-5), (a["id"], k)


def read_jsonl_bytes(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


@pytest.mark.slow  # two accelerate launches with DeepSpeed (~60 s)
def test_a_killed_zero3_run_finishes_when_run_again(zero3_run: Path, tmp_path: Path) -> None:
    """Killed after round 0's training, the rerun loads the saved adapter into the
    partitioned model and ends with the outputs of an uninterrupted ZeRO-3 run."""
    run_dir, cache = tmp_path / "run", str(tmp_path / "cache")  # base scores as zero3_run's
    cmd = [*ZERO3, "run", str(TINY), "--run-dir", str(run_dir), *OWN_BASE,  # as zero3_run's
           "--set", f"model.name={zero3_run.parent / 'model'}"]
    launch_and_kill(cmd, run_dir, lambda s: s["phase"] == "train", "launcher",
                     STARLORA_CACHE=cache)
    run(cmd, STARLORA_CACHE=cache)
    assert outputs(run_dir) == outputs(zero3_run)


@pytest.mark.slow  # two accelerate launches with DeepSpeed (~90 s)
def test_a_human_oracle_run_under_zero3_drafts_on_every_process(tmp_path: Path) -> None:
    """A human query's drafts need forward passes, and under ZeRO-3 every forward pass needs
    every process: the drafts are generated in shares by both, so the run pauses (it used to
    hang at the first pause, the main process drafting alone). Round 0 drafts with the base
    model, round 1 (gold scores: no generated answers to reuse) with round 0's adapter. The
    drafting is what is checked: a pool of 24 and 4 test problems (tiny.yaml: 48 and 12)
    keep the evaluation and scoring before round 1's pause short. The weights come from a
    folder, partitioned as they load."""
    run_dir = tmp_path / "run"
    cmd = [*ZERO3, "run", str(TINY), "--run-dir", str(run_dir),
           "--set", "active_learning.oracle=human", "--set", "scoring.answers=gold",
           "--set", "task.pool_size=24", "--set", "task.test_size=4",
           "--set", f"model.name={saved_tiny_llama(tmp_path / 'model')}"]
    for label_round in (0, 1):
        proc = run(cmd, timeout=900, STARLORA_CACHE=str(tmp_path / "cache"))
        assert f"8 queries of round {label_round} wait for answers" in proc.stdout + proc.stderr
        rows = read_jsonl(run_dir / "queries" / f"{label_round}.jsonl")
        assert len(rows) == 8 and all(isinstance(r["draft"], str) for r in rows)
        answers = tmp_path / f"answers{label_round}.jsonl"
        answers.write_text("".join(json.dumps({"id": r["id"], "answer": "7"}) + "\n"
                                   for r in rows))
        run([*ONE, "import", str(run_dir), str(answers)])
    labelled = read_jsonl(run_dir / "labelled.jsonl")
    assert len(labelled) == 16 and {r["answer"] for r in labelled} == {"7"}
