"""The loop end to end on a tiny random model, including SIGKILL and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from starlora.acquisition import make_strategy
from starlora.cli import main
from starlora.config import load_config
from starlora.errors import ConfigError
from starlora.io import read_jsonl
from starlora.report import build_report, load_runs
from starlora.run.loop import run_experiment
from starlora.run.protocol import stream
from starlora.run.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def outputs(run_dir: Path) -> dict:
    """Everything a resumed run must reproduce exactly."""
    rounds = sorted(p.name for p in (run_dir / "rounds").iterdir())
    return {
        "metrics": [{k: r[k] for k in ("round", "n_labelled", "accuracy", "ece")}
                    for r in read_jsonl(run_dir / "metrics.jsonl")],
        "labelled": read_jsonl(run_dir / "labelled.jsonl"),
        "scores": {k: read_jsonl(run_dir / "rounds" / k / "scores.jsonl") for k in rounds},
        "selected": {k: read_jsonl(run_dir / "rounds" / k / "selected.jsonl") for k in rounds},
        "loss": {k: json.loads((run_dir / "rounds" / k / "train.json").read_text())["final_loss"]
                 for k in rounds},
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of configs/tiny.yaml."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_experiment(load_config(TINY), run_dir, progress=False)
    return run_dir


def test_end_to_end(reference: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = read_jsonl(reference / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1]
    assert [m["n_labelled"] for m in metrics] == [8, 16]
    for m in metrics:
        assert set(m) >= {"round", "n_labelled", "accuracy", "ece", "strategy", "seed", "seconds"}
        assert m["strategy"] == "pe-dynamic" and 0 <= m["accuracy"] <= 1 and m["seconds"] > 0
    labelled = read_jsonl(reference / "labelled.jsonl")
    assert len({r["id"] for r in labelled}) == 16
    assert [r["round"] for r in labelled] == [0] * 8 + [1] * 8
    selected = [r["id"] for r in read_jsonl(reference / "rounds/0/selected.jsonl")]
    assert selected == [r["id"] for r in labelled[8:]]
    scores = read_jsonl(reference / "rounds/0/scores.jsonl")
    assert len(scores) == 40 and set(scores[0]) == {"id", "pe", "pe_passes", "pe_base", "answer"}
    for row in scores:  # per-pass values (mc_passes: 2), whose mean is the score
        assert len(row["pe_passes"]) == 2 and np.mean(row["pe_passes"]) == pytest.approx(row["pe"])
    # the selection is the strategy's own ranking of the stored scores (query 0, its stream)
    cfg = load_config(TINY)
    strategy = make_strategy("pe-dynamic", n_queries=1)
    columns = {c: np.array([r[c] for r in scores]) for c in ("pe", "pe_base")}
    assert selected == strategy.select([r["id"] for r in scores], columns, 8, query_index=0,
                                       rng=stream(cfg.seed, 0, "select"))
    # each selected example carries its utility and the terms it was mixed from
    rows = read_jsonl(reference / "rounds/0/selected.jsonl")
    by_id = {r["id"]: r for r in scores}
    for row in rows:
        assert set(row) == {"id", "rank", "utility", "pe", "pe_base", "u_base", "u_full", "lambda"}
        assert row["pe"] == by_id[row["id"]]["pe"] and row["lambda"] == 0.9
        assert row["utility"] == pytest.approx(0.9 * row["u_base"] + 0.1 * row["u_full"])
    assert [m["lambda"] for m in metrics] == [None, 0.9]  # λ of the query behind each round
    assert not (reference / "rounds/0/adapter").exists()  # keep_adapters: last
    assert (reference / "rounds/1/adapter/adapter_model.safetensors").is_file()
    assert main(["status", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "phase: finished" in out and "labelled:   16  (pool left: 32)" in out
    assert f"adapter:    {reference / 'rounds' / '1' / 'adapter'}  (peft)\n" in out
    assert "confidence of the test answers, last round (roc-auc: higher" in out
    assert f"next:       starlora report {reference}  (learning curves" in out and "resume:" not in out
    (reference / "state.json").rename(reference / "state.saved")  # damaged: a clear error
    (reference / "state.json").write_text('{"round": 1,')
    try:
        assert main(["status", str(reference)]) == 2
    finally:
        (reference / "state.saved").replace(reference / "state.json")
    assert f"{reference / 'state.json'}: not valid JSON" in capsys.readouterr().err
    # running a finished run again does nothing and changes nothing
    before = outputs(reference)
    run_experiment(load_config(TINY), reference, progress=False)
    assert outputs(reference) == before


def test_the_docs_recipe_folds_the_runs_adapter_into_a_plain_model(reference: Path,
                                                                    tmp_path: Path) -> None:
    """docs/getting-started.md's "Use the model" code, run on the finished tiny run: the
    saved model loads with plain transformers and gives the logits of the model with the
    adapter (to float rounding: folding B·A into W sums in another order)."""
    import re

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from starlora.models import load_model

    page = (ROOT / "docs" / "getting-started.md").read_text()
    code = re.search(r"## Use the model\n.*?```python\n(.*?)```", page, re.S).group(1)
    adapter, out = reference / "rounds" / "1" / "adapter", tmp_path / "my-model"
    for old, new in (('"smollm2-135m-instruct"', '"tiny-llama"'),
                     ('"runs/mine/rounds/2/adapter"', repr(str(adapter))),
                     ('"my-model"', repr(str(out)))):
        assert old in code
        code = code.replace(old, new)
    exec(compile(code, "getting-started.md", "exec"), {})
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(load_model("tiny-llama").model, str(adapter)).eval()
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        a, b = with_adapter(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.equal(
        a, load_model("tiny-llama").model(input_ids=ids).logits)
    assert RunStore.open(reference).status()["adapter"] == str(adapter)
    copy = shutil.copytree(reference, tmp_path / "without", ignore=shutil.ignore_patterns(
        "adapter"))  # as a run committed to git (no weights): status names no adapter
    assert RunStore.open(copy).status()["adapter"] is None


def _wait_for(run_dir: Path, proc: subprocess.Popen, predicate, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = run_dir / "state.json"
        if state.is_file():
            try:
                if predicate(json.loads(state.read_text())):
                    return
            except json.JSONDecodeError:
                pass
        assert proc.poll() is None, "the run ended before the kill point"
        time.sleep(0.05)
    raise AssertionError("kill point not reached")


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_results(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "starlora", "run", str(TINY), "--run-dir", str(run_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    kill_points = [
        lambda s: s["phase"] == "train",                     # during evaluation of round 0
        lambda s: s["phase"] in ("evaluate", "score"),       # during scoring or selection
        lambda s: s["round"] == 1,                           # during training of round 1
    ]
    for point in kill_points:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(run_dir, proc, point)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    # the last resume runs in this process (it reads everything from the run directory)
    assert main(cmd[3:]) == 0
    assert outputs(run_dir) == outputs(reference)


#: a protocol whose subsample and selection both draw random numbers in every round
SUBSAMPLE = ["active_learning.strategy=random", "active_learning.pool_subsample=20"]
#: a child process that dies by SIGKILL the moment a strategy starts selecting: after the
#: round's scores are stored and the score phase is marked done, before anything is selected
KILL_AT_SELECT = (
    "import os, signal, sys\n"
    "from starlora import acquisition\n"
    "def die(*args, **kwargs): os.kill(os.getpid(), signal.SIGKILL)\n"
    "acquisition.QueryStrategy.select_rows = die\n"
    "from starlora.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.slow
def test_sigkill_between_scoring_and_selection_with_a_pool_subsample(tmp_path: Path) -> None:
    """The subsample and the selection draw from streams of their own: a selection redone
    after a kill is the one an uninterrupted run makes (one shared stream made `random` pick
    another batch on resume)."""
    reference = tmp_path / "reference"
    run_experiment(load_config(TINY, SUBSAMPLE), reference, progress=False)
    run_dir = tmp_path / "run"
    args = ["run", str(TINY), "--run-dir", str(run_dir)] + [f"--set={o}" for o in SUBSAMPLE]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", KILL_AT_SELECT, *args], env=env,
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    # where it landed: scores stored and marked done, no selection yet
    assert json.loads((run_dir / "state.json").read_text())["phase"] == "score"
    assert (run_dir / "rounds/0/scores.jsonl").is_file()
    assert not (run_dir / "rounds/0/selected.jsonl").exists()
    assert main(args) == 0  # the resume, in this process
    assert outputs(run_dir) == outputs(reference)
    assert len(read_jsonl(run_dir / "rounds/0/scores.jsonl")) == 20


@pytest.mark.slow
def test_a_finished_run_extended_keeps_its_rounds_and_its_protocol(
    reference: Path, tmp_path: Path
) -> None:
    """2 -> 3 rounds: every file of rounds 0-1 stays byte-identical, metrics.jsonl and
    labelled.jsonl only grow, and the report sees one run."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    store = run_experiment(load_config(TINY, ["active_learning.rounds=3"]), run_dir,
                           progress=False)
    assert [m["n_labelled"] for m in store.metrics()] == [8, 16, 24]
    assert len({r["id"] for r in store.labelled()}) == 24
    # λ keeps the first plan's schedule (one query, λ = start): stretched again over the new
    # plan it was 0.1 here, and after a longer extension it rose again
    assert [m["lambda"] for m in store.metrics()] == [None, 0.9, 0.9]
    assert json.loads((run_dir / "identity.json").read_text())["plan"] == {"rounds": 2}
    for path, data in before.items():
        now = run_dir / path
        if path.name in ("state.json", "config.yaml") or "adapter" in path.parts:
            continue  # the run's progress, the new round count, pruned adapters
        if path.name in ("metrics.jsonl", "labelled.jsonl"):
            assert now.read_bytes().startswith(data), path
        else:
            assert now.read_bytes() == data, path
    assert len({r["protocol"] for r in load_runs([run_dir])}) == 1
    written = build_report([run_dir], tmp_path / "report")
    assert "summary.md" in written  # one group: file names carry no group prefix


