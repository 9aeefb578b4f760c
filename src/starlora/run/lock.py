"""The run-wide lock: one `starlora run` at a time works in a run directory.

``.run.lock`` is held for the whole of `starlora.run.loop.run_experiment` (on the main
process), and ``.run.owner.json`` says who holds it (pid, host, since when), so a second run
on the same directory fails at once, naming the first, instead of computing the same rounds
and failing late. Labels written while a run is paused take the short-lived label lock
(`starlora.run.store.RunStore.lock`), not this one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from starlora.errors import RunInUseError
from starlora.io import read_json, write_json
from starlora.run.store import RunPaths, refuse_foreign


@contextlib.contextmanager
def hold_run(root: str | Path) -> Iterator[None]:
    """Hold the run-wide lock of `root` (``.run.lock``) while the block runs, so that a
    second `starlora run` on the same directory fails at once (RunInUseError naming the
    holder's pid and host, from ``.run.owner.json``) instead of computing the same
    rounds and failing late. Not reentrant: a second hold, even in this process, fails.
    A hold that ends with no run in `root` (a start that failed and undid itself,
    `RunStore.undo_start`) removes the lock file, and `root` too if it made it and it is
    empty: a failed command leaves no directory behind. (The file is unlinked while held:
    a second start never waits on it, it fails at once; and filelock from 4.3.2, the floor in
    pyproject.toml from Python 3.11, does not count a lock taken on a file that was unlinked
    meanwhile, so two starts cannot both hold one. On Python 3.10 an older filelock may: that
    needs three starts on one new directory within microseconds of a failed one.)"""
    from filelock import FileLock, Timeout

    paths = RunPaths(root)
    if not paths.config.is_file():
        refuse_foreign(paths)
    made = not paths.root.exists()
    paths.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(paths.run_lock, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            who = read_json(paths.run_owner)
            holder = f"pid {who['pid']} on {who['host']}, since {who['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            holder = "its owner is being recorded"
        raise RunInUseError(f"{paths.root}: another starlora run is working in this run "
                            f"directory ({holder}); wait for it to end or stop it") from None
    try:
        write_json(paths.run_owner, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        yield
    finally:
        paths.run_owner.unlink(missing_ok=True)
        no_run = not paths.config.is_file()
        if no_run:
            paths.run_lock.unlink(missing_ok=True)
        lock.release()
        if no_run and made:
            with contextlib.suppress(OSError):  # not empty: someone else's files stay
                paths.root.rmdir()
