"""Data files: records in, validated `Example`s out.

`load_examples` reads

* JSONL (``.jsonl``, ``.json`` with one object per line);
* CSV (``.csv``, a header row);
* Parquet (``.parquet``, through `datasets`);
* a Hugging Face dataset: ``hf:<id or local folder>[@<config>]:<split>``, through
  ``datasets.load_dataset`` (works offline on a local folder or a warm cache).

Every record needs a non-empty string question; the answer is required unless
``require_answer=False`` (an unlabelled pool). A problem raises `DataError` naming the file,
the line (JSONL/CSV; the row number for Parquet and datasets, counted from 1), the field and,
given one, the file's role in the run (pool, test, labelled). Problems with records are
collected: the error lists every one (up to 20, then how many more).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starlora.errors import DataError, Problems
from starlora.io import csv_records, jsonl_records, separator_hint
from starlora.tasks import Example, Task

FORMATS = ("jsonl", "csv", "parquet", "hf")


def derive_id(line: int, question: str, answer: str | None) -> str:
    """Id for a record without one: position plus a content hash, e.g. ``L000012-3f9a0c1d``.

    The position keeps genuinely duplicated records apart; the hash makes a changed file
    show up as changed ids rather than silently relabelling other records. A record without
    an answer hashes its question alone; adding an answer to it gives it another id (a file
    that may be edited during a run needs ids of its own).
    """
    content = question if answer is None else f"{question}\x1f{answer}"
    return f"L{line:06d}-{hashlib.sha1(content.encode()).hexdigest()[:8]}"


def file_format(source: str | Path) -> str:
    """``jsonl``, ``csv``, ``parquet`` or ``hf`` for a data source (by its name)."""
    text = str(source)
    if text.startswith("hf:"):
        return "hf"
    suffix = Path(text).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".parquet"):
        return suffix[1:]
    raise DataError(text, None, None, f"unknown file type {suffix!r}: use .jsonl, .csv, "
                                      ".parquet or hf:<dataset>[@<config>]:<split>")


def _records(source: str) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) of every record of `source`; a line that is not a record
    yields a `DataError` as its record, a file that cannot be read raises one."""
    fmt = file_format(source)
    if fmt == "hf":
        yield from _hf_records(source)
        return
    path = Path(source)
    if not path.is_file():  # a relative path: to where starlora runs, which a resume may not
        raise DataError(source, None, None, "no such file" if path.is_absolute()
                        else f"no such file in {Path.cwd()}")
    if fmt == "parquet":
        from datasets import Dataset

        try:
            rows = Dataset.from_parquet(str(path))
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(source, None, None, f"not a readable Parquet file ({e})") from None
        yield from enumerate(rows, start=1)
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is not text
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(source, line, None, f"not valid UTF-8 (byte {e.start})") from None
    del raw  # a large file's bytes need not stay beside its text
    yield from (csv_records if fmt == "csv" else jsonl_records)(text, source)


def _hf_records(source: str) -> Iterator[tuple[int, Any]]:
    spec = source[len("hf:"):]
    name, sep, split = spec.rpartition(":")
    if not sep or not name or not split:
        raise DataError(source, None, None, "expected hf:<dataset>[@<config>]:<split>")
    name, _, config = name.partition("@")
    from datasets import load_dataset

    try:
        rows = load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, unknown dataset, unknown split: all "cannot load"
        raise DataError(source, None, None,
                        f"cannot load the dataset ({type(e).__name__}: {e})") from None
    yield from enumerate(rows, start=1)


def _text(source: str, line: int, record: dict, name: str, required: bool) -> str | None:
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip() and not required):
        if required:
            raise DataError(source, line, name, "missing")
        return None
    if not isinstance(value, str):
        raise DataError(source, line, name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(source, line, name, "empty")
    return value


def _example(source: str, line: int, record: dict, task: Task, problems: Problems,
             question_field: str, answer_field: str, id_field: str,
             require_answer: bool) -> Example | None:
    """`record` as an Example, or None after adding each of its problems to `problems`."""
    bad = problems.count

    def text(name: str, required: bool) -> str | None:
        try:
            return _text(source, line, record, name, required)
        except DataError as e:
            problems.add(e)
            return None

    question, answer = text(question_field, True), text(answer_field, require_answer)
    if question is not None:
        question = task.normalize_question(question)
        problem = task.check_question(question)
        if problem:
            problems.add(DataError(source, line, question_field, problem))
    if answer is not None:
        problem = task.check_answer(answer)
        if problem:
            problems.add(DataError(source, line, answer_field, f"{problem}: {answer[:60]!r}"))
    rid = record.get(id_field)
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))
                            or str(rid) == ""):
        problems.add(DataError(source, line, id_field, "must be a non-empty string or int"))
    if problems.count > bad or question is None:
        return None
    rid = str(rid) if rid is not None else derive_id(line, question, answer)
    return Example(rid, question, answer, {"source": f"{source}:{line}"})


def load_examples(
    source: str | Path,
    task: Task,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str = "id",
    limit: int | None = None,
    dedupe: bool = False,
    require_answer: bool = True,
    role: str | None = None,
) -> list[Example]:
    """Read a data file (see the module docstring) into validated `Example`s.

    The question must be a non-empty string; so must the answer when `require_answer`
    (without it, a missing or empty answer gives ``Example.answer = None``; a present one is
    still checked). An ``id`` may be a string or an integer; two records with the same id are
    an error. With `dedupe`, a record whose question and answer repeat an earlier one's is
    dropped. `role` (``pool``, ``test``, ``labelled``) is named in every error. Every problem
    with a record is reported, in one `DataError` (`starlora.errors.DataErrors` for several).
    """
    source = str(source)
    examples: list[Example] = []
    seen_ids: dict[str, int] = {}
    seen_content: set[tuple[str, str | None]] = set()
    problems = Problems(role)
    fields: dict[str, None] = {}  # every record's field names, in the order first seen
    first = 0  # the line of the first record

    try:
        for line, record in _records(source):
            if isinstance(record, DataError):
                problems.add(record)
                continue
            if not isinstance(record, dict):
                problems.add(DataError(source, line, None, "not a JSON object"))
                continue
            first = first or line
            fields.update(record)
            example = _example(source, line, record, task, problems, question_field,
                               answer_field, id_field, require_answer)
            if example is None:
                continue
            if example.id in seen_ids:
                problems.add(DataError(source, line, id_field, f"duplicate id {example.id!r} "
                                       f"(first on line {seen_ids[example.id]})"))
                continue
            if dedupe:
                answer = example.answer
                key = (" ".join(example.question.split()),
                       None if answer is None else answer.strip())
                if key in seen_content:
                    continue
                seen_content.add(key)
            seen_ids[example.id] = line
            if not problems:  # once a record is bad, the rest are only checked
                examples.append(example)
            if limit is not None and len(examples) >= limit:
                break
    except DataError as e:  # the file cannot be read at all
        raise e.in_role(role) from None
    for name, setting in ((question_field, "question_field"), (answer_field, "answer_field")):
        if fields and name not in fields and (name == question_field or require_answer):
            # one problem for the file, not one per record: the field is named otherwise
            problems.errors = [e for e in problems.errors
                               if (e.field, e.problem) != (name, "missing")]
            theirs = ", ".join(map(str, list(fields)[:12]))
            fix = separator_hint(list(fields)) or f"set task.{setting} to the one that holds it"
            problems.add(DataError(source, first, name, "missing from every record, the first "
                                   f"on this line (their fields: {theirs}); {fix}"))
    problems.raise_if_any()
    if not examples:
        raise DataError(source, None, None, "no records", role)
    return examples
