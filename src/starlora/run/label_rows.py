"""The rows of a run's ``labelled.jsonl``: how one is written (`label_row`), how answers go
into them (`merge_labels`), and the checks a row read back must pass (`check_label_rows`): a
person may have edited the file."""

from __future__ import annotations

from pathlib import Path

from starlora.errors import DataError, Problems


def label_row(id_: str, round_: int | None, answer: str, source: str) -> dict:
    """One line of ``labelled.jsonl``: the labelled `id_`, the label round that first trains
    on it, its `answer`, and where it came from (``simulated``, ``file:<name>``,
    ``import:<name>``, ``annotate``...)."""
    return {"id": id_, "round": round_, "answer": answer, "source": source}


def merge_labels(rows: list[dict], answers: dict[str, str], round_: int | None,
                 source: str) -> int:
    """Put `answers` ({id: answer}) of label round `round_` into `rows` (labelled.jsonl's, in
    file order), in place: a revised answer replaces its id's row where it stands (training
    takes the rows in file order), one equal to the saved answer leaves its row as it is
    (its source too), a new id's row is appended. Returns how many rows it added or changed."""
    at = {row["id"]: k for k, row in enumerate(rows)}
    changed = 0
    for id_, answer in answers.items():
        if id_ not in at:
            rows.append(label_row(id_, round_, answer, source))
        elif rows[at[id_]]["answer"] != answer:
            rows[at[id_]] = label_row(id_, round_, answer, source)
        else:
            continue
        changed += 1
    return changed


def check_label_rows(path: str | Path, records: list[tuple[int, dict]]) -> None:
    """DataError naming `path`, the line and the field of every row of `records` ((1-based
    line, object) as `starlora.io.read_records` reads them) whose ``id`` or ``answer`` is
    missing or not a string, or whose id is labelled on an earlier line too; all at once."""
    problems, first = Problems(), {}
    for line, row in records:
        for name in ("id", "answer"):
            value = row.get(name)
            if not isinstance(value, str):
                problems.add(DataError(str(path), line, name, "missing" if value is None else
                                       f"must be a string, got {type(value).__name__}"))
        id_ = row.get("id")
        if isinstance(id_, str) and id_ in first:
            problems.add(DataError(str(path), line, "id",
                                   f"{id_!r} labelled twice (first on line {first[id_]})"))
        elif isinstance(id_, str):
            first[id_] = line
    problems.raise_if_any()
