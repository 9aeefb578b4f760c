"""Labels from people: export the pending queries of a run, import the answers.

Export (`export_queries`) writes the open query's unanswered rows, highest uncertainty first,
with the fields ``id, question, prompt, draft, uncertainty, round``:

* ``jsonl``: one object per line;
* ``csv``: the same columns plus an empty ``answer`` column to fill in;
* ``label-studio``: a tasks JSON list for Label Studio. Each task keeps our id in
  ``data.id`` and carries the draft as a prediction whose ``score`` is the uncertainty (the
  Data Manager sorts by it); the labelling config (a text area named ``answer`` on the
  prompt) is written beside it as ``<name>.label_config.xml``.

Import (`import_labels`) reads answers:

* ``jsonl``: ``{"id": ..., "answer": ...}`` per line;
* ``csv``: ``id`` and ``answer`` columns; a row whose ``answer`` cell is empty is not
  answered yet and stays pending (so a partly filled export imports);
* ``label-studio``: a Label Studio JSON export; a task's answer is the text area of its last
  annotation that was not cancelled; tasks without one stay pending.

Every record is checked before any is applied: an unknown id, an id that is not pending, a
duplicate id, an answer made only of whitespace, a line that does not parse or a missing field raise `DataError`
naming ``file:line`` and the field, and the run directory is left byte for byte as it was.
Valid answers are applied in one atomic write under the run's lock; a partial import is fine.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from starlora.errors import DataError, StarloraError
from starlora.io import atomic_write, json_lines, parse_json
from starlora.run.store import RunStore

FORMATS = ("jsonl", "csv", "label-studio")
FIELDS = ("id", "question", "prompt", "draft", "uncertainty", "round")
LABEL_CONFIG = """<View>
  <Header value="Answer as the model should"/>
  <Text name="prompt" value="$prompt"/>
  <TextArea name="answer" toName="prompt" editable="true" maxSubmissions="1" rows="6"/>
