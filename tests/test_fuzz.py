"""Fuzzing (hypothesis) of everything that reads a user's file: the import parsers (JSONL,
CSV, Label Studio), the data loaders (JSONL, CSV, Parquet) and config loading with ``--set``.

Every input either succeeds or fails with `DataError` / `ConfigError` naming the file (and
the line, where there is one); never another exception. A failed import leaves the run
directory byte for byte as it was. Example counts are bounded and the search is derandomized
(the same examples on every run), so this is part of the fast tier; the examples that found
a bug are pinned with `example` next to the property they broke.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from starlora.config import ExperimentConfig, load_config
from starlora.datafiles import load_examples
from starlora.errors import ConfigError, DataError
from starlora.run.labels import import_labels
from starlora.run.store import RunStore
from starlora.tasks import get_task

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
IDS = ["q0", "q1", "q2", "q3", "a", "zz", ""]  # pending, answered, labelled, unknown, empty

# -- building blocks ----------------------------------------------------------------------------
text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False), st.sampled_from(IDS), text)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["id", "answer", "question", "data", "annotations", "result", "value", "text",
         "from_name", "was_cancelled", "x"]), inner, max_size=4)), max_leaves=12)
#: an id/answer record, often well-formed, sometimes not
records = st.fixed_dictionaries({}, optional={"id": st.one_of(st.sampled_from(IDS), json_values),
                                              "answer": st.one_of(text, json_values),
                                              "question": st.one_of(text, json_values)})


def jsonl_text(rows: list[Any], raw: list[str]) -> str:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + raw
    return "\n".join(lines) + "\n"


jsonl_files = st.builds(jsonl_text, st.lists(st.one_of(records, json_values), max_size=6),
                        st.lists(st.one_of(text, st.sampled_from(
                            ["{", "[1,", "9" * 5000, "[" * 3000, '{"id": "q0"', "\x00",
                             '{"id": "q0", "answer": "\u2028"}'])), max_size=2))


def csv_text(header: list[str], rows: list[list[str]], tail: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue() + tail


cells = st.one_of(st.sampled_from(IDS), text, st.sampled_from(['"', ",", "\n", "\r", " "]))
csv_files = st.builds(
    csv_text,
    st.lists(st.sampled_from(["id", "answer", "question", "x", ""]), min_size=0, max_size=4),
    st.lists(st.lists(cells, max_size=5), max_size=5),
    st.one_of(st.just(""), text, st.sampled_from(['"unclosed', "a,b,c,d,e,f\n", "\x00"])))

ls_annotation = st.one_of(json_values, st.fixed_dictionaries(
    {"result": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"from_name": st.sampled_from(["answer", "other"]),
         "value": st.one_of(json_values, st.fixed_dictionaries(
             {"text": st.one_of(json_values, st.lists(text, max_size=2))}))}), max_size=2))},
    optional={"was_cancelled": st.one_of(st.booleans(), json_values)}))
ls_tasks = st.one_of(json_values, st.fixed_dictionaries(
    {"data": st.one_of(json_values, st.fixed_dictionaries({"id": st.sampled_from(IDS)}))},
    optional={"annotations": st.one_of(json_values, st.lists(ls_annotation, max_size=3))}))
ls_files = st.one_of(
    st.builds(lambda tasks, indent: json.dumps(tasks, indent=indent),
              st.lists(ls_tasks, max_size=4), st.sampled_from([None, 1])),
    st.builds(lambda tasks, cut: json.dumps(tasks, indent=1)[:cut],
              st.lists(ls_tasks, max_size=3), st.integers(0, 200)),
    text)


# -- imports -------------------------------------------------------------------------------------
QUERIES = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "prompt": f"Q: {i} + {i}",
            "draft": str(2 * i), "uncertainty": 1.0 - i / 10, "round": 1} for i in range(4)]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run paused on a human query of 4 (q3 answered, "a" labelled in round 0)."""
    root = tmp_path_factory.mktemp("fuzz") / "run"
    store = RunStore.create_or_resume(root, load_config(None, ["active_learning.oracle=human"]))
    store.add_labels([{"id": "a", "round": 0, "answer": "x", "source": "simulated"}])
    store.write_queries(1, QUERIES)
    store.save_labels({"q3": "6"}, "import:first.jsonl")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def check_import(template: Path, name: str, data: str | bytes, fmt: str) -> None:
    """Import `data` (as file `name`) into a copy of `template`: it applies, or raises a
    DataError naming the file and a line, and the run directory is unchanged."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp) / "run"
        shutil.copytree(template, root)
        path = Path(tmp) / name
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        store = RunStore.open(root)
        before = snapshot(root)
        try:
            applied, pending = import_labels(store, path, fmt)
        except DataError as e:
            assert e.path == str(path) and str(e).startswith(f"{path}:"), str(e)
            assert e.line is not None, str(e)
            assert snapshot(root) == before
            return
        assert 0 <= applied and pending == len(RunStore.open(root).pending())


@FUZZ
@given(jsonl_files)
@example('{"id": "q0", "answer": 1' + "0" * 5000 + "}\n")  # int too long for str(): ValueError
@example("[" * 3000 + "\n")  # nested too deep for the parser: RecursionError
@example('{"id": "q0", "answer": "a\u2028b"}\n')  # U+2028 inside a string is not a line break
def test_fuzzed_jsonl_imports(template: Path, data: str) -> None:
    check_import(template, "answers.jsonl", data, "jsonl")


@FUZZ
@given(csv_files)
def test_fuzzed_csv_imports(template: Path, data: str) -> None:
    check_import(template, "answers.csv", data, "csv")


@FUZZ
@given(ls_files)
@example('[{"data": {"id": "q0"}, "annotations": [{"result": [{"from_name": "answer", '
         '"value": {"text": [1, 2]}}]}]}]')  # a list of non-strings: TypeError in join
@example("[" + "{" * 3000)  # nested too deep for the parser: RecursionError
def test_fuzzed_label_studio_imports(template: Path, data: str) -> None:
    check_import(template, "export.json", data, "label-studio")


@settings(FUZZ, max_examples=20)
@given(st.binary(max_size=64), st.sampled_from(["jsonl", "csv", "label-studio"]))
@example(b'{"id": "q0", "answer": "\xff"}\n', "jsonl")  # bad UTF-8: the line it is on
def test_fuzzed_bytes_imports(template: Path, data: bytes, fmt: str) -> None:
    name = {"jsonl": "a.jsonl", "csv": "a.csv", "label-studio": "a.json"}[fmt]
    check_import(template, name, data, fmt)


unusual = st.text(st.sampled_from("ab \u2028\u2029\x85\x1c\x1d\x1e\x0b\x0c\té"), min_size=1,
                  max_size=6).filter(str.strip)


@FUZZ
@given(st.lists(unusual, min_size=1, max_size=3, unique_by=str.strip))
@example(["a\u2028b"])  # str.splitlines broke the line at U+2028: "not valid JSON"
def test_jsonl_answers_with_any_characters_import_as_written(template: Path,
                                                             answers: list[str]) -> None:
    """Answers with characters that `str.splitlines` takes for line breaks (U+2028, NEL,
    form feed...) but JSON strings may hold raw import as written, one per line."""
    data = "".join(json.dumps({"id": f"q{i}", "answer": a}, ensure_ascii=False) + "\n"
                   for i, a in enumerate(answers))
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp) / "run"
        shutil.copytree(template, root)
        (Path(tmp) / "a.jsonl").write_text(data, encoding="utf-8")
        assert import_labels(RunStore.open(root), Path(tmp) / "a.jsonl", "jsonl")[0] == len(answers)
        saved = {r["id"]: r["answer"] for r in RunStore.open(root).labelled()}
        assert [saved[f"q{i}"] for i in range(len(answers))] == [a.strip() for a in answers]


@FUZZ
@given(st.lists(st.tuples(unusual, unusual), min_size=1, max_size=4))
@example([("a\u2028b", "c")])
def test_jsonl_data_with_any_characters_loads_as_written(pairs: list[tuple[str, str]]) -> None:
    data = "".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n"
                   for q, a in pairs)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        (Path(tmp) / "d.jsonl").write_text(data, encoding="utf-8")
        examples = load_examples(Path(tmp) / "d.jsonl", TASK)
    assert [ex.answer for ex in examples] == [a for _, a in pairs]
    assert [ex.meta["source"].rsplit(":", 1)[1] for ex in examples] == [
        str(i) for i in range(1, len(pairs) + 1)]


# -- data loaders -----------------------------------------------------------------------------------
TASK = get_task("jsonl")


def check_load(name: str, data: str | bytes, require_answer: bool, dedupe: bool) -> None:
    """`load_examples` on `data` (as file `name`): examples, or a DataError naming the file
    (and a line, except for a file-level problem)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        try:
            examples = load_examples(path, TASK, require_answer=require_answer, dedupe=dedupe)
        except DataError as e:
            assert e.path == str(path) and str(e).startswith(f"{path}:"), str(e)
            file_level = ("no records", "not a readable Parquet file")
            assert e.line is not None or e.problem.startswith(file_level), str(e)
            return
        assert examples and len({ex.id for ex in examples}) == len(examples)
        assert all(isinstance(ex.question, str) and ex.question.strip() for ex in examples)