def test_resume_refuses_a_changed_config(reference: Path) -> None:
    with pytest.raises(ConfigError, match=r"different config \(training\.lr\)"):
        RunStore.create_or_resume(reference, load_config(TINY, ["training.lr=0.5"]))


@pytest.mark.parametrize(
    "override,message",
    [
        ("active_learning.strategy=entropy", "unknown strategy 'entropy'"),
        ("active_learning.query_size=50", "the protocol labels 58 examples but the pool has 48"),
        ("task.name=obqa", "task.test: required for task 'obqa'"),
        ("task.train=/no/such.jsonl", "no such file"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path: Path, capsys, override: str, message: str) -> None:
    run_dir = tmp_path / "run"
    extra = ["--set", "task.name=jsonl", "--set", f"task.test={tmp_path / 't.jsonl'}"] \
        if override.startswith("task.train") else []
    code = main(["run", str(TINY), "--run-dir", str(run_dir), "--set", override, *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run_dir.exists()


def test_a_start_that_fails_on_its_model_leaves_no_run_behind(tmp_path: Path, capsys) -> None:
    """A misspelt model name, or a generation that cannot fit the model, fails after the run
    directory was made: it kept config.yaml, and the corrected command was refused ("holds a
    run with a different config"). The failed start now removes what it wrote."""
    run_dir = tmp_path / "run"
    for override in ("model.name=tiny-lama", "evaluation.max_new_tokens=2000"):
        assert main(["run", str(TINY), "--run-dir", str(run_dir), "--set", "model.name=tiny-gpt2",
                     "--set", override, "--set", "active_learning.rounds=1"]) == 2
        assert "error:" in capsys.readouterr().err
        assert not run_dir.exists()  # not even its lock file (it was left, empty, before)
    assert main(["run", str(TINY), "--run-dir", str(run_dir), "--set", "model.name=tiny-gpt2",
                 "--set", "active_learning.rounds=1", "--set", "evaluation.max_new_tokens=4",
                 "--check"]) == 0
    # a run that exists: its resume that fails the same way removes nothing
    config = load_config(TINY, ["model.name=tiny-gpt2", "evaluation.max_new_tokens=2000"])
    RunStore.create_or_resume(tmp_path / "kept", config)
    with pytest.raises(ConfigError, match="leave no room for a prompt"):
        run_experiment(config, tmp_path / "kept")
    assert (tmp_path / "kept" / "config.yaml").is_file()


def test_ctrl_c_before_any_work_leaves_no_run_behind(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C while the model loads, or in round 0 before its first phase is done (to follow
    the run's own prompt-style note, say), removes what the start wrote, as a failed start
    does: the corrected command then starts. After a phase, or with anything else in the
    directory, the run stays to be resumed."""
    import starlora.models as models
    import starlora.run.loop as loop

    config = load_config(TINY, ["model.name=tiny-gpt2", "active_learning.rounds=1"])

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    for module, where in ((models, "load_model"), (loop, "_rounds")):
        with monkeypatch.context() as m:
            m.setattr(module, where, interrupt)
            with pytest.raises(KeyboardInterrupt):
                run_experiment(config, tmp_path / where)
        assert not (tmp_path / where).exists()

    def after_a_phase(run):
        run.store.set_state(0, "train")
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_rounds", after_a_phase)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "kept")
    assert (tmp_path / "kept" / "config.yaml").is_file()


def test_duplicate_ids_in_the_pool_are_refused(tmp_path: Path, capsys) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": i % 3, "question": f"q{i}", "answer": "a"}) + "\n"
                            for i in range(5)))
    code = main(["run", str(TINY), "--run-dir", str(tmp_path / "run"), "--set", "task.name=jsonl",
                 "--set", f"task.train={pool}", "--set", f"task.test={pool}"])
    assert code == 2
    assert f"{pool}:4: id: duplicate id '0' (first on line 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_take_rest_and_budget(tmp_path: Path) -> None:
    """(4 test problems: the evaluation is not what is checked; a pool of 24 for take_rest,
    whose last round trains on all of it)"""
    small = ["task.test_size=4", "active_learning.strategy=random"]
    cfg = load_config(TINY, ["active_learning.query_size=45", "active_learning.on_exhausted=take_rest",
                             "task.pool_size=24", *small])
    store = run_experiment(cfg, tmp_path / "a", progress=False)
    assert len(store.labelled()) == 24  # 8 initial + the 16 that were left
    cfg = load_config(TINY, ["active_learning.rounds=5", "active_learning.budget=20",
                             "output.report_to=tensorboard", *small])
    store = run_experiment(cfg, tmp_path / "b", progress=False)
    assert [m["n_labelled"] for m in store.metrics()] == [8, 16, 20]
    # per-round metrics went to the tracker too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "b").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("n_labelled")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("accuracy")] == pytest.approx(
        [m["accuracy"] for m in store.metrics()])


def test_rounds_that_outlast_the_pool_end_the_run_when_take_rest_used_it_up(tmp_path: Path,
                                                                            capsys) -> None:
    """take_rest with more rounds than the pool serves: the round that trained on the whole
    pool ends the run, finished (it scored an empty pool and failed on every resume, never
    finished); --check says so beforehand. A subsample smaller than a query is refused before
    any work (it failed after round 0, advising take_rest)."""
    from starlora.report_confidence import status_lines
    from starlora.run.data import describe_plan
    from starlora.run.loop import checked_inputs
    from starlora.run.protocol import USED_UP
    from starlora.run.status import run_status

    small = ["model.name=tiny-gpt2", "task.test_size=4", "active_learning.strategy=random",
             "task.pool_size=10", "active_learning.initial_size=4", "active_learning.query_size=4",
             "active_learning.rounds=5", "active_learning.on_exhausted=take_rest"]
    cfg = load_config(TINY, small)
    _, data, n_rounds, _ = checked_inputs(cfg)
    assert "3 rounds, 10 labels" in describe_plan(cfg, data, n_rounds)[2]
    store = run_experiment(cfg, tmp_path / "a", progress=False)
    assert [m["n_labelled"] for m in store.metrics()] == [4, 8, 10]
    assert store.state() == {"round": 2, "phase": "evaluate", "finished": True, "stopped": USED_UP}
    status = run_status(store)  # no stopping rule held: the pool ended it
    assert status["stopped_at"] is None and status["pool_used_up"] and status["resume"] is None
    assert "ended:      the pool was used up in round 2" in "\n".join(status_lines("a", status))
    capsys.readouterr()
    run_experiment(cfg, tmp_path / "a", progress=False)
    assert "already finished (the pool was used up in round 2)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="pool_subsample: 3 is smaller than active_learning."
                                          "query_size 4"):
        checked_inputs(load_config(TINY, [*small, "active_learning.pool_subsample=3",
                                          "active_learning.on_exhausted=error"]))
    # with take_rest each query takes the whole subsample, as runs made before did
    checked_inputs(load_config(TINY, [*small, "active_learning.pool_subsample=3"]))


def test_a_pool_without_some_answers_names_the_first_for_a_simulated_oracle(tmp_path) -> None:
    """A simulated oracle, or gold scoring, needs every pool answer: the refusal names the
    first record without one (it gave a count only)."""
    from starlora.run.loop import checked_inputs

    pool, test = tmp_path / "pool.jsonl", tmp_path / "test.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "question": f"{i} + 1?"}
                                       | ({} if i in (2, 5) else {"answer": str(i + 1)})) + "\n"
                            for i in range(30)))
    test.write_text(json.dumps({"id": "t", "question": "99 + 9?", "answer": "108"}) + "\n")
    base = [f"task.train={pool}", f"task.test={test}", "task.name=jsonl"]
    with pytest.raises(ConfigError, match=rf"2 of 30 pool records in {pool} \(the first: "
                                          rf"{pool}:3\) have no answer"):
        checked_inputs(load_config(TINY, base))
    with pytest.raises(ConfigError, match=r"pool.jsonl:3\) have none; set scoring.answers"):
        checked_inputs(load_config(TINY, [*base, "active_learning.oracle=human",
                                          "scoring.answers=gold"]))


@pytest.mark.slow
def test_single_pass_baselines_score_once(tmp_path: Path) -> None:
    """The authors' baselines score with one deterministic pass; ours with MC dropout. (A pool
    of 24 and 4 test problems: what is checked is the passes of each score.)"""
    small = ["task.pool_size=24", "task.test_size=4"]
    single = ["active_learning.strategy=pe", *small, "scoring.single_pass_baselines=true"]
    store = run_experiment(load_config(TINY, single), tmp_path / "single", progress=False)
    rows = store.read_round(0, "scores.jsonl")
    assert set(rows[0]) == {"id", "pe", "answer"}  # no per-pass values: one pass
    store = run_experiment(load_config(TINY, single[:-1]), tmp_path / "mc", progress=False)
    mc = store.read_round(0, "scores.jsonl")
    assert len(mc[0]["pe_passes"]) == 2 and mc[0]["pe_passes"][0] != mc[0]["pe_passes"][1]


def test_the_loops_evaluation_cuts_prompts_to_training_max_length(monkeypatch) -> None:
    """Issue 36, bug 6: the evaluate phase passed no max_length (test uncertainty did), so a
    long test prompt was evaluated uncut while it is trained and scored cut to
    ``training.max_length``."""
    import types

    import starlora.evaluation
    from starlora.run import loop

    seen = {}

    def evaluate(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before the phase writes anything

    monkeypatch.setattr(starlora.evaluation, "evaluate", evaluate)
    run = types.SimpleNamespace(
        config=load_config(TINY, ["training.max_length=77"]), data=types.SimpleNamespace(test=[]),
        say=lambda k, m: None, adapted=lambda k: None, tokenizer=None, task=None, progress=False)
    with pytest.raises(KeyboardInterrupt):
        loop._evaluate(run, 0)
    assert seen["max_length"] == 77


#: a child process that dies by SIGKILL inside the score phase, after the pool's answers were
#: generated and before a column is written (the function of pool_scores named by KILL_IN)
KILL_IN_SCORE = (
    "import os, signal, sys\n"
    "from starlora.run import pool_scores\n"
    "def die(*args, **kwargs): os.kill(os.getpid(), signal.SIGKILL)\n"
    "setattr(pool_scores, os.environ['KILL_IN'], die)\n"
    "from starlora.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("arm,kill_in,columns", [
    (["active_learning.strategy=disagreement-dynamic", "scoring.samples=3"],
     "_consistency_columns", {"id", "answer", "disagreement", "disagreement_base"}),
    (["active_learning.strategy=pe-dynamic", "scoring.samples=2", "scoring.base_scores=adapted"],
     "_base_columns", {"id", "answer", "pe", "pe_passes", "pe_base"}),
])
def test_sampled_answers_are_redrawn_identically_after_a_kill_in_the_score_phase(
    tmp_path: Path, arm: list[str], kill_in: str, columns: set[str]
) -> None:
    """Sampled answers come from the round's "score" stream, and the base term on the adapted
    answers adds no stream: a score phase killed half-way and redone gives the uninterrupted
    run's scores, selection and everything after.

    Sizes do not matter to that: a pool of 24 (16 candidates) and 4 test problems. The run is
    killed in a process of its own; it resumes in this one, as the reference ran (the resumed
    run reads everything from its directory, like a fresh process)."""
    arm = [*arm, "task.pool_size=24", "task.test_size=4"]
    reference = tmp_path / "reference"
    run_experiment(load_config(TINY, arm), reference, progress=False)
    run_dir = tmp_path / "run"
    args = ["run", str(TINY), "--run-dir", str(run_dir)] + [f"--set={o}" for o in arm]
    env = dict(os.environ, HF_HUB_OFFLINE="1", KILL_IN=kill_in)
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SCORE, *args], env=env,
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run_dir / "state.json").read_text())["phase"] == "evaluate"
    assert not (run_dir / "rounds/0/scores.jsonl").exists()
    assert main(args) == 0
    assert outputs(run_dir) == outputs(reference)
    assert set(read_jsonl(run_dir / "rounds/0/scores.jsonl")[0]) == columns


#: a child process that dies by SIGKILL when round KILL_ROUND starts scoring (its adapter
#: trained and saved, its evaluation stored and marked done)
KILL_AT_SCORE = (
    "import os, signal, sys\n"
    "from starlora.run import loop\n"
    "score = loop.PHASE_FUNCTIONS['score']\n"
    "def die(run, k):\n"
    "    if k == int(os.environ['KILL_ROUND']): os.kill(os.getpid(), signal.SIGKILL)\n"
    "    score(run, k)\n"
    "loop.PHASE_FUNCTIONS['score'] = die\n"
    "from starlora.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _killed_at_score(run_dir: Path, overrides: list[str], round_: int) -> list[str]:
    """Run configs/tiny.yaml with `overrides` in a child killed as round `round_` starts
    scoring; then delete every adapter, as a run directory committed to git (adapters are
    ignored) or copied without them arrives on another machine. Returns the run's arguments."""
    args = ["run", str(TINY), "--run-dir", str(run_dir)] + [f"--set={o}" for o in overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", KILL_ROUND=str(round_))
    proc = subprocess.run([sys.executable, "-c", KILL_AT_SCORE, *args], env=env,
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert (state["round"], state["phase"]) == (round_, "evaluate")
    adapters = list((run_dir / "rounds").glob("*/adapter"))
    assert adapters  # the killed run had saved its adapter
    for adapter in adapters:
        shutil.rmtree(adapter)
    return args


@pytest.mark.slow
def test_a_run_resumed_without_its_adapter_trains_it_again_and_ends_as_the_reference(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Round 0 trained and evaluated, then the run directory lost its adapter (as a git
    checkout of a committed run does): the resume trains round 0's adapter again from its
    seed, and scores, selects and ends exactly as the uninterrupted run."""
    run_dir = tmp_path / "run"
    args = _killed_at_score(run_dir, [], 0)
    assert main(args) == 0
    assert "round 0: its adapter is not in the run directory" in capsys.readouterr().err
    assert outputs(run_dir) == outputs(reference)


@pytest.mark.slow
def test_a_warm_started_run_without_its_adapters_stops_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A warm start continues from the previous round's adapter: without it, the lost adapter
    cannot be trained again, and the resume says so instead of loading nothing."""
    run_dir = tmp_path / "run"
    overrides = ["training.warm_start=true", "output.keep_adapters=all",
                 "active_learning.rounds=3", "task.pool_size=24", "task.test_size=4"]
    args = _killed_at_score(run_dir, overrides, 1)
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "training.warm_start continues from round 0's adapter" in err
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # nothing written


@pytest.mark.slow
def test_the_adapted_base_term_is_computed_by_the_run_not_read_from_another_runs_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below fp32 (bf16 here) a sequence's score depends on its batch-mates, so base scores of
    the adapted model's answers that another run left in the shared cache (other batches, or
    a concurrent run's last append) would make this run's base term, and its resume, depend on
    that run. Simulated by a cache whose records another run "computed" differently (shifted
    by 1 nat): a later run with the same answers scores them itself."""
    monkeypatch.setenv("STARLORA_CACHE", str(tmp_path / "cache"))
    small = ["task.pool_size=24", "task.test_size=4"]

    def base_term(name: str) -> list[float]:
        store = run_experiment(load_config(TINY, small), tmp_path / name, progress=False)
        assert store.config.scoring.base_scores == "adapted"  # the default
        return [r["pe_base"] for r in store.read_round(0, "scores.jsonl")]

    first = base_term("first")
    for cached in (tmp_path / "cache" / "scores").glob("*.jsonl"):
        rows = [json.loads(line) for line in cached.read_text().splitlines()]
        cached.write_text("".join(json.dumps({**r, "pe": r["pe"] + 1.0}) + "\n" for r in rows))
    assert base_term("second") == first