</View>
"""


@dataclass(frozen=True)
class Answer:
    """One imported answer and where it was read (`line` is 1-based)."""

    id: str
    answer: str
    line: int


def guess_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    formats = {".jsonl": "jsonl", ".csv": "csv", ".json": "label-studio"}
    if suffix not in formats:
        raise StarloraError(f"{path}: cannot tell the format from the name; pass --format "
                            f"({', '.join(FORMATS)})")
    return formats[suffix]


# -- export -----------------------------------------------------------------------------------
def export_queries(store: RunStore, out: str | Path, fmt: str) -> int:
    """Write the pending queries of `store` to `out` in `fmt`; returns how many."""
    rows = [{k: q.get(k) for k in FIELDS} for q in store.pending()]
    out = Path(out)
    if fmt == "jsonl":
        atomic_write(out, "".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[*FIELDS, "answer"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "answer": ""} for r in rows)
        atomic_write(out, buf.getvalue())
    elif fmt == "label-studio":
        tasks = [{
            "data": r,
            "predictions": [{
                "model_version": "starlora-draft",
                "score": r["uncertainty"],
                "result": [{"from_name": "answer", "to_name": "prompt", "type": "textarea",
                            "value": {"text": [r["draft"] or ""]}}],
            }],
        } for r in rows]
        atomic_write(out, json.dumps(tasks, indent=1) + "\n")
        atomic_write(out.with_name(out.stem + ".label_config.xml"), LABEL_CONFIG)
    else:
        raise StarloraError(f"--format: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return len(rows)


# -- import -----------------------------------------------------------------------------------
def read_answers(path: str | Path, fmt: str = "auto") -> list[Answer]:
    """Parse an answers file (see the module docstring); raises DataError on a malformed
    record. Records without an answer yet (Label Studio tasks not annotated) are left out."""
    path = Path(path)
    if fmt == "auto":
        fmt = guess_format(path)
    if fmt not in FORMATS:
        raise StarloraError(f"--format: unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(str(path), None, None, "no such file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(str(path), raw.count(b"\n", 0, e.start) + 1, None,
                        f"not valid UTF-8 (byte {e.start})") from None
    return {"jsonl": _jsonl, "csv": _csv, "label-studio": _label_studio}[fmt](str(path), text)


def _field(where: str, line: int, record: dict, name: str) -> str:
    if name not in record or record[name] is None:
        raise DataError(where, line, name, "missing")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(where, line, name, f"must be a string, got {type(value).__name__}")
    return str(value)


def _jsonl(where: str, text: str) -> list[Answer]:
    out = []
    for line, raw in json_lines(text):
        try:
            record = parse_json(raw)
        except ValueError as e:
            raise DataError(where, line, None, f"not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise DataError(where, line, None, "not a JSON object")
        out.append(Answer(_field(where, line, record, "id"),
                          _field(where, line, record, "answer"), line))
    return out


def _csv(where: str, text: str) -> list[Answer]:
    reader = csv.DictReader(io.StringIO(text))
    for name in ("id", "answer"):
        if name not in (reader.fieldnames or []):
            raise DataError(where, 1, name, "missing column")
    out = []
    try:
        for row in reader:
            line = reader.line_num
            if None in row:  # more cells than columns
                raise DataError(where, line, None, "more cells than header columns")
            if row["answer"] == "":  # not answered yet (export leaves it empty): pending
                continue
            out.append(Answer(_field(where, line, row, "id"), _field(where, line, row, "answer"),
                              line))
    except csv.Error as e:
        raise DataError(where, reader.line_num, None, f"not valid CSV ({e})") from None
    return out


def _label_studio(where: str, text: str) -> list[Answer]:
    """Tasks of a Label Studio JSON export, each with the line its object starts on."""
    decoder = json.JSONDecoder()
    pos = _skip(text, 0)
    if not text.startswith("[", pos):
        raise DataError(where, 1, None, "not a Label Studio JSON export (a list of tasks)")
    pos = _skip(text, pos + 1)
    out = []
    while not text.startswith("]", pos):
        line = text.count("\n", 0, pos) + 1
        try:
            task, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(where, e.lineno, None, f"not valid JSON ({e.msg})") from None
        except (RecursionError, ValueError) as e:  # nested too deep, an integer too long
            problem = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
            raise DataError(where, line, None, f"not valid JSON ({problem})") from None
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise DataError(where, line, "data", "missing (not a Label Studio task)")
        id_ = _field(where, line, task["data"], "id")
        done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if done:
            texts = [r["value"]["text"] for r in done[-1].get("result") or []
                     if r.get("from_name") == "answer" and isinstance(r.get("value"), dict)
                     and "text" in r["value"]]
            if not texts:
                raise DataError(where, line, "annotations.result", "no text area 'answer'")
            value = texts[-1]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = "\n".join(value)
            if not isinstance(value, str):
                raise DataError(where, line, "annotations.result",
                                "the text area's text must be a string or a list of strings")
            out.append(Answer(id_, value, line))
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
        elif not text.startswith("]", pos):
            raise DataError(where, text.count("\n", 0, pos) + 1, None, "expected ',' or ']'")
    return out


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def check_answers(store: RunStore, answers: list[Answer], where: str,
                  revise: bool = False) -> dict[str, str]:
    """``{id: answer}`` for `answers`, or DataError for the first bad one. An id must be in
    the open query and not labelled yet (with `revise`, answers saved to the open query may
    be replaced); one asked or labelled before is "not pending", any other "unknown"."""
    r = store.open_query()
    asked = {q["id"] for q in store.queries(r)} if r is not None else set()
    labelled = {row["id"] for row in store.labelled()}
    pending = asked if revise else asked - labelled
    first_line: dict[str, int] = {}
    out: dict[str, str] = {}
    for a in answers:
        if a.id in first_line:
            raise DataError(where, a.line, "id",
                            f"duplicate id {a.id!r} (first on line {first_line[a.id]})")
        first_line[a.id] = a.line
        if not a.answer.strip():
            raise DataError(where, a.line, "answer", f"empty answer for id {a.id!r}")
        if a.id not in pending:
            known = a.id in asked or a.id in labelled
            problem = "is not pending (already labelled, or not asked)" if known else "unknown id"
            raise DataError(where, a.line, "id", f"{a.id!r} {problem}")
        out[a.id] = a.answer.strip()
    return out


def import_labels(store: RunStore, path: str | Path, fmt: str = "auto") -> tuple[int, int]:
    """Check every answer in `path`, then apply them all at once under the run's lock.
    Returns (answers applied, queries still pending)."""
    answers = read_answers(path, fmt)
    with store.lock():
        checked = check_answers(store, answers, str(path))
        if checked:
            store.save_labels(checked, f"import:{Path(path).name}")
    return len(checked), len(store.pending())