@FUZZ
@given(jsonl_files, st.booleans(), st.booleans())
@example('{"question": "q", "answer": "a", "id": 1' + "0" * 5000 + "}\n", True, False)
@example("[" * 3000 + "\n", True, False)
def test_fuzzed_jsonl_data(data: str, require_answer: bool, dedupe: bool) -> None:
    check_load("data.jsonl", data, require_answer, dedupe)


@FUZZ
@given(st.builds(csv_text, st.lists(st.sampled_from(["id", "question", "answer", "x", ""]),
                                    max_size=4),
                 st.lists(st.lists(cells, max_size=5), max_size=5),
                 st.one_of(st.just(""), text)),
       st.booleans(), st.booleans())
def test_fuzzed_csv_data(data: str, require_answer: bool, dedupe: bool) -> None:
    check_load("data.csv", data, require_answer, dedupe)


parquet_columns = st.dictionaries(
    st.sampled_from(["id", "question", "answer", "x"]),
    st.one_of(st.lists(st.one_of(st.none(), text), min_size=3, max_size=3),
              st.lists(st.one_of(st.none(), st.integers(-5, 5)), min_size=3, max_size=3),
              st.lists(st.floats(allow_nan=True), min_size=3, max_size=3),
              st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=3, max_size=3)),
    max_size=4)


