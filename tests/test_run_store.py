from __future__ import annotations

import os
from pathlib import Path

import pytest

from starlora.config import load_config
from starlora.errors import ConfigError, DataError, StarloraError
from starlora.io import atomic_write, read_jsonl
from starlora.run.store import RunStore


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a" / "f.txt", "one")
    atomic_write(tmp_path / "a" / "f.txt", "two")
    assert (tmp_path / "a" / "f.txt").read_text() == "two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.txt"]


def test_atomic_folder_swaps_in_whole_and_keeps_the_old_one_on_a_failed_swap(
        tmp_path: Path, monkeypatch) -> None:
    """A folder (an adapter) is replaced whole; an error after the old one was moved aside
    and before the new one arrived puts the old one back (it was deleted: neither was left),
    and an error in the block leaves the folder as it was."""
    import os

    import pytest

    from starlora.io import atomic_folder

    target = tmp_path / "adapter"
    with atomic_folder(target) as tmp:
        (tmp / "w.bin").write_bytes(b"one")
    with atomic_folder(target) as tmp:
        (tmp / "w.bin").write_bytes(b"two")
    assert (target / "w.bin").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "w.bin").write_bytes(b"half")
        raise RuntimeError("killed while saving")
    real = os.replace

    def second_rename_fails(src, dst):
        if Path(src).name.startswith(".adapter-") and "-old-" not in Path(src).name:
            raise OSError("the disk went away")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="went away"), atomic_folder(target) as tmp:
        (tmp / "w.bin").write_bytes(b"three")
    monkeypatch.setattr(os, "replace", real)
    assert (target / "w.bin").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_phases_labels_and_metrics(tmp_path: Path) -> None:
    store = RunStore.create_or_resume(tmp_path / "run", load_config())
    assert not store.done(0, "train")
    store.set_state(0, "evaluate")
    assert store.done(0, "train") and store.done(0, "evaluate") and not store.done(0, "score")
    assert not store.done(1, "train")
    store.set_state(1, None)
    assert store.done(0, "label") and not store.done(1, "train")

    store.add_labels([{"id": "a", "round": 0, "answer": "x"}])
    with pytest.raises(StarloraError, match="labelled twice"):
        store.add_labels([{"id": "a", "round": 1, "answer": "x"}])
    assert [r["id"] for r in store.labelled()] == ["a"]

    store.record_metrics({"round": 1, "accuracy": 0.5})
    store.record_metrics({"round": 0, "accuracy": 0.1})
    store.record_metrics({"round": 1, "accuracy": 0.6})  # a redone round replaces its line
    assert read_jsonl(store.root / "metrics.jsonl") == [{"round": 0, "accuracy": 0.1},
                                                        {"round": 1, "accuracy": 0.6}]

    store.write_round(2, "selected.jsonl", [{"id": "a"}])
    assert store.read_round(2, "selected.jsonl") == [{"id": "a"}]
    assert store.paths.test_uncertainty(2) == store.root / "rounds/2/test_uncertainty.jsonl"
    with pytest.raises(ValueError, match="'selection.jsonl' is not a round file"):
        store.write_round(2, "selection.jsonl", [])  # misspelt: would never be read


def test_resume_accepts_harmless_changes_only(tmp_path: Path) -> None:
    RunStore.create_or_resume(tmp_path / "run", load_config())
    store = RunStore.create_or_resume(tmp_path / "run", load_config(None, ["active_learning.rounds=12",
                                                                           "evaluation.batch_size=4"]))
    assert RunStore.open(tmp_path / "run").config.active_learning.rounds == 12
    assert store.config.evaluation.batch_size == 4
    with pytest.raises(ConfigError, match=r"seed, lora\.r"):
        RunStore.create_or_resume(tmp_path / "run", load_config(None, ["seed=3", "lora.r=8"]))


def test_a_resume_on_another_pool_is_refused_and_names_the_labelled_file(tmp_path: Path) -> None:
    store = RunStore.create_or_resume(tmp_path / "run", load_config())
    store.check_pool(3, "aaa", "pool.jsonl")
    store.check_pool(3, "aaa", "pool.jsonl")  # the same pool: resumes
    with pytest.raises(DataError, match="pool differs") as plain:
        store.check_pool(2, "bbb", "pool.jsonl")
    assert "mine.jsonl" not in str(plain.value)
    # a run from before a labelled record's twin left the pool: the message says why
    with pytest.raises(DataError, match=r"repeats a record of mine\.jsonl under another id"):
        store.check_pool(2, "bbb", "pool.jsonl", "mine.jsonl")
    assert store.pool_size() == 3  # the record is untouched


def test_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep")
    with pytest.raises(StarloraError, match="not a run directory"):
        RunStore.create_or_resume(tmp_path / "x", load_config())
    assert (tmp_path / "x" / "precious.txt").read_text() == "keep"


def test_atomic_files_get_ordinary_permissions(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "f.json", "{}")
    plain = tmp_path / "plain"
    plain.write_text("")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_second_run_on_a_run_directory_fails_at_once_naming_the_holder(tmp_path, capsys):
    """Issue 36, bug 6: two `starlora run` on one directory both computed and the second
    failed late. The first holds the run-wide lock; the second exits 2 before it writes or
    loads anything, naming the holder's pid and host. A holder killed with SIGKILL leaves a
    stale owner file, which does not stop the next run."""
    import signal
    import socket
    import subprocess
    import sys

    from starlora.cli import main
    from starlora.errors import RunInUseError
    from starlora.run.lock import hold_run

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom starlora.run.lock import hold_run\n"
         "with hold_run(sys.argv[1]):\n    print('held', flush=True)\n"
         "    time.sleep(120)\n", str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
        assert main(["run", str(config), "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on {socket.gethostname()}" in err and "another starlora run" in err
        assert not (run_dir / "config.yaml").exists()  # nothing written, no model loaded
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / ".run.owner.json").exists()  # stale: its process is gone
    with hold_run(run_dir):
        with pytest.raises(RunInUseError, match=f"pid {os.getpid()}"):
            with hold_run(run_dir):
                pass
    assert not (run_dir / ".run.owner.json").exists()
    RunStore.create_or_resume(run_dir, load_config(config))  # the lock files are no obstacle


def test_labels_and_queries_are_parsed_once_per_content(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store re-reads a file another store (another process) rewrote, even at the same size;
    an unchanged file is not parsed again, and callers cannot change what the next one reads."""
    import starlora.io as store_module  # where ParsedJsonl parses

    config = load_config(None, ["active_learning.oracle=human"])
    one = RunStore.create_or_resume(tmp_path / "run", config)
    other = RunStore.open(tmp_path / "run")
    one.write_queries(1, [{"id": "q0"}, {"id": "q1"}])
    assert one.pending() == [{"id": "q0"}, {"id": "q1"}]
    other.save_labels({"q0": "12"}, "import:a")
    assert [r["answer"] for r in one.labelled()] == ["12"]
    other.save_labels({"q0": "13"}, "import:a")  # same size, same second
    assert [r["answer"] for r in one.labelled()] == ["13"]
    one.labelled()[0]["answer"] = "changed by a caller"
    assert one.labelled()[0]["answer"] == "13"
    parsed, real = [], store_module.json_lines
    monkeypatch.setattr(store_module, "json_lines", lambda text: parsed.append(1) or real(text))
    for _ in range(3):
        assert len(one.queries(1)) == 2 and len(one.labelled()) == 1
    assert parsed == []
