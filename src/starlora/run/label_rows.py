"""The rows of a run's ``labelled.jsonl``: how one is written (`label_row`)."""

from __future__ import annotations


def label_row(id_: str, round_: int | None, answer: str, source: str) -> dict:
    """One line of ``labelled.jsonl``: the labelled `id_`, the label round that first trains
    on it, its `answer`, and where it came from (``simulated``, ``file:<name>``,
    ``import:<name>``, ``annotate``...)."""
    return {"id": id_, "round": round_, "answer": answer, "source": source}
