"""A run's identity beyond its config (issue 36, bugs 4 and 5): the precision `auto` resolved to
and the contents of its data, recorded when it starts and checked on every resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import starlora.models
from starlora.cli import main
from starlora.config import load_config
from starlora.errors import ConfigError, DataError, StarloraError
from starlora.io import read_json, read_jsonl, write_jsonl
from starlora.run.calibrate import calibrate
from starlora.run.loop import run_experiment
from starlora.run.protocol import protocol_id
from starlora.run.store import RunStore
from starlora.run.uncertainty import write_test_uncertainty
from starlora.tasks import get_task

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def set_cpu_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Make `auto` resolve as on a CPU with (or without) native bf16."""
    monkeypatch.setattr(starlora.models, "cpu_has_native_bf16", lambda: native)


def overrides(folder: Path, rounds: int = 1) -> list[str]:
    return ["task.name=gsm8k", f"task.train={folder / 'pool.jsonl'}", f"task.test={folder / 'test.jsonl'}",
            "task.pool_size=24", "task.test_size=4", "evaluation.max_new_tokens=4",
            f"active_learning.rounds={rounds}"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-round run of configs/tiny.yaml on data files (arith problems read as
    gsm8k records), computed in fp32 (`auto` on a CPU without native bf16)."""
    folder = tmp_path_factory.mktemp("identity")
    task = get_task("arith")
    for split, n in (("train", 24), ("test", 4)):
        write_jsonl(folder / ("pool.jsonl" if split == "train" else "test.jsonl"),
                    [{"id": ex.id, "question": ex.question, "answer": ex.answer}
                     for ex in task.generate(split, n, 5)])
    with pytest.MonkeyPatch.context() as mp:
        set_cpu_bf16(mp, False)
        run_experiment(load_config(TINY, overrides(folder)), folder / "run", progress=False)
    return folder


def copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run (its config names the fixture's data files)."""
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def edit(finished: Path):
    """Edit a data file of the fixture for one test (restored after it)."""
    saved = {}

    def change(name: str, fn) -> Path:
        path = finished / name
        saved.setdefault(path, path.read_bytes())
        rows = read_jsonl(path)
        fn(rows)
        write_jsonl(path, rows)
        return path

    yield change
    for path, data in saved.items():
        path.write_bytes(data)


def test_the_resolved_precision_is_recorded_and_in_the_protocol_id(finished: Path) -> None:
    identity = read_json(finished / "run" / "identity.json")
    fp32 = {"model.dtype": "float32", "scoring.dtype": "float32",
            "training.mixed_precision": "no"}
    assert identity["precision"] == fp32 and identity["legacy"] is False
    config = load_config(TINY, overrides(finished))
    protocol = read_jsonl(finished / "run" / "metrics.jsonl")[0]["protocol"]
    assert protocol == protocol_id(config, fp32) and protocol.endswith("-fp32_fp32_fp32")
    bf16 = dict(fp32, **{"scoring.dtype": "bfloat16", "training.mixed_precision": "bf16"})
    assert protocol_id(config, bf16).endswith("-fp32_bf16_bf16")  # never one comparison
    assert protocol_id(config, bf16).rsplit("-", 1)[0] == protocol_id(config)


def test_a_resume_in_another_precision_is_refused_unless_allowed(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """An fp32 run resumed where `auto` means bf16 (a GPU, a bf16 CPU) is refused before any
    round is computed; --allow-precision-change lets it go on and records the change."""
    run_dir = copy(finished, tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    set_cpu_bf16(monkeypatch, True)
    config = load_config(TINY, overrides(finished, rounds=2))
    with pytest.raises(ConfigError, match="another precision .*scoring.dtype: float32 -> "
                       "bfloat16; training.mixed_precision: no -> bf16"):
        run_experiment(config, run_dir, progress=False)
    assert read_json(run_dir / "state.json") == json.loads(before["state.json"])
    assert (run_dir / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert not (run_dir / "rounds" / "1").exists()
    # the refused resume's config (2 rounds, not 1) is not written: `starlora run --run-dir`
    # resumes what the run was (it wrote config.yaml before the precision was checked)
    assert (run_dir / "config.yaml").read_bytes() == before["config.yaml"]
    args = ["run", str(TINY), "--run-dir", str(run_dir)]
    args += [a for o in overrides(finished, rounds=2) for a in ("--set", o)]
    assert main(args) == 2 and "--allow-precision-change" in capsys.readouterr().err
    assert main([*args, "--allow-precision-change"]) == 0
    identity = read_json(run_dir / "identity.json")
    assert identity["precision"]["scoring.dtype"] == "float32"  # what the run started with
    assert identity["precision_changes"] == [{"round": 0, "after_phase": "evaluate", "precision": {
        "model.dtype": "float32", "scoring.dtype": "bfloat16", "training.mixed_precision": "bf16"}}]
    protocols = {m["protocol"] for m in read_jsonl(run_dir / "metrics.jsonl")}
    assert len(protocols) == 1  # the run keeps its protocol id


def test_uncertainty_and_calibrate_refuse_another_precision_than_the_runs(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`starlora uncertainty` and `starlora calibrate` load the model again: where `auto`
    resolves to bf16 they would score an fp32 run's adapter in bf16; both refuse, naming
    identity.json, and write nothing."""
    run_dir = copy(finished, tmp_path)
    set_cpu_bf16(monkeypatch, True)
    match = r"identity.json: the run computed in another precision .*scoring.dtype: float32 -> bfloat16"
    with pytest.raises(ConfigError, match=match):
        write_test_uncertainty(run_dir, progress=False)
    with pytest.raises(ConfigError, match=match):
        calibrate(str(run_dir), progress=False)
    assert not list(run_dir.glob("rounds/*/test_uncertainty.jsonl"))
    assert not list(run_dir.glob("rounds/*/calibration.json"))


@pytest.mark.parametrize("split,file", [("test", "test.jsonl"), ("pool", "pool.jsonl")])
def test_a_resume_on_edited_data_is_refused_naming_the_file(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit, split: str,
        file: str) -> None:
    """An answer edited in the test or pool file (same ids: the pool's id hash alone missed
    it, the test set was not checked at all) is refused on resume, naming the file."""
    run_dir = copy(finished, tmp_path)
    set_cpu_bf16(monkeypatch, False)
    path = edit(file, lambda rows: rows[0].update(answer=rows[0]["answer"] + "1"))
    config = load_config(TINY, overrides(finished, rounds=2))
    with pytest.raises(DataError, match=f"{path}: the {split} examples differ from "
                       f"those {run_dir} started with"):
        run_experiment(config, run_dir, progress=False)
    assert not (run_dir / "rounds" / "1").exists()


def test_a_run_from_before_the_identity_records_it_on_resume(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit) -> None:
    """A legacy run (no identity.json) is resumed, not refused: the resume records its data
    (and, once it computes again, its precision, marked legacy so that its protocol id keeps
    no precision suffix), and from then on an edit is refused."""
    from starlora.run.identity import check_precision
    from starlora.run.store import RunStore

    run_dir = copy(finished, tmp_path)
    (run_dir / "identity.json").unlink()
    set_cpu_bf16(monkeypatch, False)
    run_experiment(load_config(TINY, overrides(finished)), run_dir, progress=False)  # finished
    # its data, and the plan of its stored config (the rounds that size its λ from now on)
    assert read_json(run_dir / "identity.json").keys() == {"data", "plan"}
    assert read_json(run_dir / "identity.json")["plan"] == {"rounds": 1}
    store = RunStore.open(run_dir)
    fp32 = read_json(finished / "run" / "identity.json")["precision"]
    assert check_precision(store, fp32, store.state()) is None  # legacy: no suffix
    assert read_json(run_dir / "identity.json")["legacy"] is True
    edit("test.jsonl", lambda rows: rows[1].update(question=rows[1]["question"] + " Again?"))
    with pytest.raises(DataError, match="test.jsonl: the test examples differ"):
        run_experiment(load_config(TINY, overrides(finished, rounds=2)), run_dir,
                       progress=False)


def one_more_round(finished: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys) -> str:
    """`starlora run` on `run_dir` (a copy of the finished fixture) for a second round, in
    fp32 as the fixture ran; what it printed."""
    set_cpu_bf16(monkeypatch, False)
    args = ["run", str(TINY), "--run-dir", str(run_dir)]
    args += [a for o in overrides(finished, rounds=2) for a in ("--set", o)]
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr()
    return said.out + said.err


def test_a_resume_on_another_machine_goes_on_with_a_warning_and_records_it(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The study's lesson: a run resumed on another CPU (Zen 4 -> Xeon with AMX) rounds bf16
    otherwise. It is not refused (same precision, same procedure) but the resume says so and
    identity.json records where the machine changed; resuming there again says nothing."""
    import starlora.run.identity as identity

    here = read_json(finished / "run" / "identity.json")["machine"]
    assert here == identity.machine("cpu") and here["device"] == "cpu" and here["name"]
    run_dir = copy(finished, tmp_path)
    other = {"device": "cpu", "name": "AMD EPYC 9B14", "flags": ["avx2", "avx512_bf16"]}
    monkeypatch.setattr(identity, "machine", lambda device: other)
    said = one_more_round(finished, run_dir, monkeypatch, capsys)
    assert "computed on another machine until now" in said and "AMD EPYC 9B14" in said
    recorded = read_json(run_dir / "identity.json")
    assert recorded["machine"] == here  # what the run started on
    assert recorded["machine_changes"] == [{"round": 0, "after_phase": "evaluate",
                                            "machine": other}]
    assert identity.check_machine(RunStore.open(run_dir), other,
                                  {"round": 1, "phase": "evaluate"}) is None
    assert read_json(run_dir / "identity.json") == recorded


def test_a_resume_with_another_thread_count_is_a_machine_change_an_old_record_is_not(
        tmp_path: Path) -> None:
    """bf16 on a CPU rounds differently with another number of threads (a run killed on two
    threads and resumed on one did not end as one run on one thread): the machine record
    holds the count, and a resume with another one is recorded with a warning. A record from
    before the count was kept agrees with any count (no warning for every old run)."""
    import starlora.run.identity as identity

    here = identity.machine("cpu")
    assert isinstance(here["threads"], int) and here["threads"] >= 1
    state = {"round": 2, "phase": "train"}
    old_run = RunStore.create_or_resume(tmp_path / "old", load_config())
    old = {k: v for k, v in here.items() if k != "threads"}
    assert identity.check_machine(old_run, old, state) is None  # recorded, as a new run does
    assert identity.check_machine(old_run, here, state) is None  # the old record agrees
    assert "machine_changes" not in read_json(old_run.paths.identity)
    store = RunStore.create_or_resume(tmp_path / "run", load_config())
    assert identity.check_machine(store, here, state) is None
    more = {**here, "threads": here["threads"] + 1}
    warning = identity.check_machine(store, more, state)
    assert warning and f"{here['threads'] + 1} threads" in warning
    assert read_json(store.paths.identity)["machine_changes"] == [
        {"round": 2, "after_phase": "train", "machine": more}]


def test_a_resume_on_other_weights_goes_on_with_a_warning_and_records_it(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The base model's fingerprint is recorded when a run starts; a resume whose weights
    differ (a Hub id's default branch moved on, a folder retrained in place) says so and
    records where they changed, as a machine change is (it went on in silence)."""
    import starlora.models as models

    recorded = read_json(finished / "run" / "identity.json")["weights"]
    assert recorded.startswith("tiny:")
    run_dir = copy(finished, tmp_path)
    monkeypatch.setattr(models, "model_fingerprint", lambda *a, **k: "tiny:" + "e" * 64)
    said = one_more_round(finished, run_dir, monkeypatch, capsys)
    assert "the base model's weights are not the ones it computed with" in said
    identity = read_json(run_dir / "identity.json")
    assert identity["weights"] == recorded
    assert identity["weights_changes"] == [{"round": 0, "after_phase": "evaluate",
                                            "weights": "tiny:" + "e" * 64}]


def test_the_stop_set_is_part_of_the_data_a_resume_must_keep(tmp_path: Path) -> None:
    """An edited stop-set question (the stop set is drawn from the pool and leaves it) was
    accepted on resume, and the stopping signals then compared answers to other prompts.
    A run recorded before the stop set was hashed takes the hash on its next resume."""
    from starlora.run.identity import check_data, data_hashes
    from starlora.tasks import Example

    config = load_config(None, ["active_learning.stop_set=2"])
    pool, test = [Example(f"p{i}", f"{i} + 1?", str(i + 1)) for i in range(4)], []
    stop = [Example("s0", "7 + 1?", ""), Example("s1", "8 + 1?", "")]
    store = RunStore.create_or_resume(tmp_path / "run", config)
    check_data(store, data_hashes(config, pool, test, [], stop))
    assert set(read_json(store.paths.identity)["data"]) == {"pool", "test", "stop"}
    check_data(store, data_hashes(config, pool, test, [], stop))  # the same: accepted
    edited = [stop[0], Example("s1", "8 + 2?", "")]
    with pytest.raises(DataError, match="the stop set examples differ"):
        check_data(store, data_hashes(config, pool, test, [], edited))
    old = RunStore.create_or_resume(tmp_path / "old", config)
    check_data(old, data_hashes(config, pool, test, []))  # recorded without it
    check_data(old, data_hashes(config, pool, test, [], stop))
    assert read_json(old.paths.identity)["data"]["stop"] == data_hashes(
        config, pool, test, [], stop)["stop"]


def test_a_run_killed_while_writing_its_first_config_starts_again(tmp_path: Path) -> None:
    """A kill between the temporary file and the rename of the first config.yaml left a
    folder that every later start refused as "not a run directory"."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".config.yaml.x7k2q9").write_text("seed: 0\n")
    store = RunStore.create_or_resume(tmp_path / "run", load_config())
    assert store.paths.config.is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StarloraError, match="exists and is not a run directory"):
        RunStore.create_or_resume(tmp_path / "other", load_config())


def test_uncertainty_and_calibrate_refuse_edited_data(finished: Path, tmp_path: Path,
                                                      edit) -> None:
    """`starlora uncertainty` and `calibrate` rebuild the run's data from its config: an
    edited test question (same id and answer) is refused as a resume is, naming the file
    (they compared ids and gold answers only, and scored the new prompts)."""
    run_dir = copy(finished, tmp_path)
    edit("test.jsonl", lambda rows: rows[1].update(question=rows[1]["question"] + " Again?"))
    for command in (lambda: write_test_uncertainty(run_dir, progress=False),
                    lambda: calibrate(str(run_dir), progress=False)):
        with pytest.raises(DataError, match="test.jsonl: the test examples differ"):
            command()
    assert not list(run_dir.glob("rounds/*/test_uncertainty.jsonl"))
    assert not list(run_dir.glob("rounds/*/calibration.json"))


def test_the_first_plan_is_recorded_once(tmp_path: Path) -> None:
    """identity.json keeps the rounds a run planned when it started (they size its λ schedule
    for good); a later, longer plan does not replace it. A run from before the record gets the
    plan of its stored config."""
    from starlora.run import identity

    store = RunStore.create_or_resume(tmp_path / "run", load_config(TINY))
    assert identity.first_plan(store, 3) == 3
    assert identity.first_plan(store, 7) == 3  # an extension: the first plan stays
    assert read_json(store.paths.identity)["plan"] == {"rounds": 3}
