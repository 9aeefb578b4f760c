"""Files, written so that nothing is ever half-written: the bottom layer every module uses.

A file is written to a temporary name in its own folder and renamed over the target
(`atomic_write`); a folder is built under a temporary name and swapped in (`atomic_folder`).
A process killed at any moment leaves the old or the new version, never a mix. Written files
and folders get the permissions a plain ``open(path, "w")`` or ``mkdir`` would give them.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import gc
import hashlib
import io as stdio
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from starlora.errors import (
    DataError,
    DiskFullError,
    LockTimeoutError,
    Problems,
    StarloraError,
)


def current_umask() -> int:
    """The process's umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (str as UTF-8) to `path` via a temporary file, fsync and rename.
    Returns `path`. On any error the temporary file is removed and `path` is as it was; a
    full disk (ENOSPC, EDQUOT) raises `DiskFullError` naming `path`; a folder at `path`, or a
    file where a folder above it should be, a `StarloraError` naming it."""
    path = Path(path)
    if path.is_dir():
        raise StarloraError(f"{path}: is a folder; give a file name")
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        try:
            view = memoryview(data.encode("utf-8") if isinstance(data, str) else data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600 files
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return path
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path}: no space left on the device ({e.strerror}); the "
                                "file is as it was: free some space and run the command "
                                "again") from e
        raise


def make_folder(path: str | Path) -> Path:
    """`path` as a folder, made with its parents where missing; a file in the way is a
    `StarloraError` naming it (not an OSError's traceback)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StarloraError(f"{path}: not a folder (a file of that name is in the way, here "
                            "or above); give another") from None
    return path