@settings(FUZZ, max_examples=15)
@given(st.one_of(parquet_columns, st.binary(max_size=64)), st.booleans())
def test_fuzzed_parquet_data(data: dict | bytes, require_answer: bool) -> None:
    if isinstance(data, dict):
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table(data) if data else pa.table({"x": [1]}), buf)
        data = buf.getvalue()
    check_load("data.parquet", data, require_answer, False)


# -- config with --set ------------------------------------------------------------------------------
KEYS = ["seed", "model.name", "model.dtype", "training.lr", "training.epochs", "task.name",
        "task.pool_size", "active_learning.rounds", "active_learning.query_size",
        "active_learning.strategy", "scoring.mc_passes", "lora.r", "nope", "training",
        "training.lr.x", "", "a..b"]
yaml_values = st.one_of(st.sampled_from(
    ["1", "-1", "0", "1e-4", "true", "null", "[1, 2]", "{a: 1}", "'x'", "pe-dynamic", "gsm8k",
     "2020-01-01", "!!python/object:os.system {}", "&a [*a]", "{", "[", ": :", "~", "\x00",
     "1" * 5000, ".inf", "bf16", "float32"]), text)
overrides = st.lists(st.builds(lambda k, v, eq: f"{k}{eq}{v}", st.sampled_from(KEYS),
                               yaml_values, st.sampled_from(["=", "=", "=", " = ", ""])),
                     max_size=3)
config_files = st.one_of(
    st.builds(lambda d: json.dumps(d), st.dictionaries(st.sampled_from(
        ["seed", "model", "training", "task", "lora", "x"]), json_values, max_size=3)),
    st.builds(lambda ks, vs: "".join(f"{k.replace('.', ':')}: {v}\n" for k, v in zip(ks, vs)),
              st.lists(st.sampled_from(KEYS), max_size=3), st.lists(yaml_values, max_size=3)),
    text)


@settings(FUZZ, max_examples=80)
@given(config_files, overrides)
@example("seed: 1\n", ["seed=" + "1" * 5000])  # an int too long to print
def test_fuzzed_config_and_overrides(body: str, sets: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(body, encoding="utf-8")
        try:
            config = load_config(path, sets)
        except ConfigError as e:
            assert str(e).startswith((f"{path}", "--set ")), str(e)
            return
        assert isinstance(config, ExperimentConfig)


# -- the annotation page's POST body ----------------------------------------------------------------
@settings(FUZZ, max_examples=60)
@given(st.one_of(st.binary(max_size=64), st.builds(lambda v: json.dumps(v).encode(),
                                                   st.one_of(records, json_values, st.builds(
                                                       lambda r, p: {**r, "previous": p},
                                                       records, json_values)))))
@example(b"[" * 30000)  # nested too deep for the parser: RecursionError, a 500
@example(b'{"id": "q0", "answer": 1' + b"0" * 5000 + b"}")
def test_fuzzed_annotate_bodies(body: bytes) -> None:
    """A body is a label (two strings, and the previous answer: a string, null or absent) or
    a 400 saying why not; never a server error."""
    from starlette.exceptions import HTTPException

    from starlora.annotate.app import UNCHECKED, parse_label

    try:
        id_, answer, previous = parse_label(body)
    except HTTPException as e:
        assert e.status_code == 400 and e.detail
        return
    assert isinstance(id_, str) and isinstance(answer, str)
    assert previous is UNCHECKED or previous is None or isinstance(previous, str)
