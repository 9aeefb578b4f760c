"""Base-model results on disk, shared by the runs of one user and keyed by content.

A cache file is keyed by what changes every record in it (`base_cache_key`: a fingerprint of
the weights, dtype, measures, max_length, and for generations their settings); a record by the
token ids it was computed from (`sequence_key`), never by an example id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from starlora import distributed as dist
from starlora import zero3
from starlora.errors import ConfigError
from starlora.io import atomic_write
from starlora.models import cache_dir
from starlora.scoring.results import MEASURES, Scores
from starlora.tasks import Example


def sequence_key(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> str:
    """Identity of one scored sequence for `BaseScoreCache`: 32 hex digits of the sha256 of
    the prompt and answer token ids (after cutting to max_length), the boundary included."""
    blob = json.dumps([[int(t) for t in prompt_ids], [int(t) for t in answer_ids]])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def default_score_cache_dir() -> Path:
    """``<starlora cache>/scores``, shared by all runs of this user."""
    return cache_dir() / "scores"


def base_cache_key(
    fingerprint: str,
    *,
    measures: Sequence[str] = MEASURES,
    dtype: torch.dtype,
    max_length: int | None = None,
) -> dict[str, Any]:
    """The key of one base-score cache file: what, besides the tokens of each example (its
    `sequence_key`), changes base scores. `fingerprint`: `starlora.models.model_fingerprint` of
    the weights; `dtype`: the dtype the scores are computed in (not "auto"). A model without a
    fingerprint ("") cannot be cached (ConfigError): it would share a key with others.
    `starlora.scoring.score_base` adds the fixed batch shape its records are computed in (files
    without one, from before, held records computed in length-sorted batches: not read)."""
    if not fingerprint:
        raise ConfigError("base-score cache: the model has no fingerprint of its weights")
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"base-score cache: dtype must be a torch.dtype, got {dtype!r}")
    return {
        "version": 3,  # 1: records keyed by example id; 2: pe_mean/me_mean field names
        "model": fingerprint,
        "dtype": str(dtype),
        "measures": sorted(measures),
        "max_length": max_length,
    }


class BaseScoreCache:
    """Base-model scores on disk, one JSON record per scored sequence (its `sequence_key`).

    Lives in `directory` as ``<sha of key>.jsonl`` next to ``<sha of key>.key.json`` holding
    the key for humans. Records are appended chunk by chunk while computing (so an interrupted
    computation resumes), under a `filelock.FileLock` on ``<sha of key>.jsonl.lock``: runs in
    parallel share the file. Readers take no lock and never write; they skip a last line that
    is torn (being appended, or left by a crash). A writer, holding the lock, first cuts such
    a tail (nobody else is writing then, so it is a crashed writer's).
    """

    def __init__(self, directory: str | Path, key: dict[str, Any], chunk_size: int = 256):
        self.directory = Path(directory)
        self.key = dict(key)
        digest = hashlib.sha256(
            json.dumps(self.key, sort_keys=True, default=str).encode()
        ).hexdigest()[:20]
        self.path = self.directory / f"{digest}.jsonl"
        self.key_path = self.directory / f"{digest}.key.json"
        self.lock_path = self.directory / f"{digest}.jsonl.lock"
        self.chunk_size = chunk_size
        self.computed = 0  # sequences computed (not found) by the last get_or_compute

    def load(self) -> dict[str, dict[str, Any]]:
        """Records on disk by sequence key. Reads only: a line without its newline (torn) or
        that does not parse is skipped."""
        if not self.path.is_file():
            return {}
        records: dict[str, dict[str, Any]] = {}
        for line in self.path.read_bytes().splitlines(keepends=True):
            if line.endswith(b"\n"):
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    rec = json.loads(line)
                    records[rec["key"]] = rec
        return records

    def _append(self, records: list[dict[str, Any]]) -> None:
        blob = "".join(json.dumps(r) + "\n" for r in records).encode()
        from filelock import FileLock

        with FileLock(self.lock_path), open(self.path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # a crashed writer's torn last line: cut it
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)
            f.write(blob)  # O_APPEND: at the end; one write per chunk
            f.flush()
            os.fsync(f.fileno())

    def records(
        self, keys: Sequence[str], make: Callable[[list[int]], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """The record of each of `keys` (in order), making only those not on disk yet, each
        once: ``make(positions)`` returns the records of those positions of `keys`, in order.
        Before each chunk the file is read again, so records another process wrote meanwhile
        are not made twice."""
        have = self.load()
        self.computed = 0
        if zero3.lockstep():
            return self._records_in_lockstep(keys, make, have)
        todo: dict[str, int] = {}  # the first position of each key not on disk
        for i, k in enumerate(keys):
            if k not in have:
                todo.setdefault(k, i)
        missing = list(todo.items())
        if missing:
            self._start_file()
        for s in range(0, len(missing), self.chunk_size):
            if s:
                have.update(self.load())
            chunk = [(k, i) for k, i in missing[s : s + self.chunk_size] if k not in have]
            if not chunk:
                continue
            made = make([i for _, i in chunk])
            records = [{**r, "key": k} for (k, _), r in zip(chunk, made, strict=True)]
            self._append(records)
            self.computed += len(chunk)
            have.update((r["key"], r) for r in records)
        return [have[k] for k in keys]

    def _records_in_lockstep(
        self, keys: Sequence[str], make: Callable[[list[int]], list[dict[str, Any]]],
        have: dict[str, dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """`records` where every process must run as many forward passes as the others
        (`zero3.lockstep`; `keys`: each process's share, all of one length, as
        `starlora.distributed` deals them): if a record is missing on any process, every
        process makes its whole share, each position (repeats and padding too), in the same
        chunks, and appends the records not on disk yet; else every record is read."""
        if not dist.any_process(any(k not in have for k in keys)):
            return [have[k] for k in keys]
        self._start_file()
        for s in range(0, len(keys), self.chunk_size):
            positions = list(range(s, min(s + self.chunk_size, len(keys))))
            made = make(positions)
            have.update(self.load())  # another process's records of the same keys stay
            new: dict[str, dict[str, Any]] = {}
            for i, r in zip(positions, made, strict=True):
                if keys[i] not in have:
                    new.setdefault(keys[i], {**r, "key": keys[i]})
            if new:
                self._append(list(new.values()))
                self.computed += len(new)
                have.update(new)
        return [have[k] for k in keys]

    def _start_file(self) -> None:
        """Make the cache's directory and write its key file (for humans), before the first
        records are appended."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.key_path.is_file():
            atomic_write(self.key_path, json.dumps(self.key, indent=2, default=str).encode())

    def get_or_compute(
        self,
        examples: Sequence[Example],
        keys: Sequence[str],
        compute: Callable[[list[Example], list[str]], Scores],
    ) -> Scores:
        """Scores of `examples` (in order; `keys`: their `sequence_key`s), computing only the
        sequences not on disk yet (`records`)."""
        if len(keys) != len(examples):
            raise ValueError(f"{len(keys)} keys for {len(examples)} examples")

        def make(positions: list[int]) -> list[dict[str, Any]]:
            chunk = [examples[i] for i in positions]
            return compute(chunk, [keys[i] for i in positions]).to_records()

        found = self.records(keys, make)
        return Scores.from_records([{**r, "id": ex.id} for ex, r in zip(examples, found)])