@contextlib.contextmanager
def atomic_folder(directory: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; when the block ends without an error its
    files are synced to disk and it replaces `directory` (an existing one is swapped out and
    removed). On an error the temporary folder is removed and `directory` is left as it was,
    put back if the error came between the two renames. A process killed between them leaves
    the old folder as ``.<name>-old-<pid>`` beside it (a run retrains a lost adapter)."""
    directory = Path(directory)
    make_folder(directory.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    old = None
    try:
        yield tmp
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes a 0700 folder
        for path in [*(f for f in tmp.rglob("*") if f.is_file()), tmp]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if directory.exists():  # a folder cannot be renamed onto a non-empty one: swap it out
            old = directory.with_name(f".{directory.name}-old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not directory.exists():
            os.replace(old, directory)  # the new one did not arrive: the old one stays
        elif old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> Path:
    """`obj` as indented JSON, atomically."""
    return atomic_write(path, json.dumps(obj, indent=1) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line, atomically."""
    return atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def parse_json(text: str | bytes) -> Any:
    """`json.loads` for text a person wrote: ValueError with a short reason for anything that
    is not JSON, including what `json.loads` raises other errors for (nesting too deep for the
    parser: RecursionError; an integer too long to convert: a plain ValueError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(e.msg) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string ..."
        raise ValueError(str(e).split(":")[0]) from None


def json_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of each non-blank line of JSON Lines `text`. Lines end at
    "\n" only (a "\r" before it is dropped): JSON strings may hold U+2028 and other
    characters that `str.splitlines` would break a line at."""
    start, number = 0, 0
    while start <= len(text):  # one line at a time: no list of every line of a large file
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        line, start, number = text[start:end].removesuffix("\r"), end + 1, number + 1
        if line.strip():
            yield number, line


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def jsonl_records(text: str, where: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number, value) of each non-blank line of JSON Lines `text` read from
    `where`: the one JSON Lines reader (data files, answer files, run directories). A line
    that is not JSON yields a `DataError` naming ``where:line`` as its value: the caller
    raises it, or collects it to report every problem at once (`starlora.errors.Problems`)."""
    for number, line in json_lines(text):
        try:
            value = parse_json(line)
        except ValueError as e:
            value = DataError(where, number, None, f"not valid JSON ({e})")
        yield number, value


def csv_records(text: str, where: str, required: Sequence[str] = ()) -> Iterator[
        tuple[int, dict[str, str | None] | DataError]]:
    """(line number, ``{column: cell}``) of each row of CSV `text` (a header row first) read
    from `where`: the one CSV reader (data files, answer files). A row with more cells than
    the header yields a `DataError` as its value, as does a row the csv module cannot read
    (the last value then: reading stops); a row with fewer cells has None for the missing
    ones. A `required` column missing from the header raises at once (line 1), naming the
    columns the header has (`separator_hint`: a file separated otherwise). The line is
    the row's last physical line; for a row that cannot be read, its first (a quote left open
    would otherwise take the rest of the file into one cell: the reader is strict)."""
    reader = csv.DictReader(stdio.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        header, missing = reader.fieldnames or [], Problems()  # reads the header row
        has = (f"the header has: {', '.join(map(repr, header))}" if header
               else "no header row") + (f"; {hint}" if (hint := separator_hint(header)) else "")
        for name in required:
            if name not in header:
                missing.add(DataError(where, 1, name, f"missing column ({has})"))
        missing.raise_if_any()
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                yield reader.line_num, DataError(where, reader.line_num, None,
                                                 "more cells than header columns")
            else:
                yield reader.line_num, row
            start = reader.line_num + 1
    except csv.Error as e:
        hint = "; a quote opened here is not closed" if "end of data" in str(e) else ""
        yield start, DataError(where, start, None, f"not valid CSV ({e}{hint})")


def separator_hint(columns: Sequence[str]) -> str:
    """What to do about a CSV header read as one column that holds semicolons or tabs (a
    spreadsheet saved it with its locale's list separator), or "" for any other header."""
    if len(columns) == 1:
        for sep, name in ((";", "semicolons"), ("\t", "tabs")):
            if sep in columns[0]:
                return f"it looks separated by {name}: save the file comma-separated"
    return ""


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file that a person may have
    edited (a run directory given to the report, a run's labels); DataError names the file
    and line of a line that is not valid UTF-8 or not a JSON object. The caller checks that
    the file exists."""
    return _records(Path(path).read_bytes(), Path(path))


def _records(data: bytes, path: Path) -> list[tuple[int, dict]]:
    """`read_records` of the bytes `data` read from `path`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(str(path), data.count(b"\n", 0, e.start) + 1, None,
                        f"not valid UTF-8 (byte {e.start})") from None
    out = []
    for lineno, rec in jsonl_records(text, str(path)):
        if isinstance(rec, DataError):
            raise rec
        if not isinstance(rec, dict):
            raise DataError(str(path), lineno, None, "not a JSON object")
        out.append((lineno, rec))
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSONL file written by this package ([] when it does not exist).
    User data files go through `starlora.datafiles.load_examples`, which names bad lines."""
    path = Path(path)
    if not path.is_file():
        return []
    with gc_paused():
        return [rec for _, rec in read_records(path)]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while parsing many JSON values (they hold no
    reference cycles). Its full passes walk every live object, so with a large pool in
    memory reading N rows cost more than N times one row (measured: 500,000 score rows
    beside a million examples, 2.0 s with it, 1.3 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class ParsedJsonl:
    """JSONL files parsed once per content: `rows` reads and hashes the file on every call
    (cheap) and parses it again only when its bytes changed, whichever process wrote them. A
    server that reads the same files on every request (`starlora annotate`: the labels and
    the open query) parses them once per change."""

    def __init__(self) -> None:
        self._parsed: dict[Path, tuple[bytes, list[dict]]] = {}

    def rows(self, path: str | Path,
             check: Callable[[Path, list[tuple[int, dict]]], None] | None = None) -> list[dict]:
        """The objects of JSONL file `path` ([] when absent), as `read_jsonl` gives them;
        the caller gets its own copies. `check(path, [(line, object), ...])`, when given, runs
        on each new content before it is kept (its error is raised on every call)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        digest = hashlib.blake2b(data, digest_size=16).digest()
        cached = self._parsed.get(path)
        if cached is None or cached[0] != digest:
            with gc_paused():
                records = _records(data, path)
            if check is not None:
                check(path, records)
            cached = self._parsed[path] = (digest, [rec for _, rec in records])
        return [dict(r) for r in cached[1]]


_THREAD_LOCKS: dict[Path, threading.RLock] = {}  # lock file -> the in-process lock before it
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float, what: str = "the lock") -> Iterator[None]:
    """Hold the `filelock.FileLock` on `path` (reentrant within a thread) while the block
    runs; LockTimeoutError naming `what` after `timeout` s. Threads of one process first
    queue on an in-process lock, so they wait in turn instead of polling the file (filelock
    retries every 50 ms: twenty threads saving at once would mostly sleep)."""
    from filelock import FileLock, Timeout

    path = Path(path)
    start = time.monotonic()
    with _THREAD_LOCKS_GUARD:
        local = _THREAD_LOCKS.setdefault(path.resolve(), threading.RLock())
    if not local.acquire(timeout=timeout):
        raise LockTimeoutError(f"{path}: another thread holds {what} for over {timeout:g} s")
    try:
        # the timeout goes to acquire, not to FileLock: a singleton refuses to be made again
        # with other arguments, and callers nest locks with different timeouts
        lock = FileLock(path, is_singleton=True)
        try:
            lock.acquire(timeout=max(0.0, timeout - (time.monotonic() - start)))
        except Timeout:
            raise LockTimeoutError(f"{path}: another process holds {what} for over "
                                   f"{timeout:g} s") from None
        try:
            yield
        finally:
            lock.release()
    finally:
        local.release()
