"""A full disk: `os.write` or `os.fsync` raise ENOSPC in the middle of an atomic write, an
import, or a save from the annotation page. The run directory stays byte for byte as it was
(no temporary file left behind), the user gets one line (`DiskFullError`), and the next
command works once there is space again.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from starlora.cli import main
from starlora.config import load_config
from starlora.errors import DiskFullError
from starlora.io import atomic_write
from starlora.run.store import RunStore

QUERIES = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "prompt": f"Q: {i} + {i}",
            "draft": str(2 * i), "uncertainty": 1.0 - i / 10, "round": 1} for i in range(4)]


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_write_after(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    """`os.write` writes at most `nbytes` bytes in all (a short write), then raises ENOSPC."""
    real, room = os.write, [nbytes]

    def write(fd: int, data: bytes) -> int:
        if room[0] <= 0:
            raise enospc()
        n = real(fd, bytes(data)[: room[0]])
        room[0] -= n
        return n

    monkeypatch.setattr(os, "write", write)


def fail_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """`os.fsync` raises ENOSPC (delayed allocation: the data did not fit after all)."""
    def fsync(fd: int) -> None:
        raise enospc()

    monkeypatch.setattr(os, "fsync", fsync)


FAILURES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "write at the start": lambda mp: fail_write_after(mp, 0),
    "write in the middle": lambda mp: fail_write_after(mp, 7),
    "fsync": fail_fsync,
}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (temporary files included), less the lock file."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("existing", [True, False])
def test_a_full_disk_leaves_the_file_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                failure: str, existing: bool) -> None:
    path = tmp_path / "state.json"
    if existing:
        path.write_text('{"round": 0}\n')
    before = snapshot(tmp_path)
    with monkeypatch.context() as mp:
        FAILURES[failure](mp)
        with pytest.raises(DiskFullError, match=f"{path}: no space left on the device"):
            atomic_write(path, '{"round": 1, "phase": "train"}\n' * 100)
    assert snapshot(tmp_path) == before  # old bytes (or no file), no temporary file
    atomic_write(path, "next\n")  # space again: the next write works
    assert path.read_text() == "next\n" and snapshot(tmp_path).keys() == {"state.json"}


def test_other_write_errors_still_raise_as_they_are(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "a.json", "{}")
    assert e.value.errno == errno.EIO and not isinstance(e.value, DiskFullError)
    assert not list(tmp_path.iterdir())


@pytest.fixture
def paused(tmp_path: Path) -> RunStore:
    """A run paused on a human query of 4 (q3 answered already)."""
    store = RunStore.create_or_resume(tmp_path / "run", load_config(
        None, ["active_learning.oracle=human"]))
    store.add_labels([{"id": "a", "round": 0, "answer": "x", "source": "simulated"}])
    store.write_queries(1, QUERIES)
    store.save_labels({"q3": "6"}, "import:first.jsonl")
    return store


@pytest.mark.parametrize("failure", FAILURES)
def test_an_import_on_a_full_disk_changes_nothing_and_can_be_run_again(
        paused: RunStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
        failure: str) -> None:
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": f"q{i}", "answer": str(2 * i)}) + "\n"
                               for i in range(3)))
    before = snapshot(paused.root)
    with monkeypatch.context() as mp:
        FAILURES[failure](mp)
        assert main(["import", str(paused.root), str(answers)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on the device" in err  # one line
    assert snapshot(paused.root) == before
    assert main(["import", str(paused.root), str(answers)]) == 0  # space again
    assert not RunStore.open(paused.root).pending()
    assert main(["status", str(paused.root)]) == 0


def test_a_save_from_the_page_on_a_full_disk_is_a_507_and_can_be_sent_again(
        paused: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from starlora.annotate.app import create_app

    client = TestClient(create_app(paused.root, "t"))
    auth = {"Authorization": "Bearer t"}
    before = snapshot(paused.root)
    with monkeypatch.context() as mp:
        fail_fsync(mp)
        response = client.post("/api/labels", json={"id": "q0", "answer": "0"}, headers=auth)
    assert response.status_code == 507 and "no space left" in response.json()["error"]
    assert snapshot(paused.root) == before
    response = client.post("/api/labels", json={"id": "q0", "answer": "0"}, headers=auth)
    assert response.status_code == 200 and response.json()["answered"] == 2
