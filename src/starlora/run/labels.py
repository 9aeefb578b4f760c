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

* ``jsonl``: ``{"id": ..., "answer": ...}`` per line; a line without an answer (no
  ``answer``, null or ``""``, as the export writes it) is not answered yet and stays pending;
* ``csv``: ``id`` and ``answer`` columns; a row whose ``answer`` cell is empty is not
  answered yet and stays pending (so a partly filled export, in either format, imports);
* ``label-studio``: a Label Studio JSON export; a task's answer is the text area of its last
  annotation that was not cancelled; tasks without one stay pending.

Every record is checked before any is applied: an unknown id, an id that is not pending, a
duplicate id, an answer made only of whitespace, a line that does not parse or a missing field
is a `DataError` naming ``file:line`` and the field; every one is reported at once (up to 20,
then a count), and the run directory is left byte for byte as it was.
Valid answers are applied in one atomic write under the run's lock; a partial import is fine.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlora.errors import DataError, Problems, StarloraError
from starlora.io import atomic_write, csv_records, jsonl_records
from starlora.run.formats import FORMATS
from starlora.run.store import RunStore

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
def label_config_path(out: str | Path) -> Path:
    """Where a Label Studio export of `out` writes its labelling config: beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".label_config.xml")


def export_message(n: int, out: str | Path, fmt: str = "auto") -> str:
    """What `starlora export` says after writing `n` queries: every file it wrote."""
    fmt = guess_format(out) if fmt == "auto" else fmt
    files = f"{out}" if fmt != "label-studio" else (
        f"{out} and their labelling config to {label_config_path(out)} (paste it into the "
        "Label Studio project's labelling interface)")
    what = "1 pending query" if n == 1 else f"{n} pending queries"
    return f"wrote {what} to {files}" + (" (nothing is pending)" if n == 0 else "")


def import_message(store: RunStore, run_dir: str | Path, applied: int, left: int) -> str:
    """What `starlora import` says after applying `applied` answers to `store` (the run in
    `run_dir`, as the user named it) with `left` pending: what the run does next (waits for
    them, goes on when resumed, is finished, or works between queries)."""
    from starlora.run.store import resume_command

    resume = resume_command(run_dir)
    more = (f"{left} still pending" if left
            else f"nothing pending: {resume} continues it" if store.open_query() is not None
            else "no query is open: the run is finished" if store.state().get("finished")
            else "no query is open: the run is not waiting for answers (when no starlora run "
                 f"works in it, {resume} continues it)")
    return f"imported {applied} answer{'' if applied == 1 else 's'} into {run_dir}; {more}"


def export_queries(store: RunStore, out: str | Path, fmt: str = "auto",
                   replace: bool = False) -> int:
    """Write the pending queries of `store` to `out` in `fmt` (``auto``: from the name);
    returns how many. An existing `out` is refused unless `replace` (answers typed into it
    would be lost), and a path inside the run directory always is."""
    out = Path(out)
    fmt = guess_format(out) if fmt == "auto" else fmt
    if out.resolve().is_relative_to(store.root.resolve()):
        raise StarloraError(f"--out {out}: inside the run directory {store.root}; write the "
                            "queries elsewhere")
    if out.is_file() and not replace:
        raise StarloraError(f"--out {out}: exists (answers typed into it and not imported "
                            "would be lost); --force replaces it, or give another name")
    rows = [{k: q.get(k) for k in FIELDS} for q in store.pending()]
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
        atomic_write(label_config_path(out), LABEL_CONFIG)
    else:
        raise StarloraError(f"--format: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return len(rows)


# -- import -----------------------------------------------------------------------------------
def read_answers(path: str | Path, fmt: str = "auto",
                 problems: Problems | None = None) -> list[Answer]:
    """Parse an answers file (see the module docstring). Records without an answer yet (Label
    Studio tasks not annotated, empty CSV cells, JSONL lines with no or an empty answer) are
    left out. Every malformed record is a
    problem: added to `problems` when given, else raised together (`Problems.raise_if_any`)."""
    path = Path(path)
    if fmt == "auto":
        fmt = guess_format(path)
    if fmt not in FORMATS:
        raise StarloraError(f"--format: unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(str(path), None, None, "no such file") from None
    except OSError as e:  # a folder, no permission
        raise DataError(str(path), None, None, f"cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is not text
    except UnicodeDecodeError as e:
        raise DataError(str(path), raw.count(b"\n", 0, e.start) + 1, None,
                        f"not valid UTF-8 (byte {e.start})") from None
    found = Problems() if problems is None else problems
    parse = {"jsonl": _jsonl, "csv": _csv, "label-studio": _label_studio}[fmt]
    answers = parse(str(path), text, found)
    if problems is None:
        found.raise_if_any()
    return answers


def _field(where: str, line: int, record: dict, name: str) -> str:
    if name not in record or record[name] is None:
        raise DataError(where, line, name, "missing")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(where, line, name, f"must be a string, got {type(value).__name__}")
    return str(value)


def _answer(where: str, line: int, record: dict, problems: Problems,
            answer: Any = None) -> Answer | None:
    """The Answer of `record` (its ``id`` and ``answer``, or `answer` when given), or None
    after adding each problem of the two fields to `problems`."""
    values = []
    for name in ("id", "answer"):
        try:
            values.append(_field(where, line, record if answer is None or name == "id"
                                 else {"answer": answer}, name))
        except DataError as e:
            problems.add(e)
    return Answer(values[0], values[1], line) if len(values) == 2 else None


def _jsonl(where: str, text: str, problems: Problems) -> list[Answer]:
    out = []
    for line, record in jsonl_records(text, where):
        if isinstance(record, DataError):
            problems.add(record)
            continue
        if not isinstance(record, dict):
            problems.add(DataError(where, line, None, "not a JSON object"))
            continue
        if record.get("answer") in (None, ""):  # not answered yet (as exported): pending
            continue
        answer = _answer(where, line, record, problems)
        if answer is not None:
            out.append(answer)
    return out


def _csv(where: str, text: str, problems: Problems) -> list[Answer]:
    out = []
    for line, row in csv_records(text, where, required=("id", "answer")):
        if isinstance(row, DataError):
            problems.add(row)
        elif row["answer"] != "":  # an empty cell: not answered yet (as exported), pending
            answer = _answer(where, line, row, problems)
            if answer is not None:
                out.append(answer)
    return out


def _label_studio(where: str, text: str, problems: Problems) -> list[Answer]:
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
        except json.JSONDecodeError as e:  # where the next task starts is unknown: stop
            problems.add(DataError(where, e.lineno, None, f"not valid JSON ({e.msg})"))
            return out
        except (RecursionError, ValueError) as e:  # nested too deep, an integer too long
            problem = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
            problems.add(DataError(where, line, None, f"not valid JSON ({problem})"))
            return out
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            problems.add(DataError(where, line, "data", "missing (not a Label Studio task)"))
        else:
            answer = _task_answer(where, line, task, problems)
            if answer is not None:
                out.append(answer)
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
        elif not text.startswith("]", pos):
            problems.add(DataError(where, text.count("\n", 0, pos) + 1, None,
                                   "expected ',' or ']'"))
            return out
    end = _skip(text, pos + 1)
    if end < len(text):  # a second list pasted after the first: its answers would be lost
        problems.add(DataError(where, text.count("\n", 0, end) + 1, None,
                               "not valid JSON (extra data after the list of tasks)"))
    return out


def _task_answer(where: str, line: int, task: dict, problems: Problems) -> Answer | None:
    """The answer of one Label Studio task: the text area of its last annotation that was not
    cancelled; None when it has none (still pending) or after adding its problems."""
    try:
        annotations = _objects(where, line, task, "annotations")
        done = [a for a in annotations if not a.get("was_cancelled")]
        results = _objects(where, line, done[-1], "result", "annotations.result") if done else []
    except DataError as e:
        problems.add(e)
        return None
    if not done:
        try:
            _field(where, line, task["data"], "id")
        except DataError as e:
            problems.add(e)
        return None
    texts = [r["value"]["text"] for r in results
             if r.get("from_name") == "answer" and isinstance(r.get("value"), dict)
             and "text" in r["value"]]
    if not texts:
        problems.add(DataError(where, line, "annotations.result", "no text area 'answer'"))
        return None
    value = texts[-1]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n".join(value)
    if not isinstance(value, str):
        problems.add(DataError(where, line, "annotations.result",
                               "the text area's text must be a string or a list of strings"))
        return None
    return _answer(where, line, task["data"], problems, value)


def _objects(where: str, line: int, record: dict, key: str, name: str | None = None) -> list[dict]:
    """``record[key]``, a list of JSON objects ([] when absent or null); DataError naming
    `name` (default `key`) when it is anything else."""
    value = record.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise DataError(where, line, name or key, "must be a list of objects")
    return value


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def check_answers(store: RunStore, answers: list[Answer], where: str,
                  revise: bool = False, problems: Problems | None = None,
                  keep_saved: bool = False) -> dict[str, str]:
    """``{id: answer}`` for the good ones of `answers`. An id must be in the open query and not
    labelled yet (with `revise`, answers saved to the open query may be replaced); one asked
    or labelled before is "not pending", any other "unknown"; with `keep_saved` (an import,
    with `revise` or not), one whose answer is the one saved is left out instead, as it is and
    not counted (a file imported again, a Label Studio project exported whole each round).
    Each bad answer is a problem: added to `problems` when given, else all raised together."""
    found = Problems() if problems is None else problems
    r = store.open_query()
    asked = {q["id"] for q in store.queries(r)} if r is not None else set()
    saved = {row["id"]: row["answer"] for row in store.labelled()}
    labelled = set(saved)
    pending = asked if revise else asked - labelled
    first_line: dict[str, int] = {}
    out: dict[str, str] = {}
    for a in answers:
        if a.id in first_line:
            found.add(DataError(where, a.line, "id",
                                f"duplicate id {a.id!r} (first on line {first_line[a.id]})"))
            continue
        first_line[a.id] = a.line
        if not a.answer.strip():
            found.add(DataError(where, a.line, "answer", f"empty answer for id {a.id!r}"))
        elif keep_saved and saved.get(a.id) == a.answer.strip():
            continue  # saved already as it is (a file, or a Label Studio project, kept whole;
            # with --revise too): left as it is, not counted
        elif a.id not in pending:
            problem = ("is not pending: answered already (`starlora import --revise` or "
                       "`starlora annotate` change an answer until the run goes on)"
                       if a.id in asked else
                       "is not pending: labelled in an earlier round" if a.id in labelled else
                       "unknown id" + (": no query is open (the run is not waiting for "
                                       "answers)" if r is None else ""))
            found.add(DataError(where, a.line, "id", f"{a.id!r} {problem}"))
        else:
            out[a.id] = a.answer.strip()
    if problems is None:
        found.raise_if_any()
    return out


def import_labels(store: RunStore, path: str | Path, fmt: str = "auto",
                  revise: bool = False) -> tuple[int, int]:
    """Check every answer in `path`, then apply them all at once under the run's lock; any
    problem (every one is reported, up to 20 and a count) applies none. With `revise`, an
    answer may replace one saved earlier to the open query (until the run goes on), as the
    annotate page's may. Returns (answers applied, queries still pending)."""
    problems = Problems()
    answers = read_answers(path, fmt, problems)
    with store.lock():
        checked = check_answers(store, answers, str(path), revise=revise, problems=problems,
                                keep_saved=True)
        problems.raise_if_any()
        applied = store.save_labels(checked, f"import:{Path(path).name}") if checked else 0
    return applied, len(store.pending())
