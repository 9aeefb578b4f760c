"""Data files: JSONL, CSV, Parquet and a datasets folder, with or without answers."""

from __future__ import annotations

import json
from csv import DictWriter
from pathlib import Path

import pytest

from starlora.datafiles import load_examples
from starlora.errors import DataError
from starlora.tasks import get_task

RECORDS = [{"id": "a", "question": "2 + 2?", "answer": "4\n#### 4"},
           {"id": "b", "question": "3 + 4?", "answer": "7\n#### 7"}]


def write_all(tmp_path: Path, records: list[dict]) -> dict[str, str]:
    """The same records as JSONL, CSV, Parquet and an `hf:` folder; returns the sources."""
    from datasets import Dataset

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    csv = tmp_path / "d.csv"
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(csv, "w", newline="") as f:
        writer = DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    parquet = tmp_path / "d.parquet"
    Dataset.from_list(records).to_parquet(str(parquet))
    folder = tmp_path / "hub"
    folder.mkdir()
    Dataset.from_list(records).to_json(str(folder / "train.jsonl"))
    return {"jsonl": str(jsonl), "csv": str(csv), "parquet": str(parquet),
            "hf": f"hf:{folder}:train"}


def test_every_format_gives_the_same_examples(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = get_task("gsm8k")
    sources = write_all(tmp_path, RECORDS)
    loaded = {fmt: [(e.id, e.question, e.answer) for e in load_examples(src, task)]
              for fmt, src in sources.items()}
    expected = [(r["id"], r["question"], r["answer"]) for r in RECORDS]
    assert all(v == expected for v in loaded.values()), loaded


def test_a_pool_without_answers_loads_when_answers_are_optional(tmp_path: Path) -> None:
    task = get_task("gsm8k")
    records = [{"question": "2 + 2?"}, {"question": "3 + 4?", "answer": ""},
               {"question": "5 + 5?", "answer": "10\n#### 10"}]
    sources = write_all(tmp_path, records)
    for fmt, line in (("jsonl", 1), ("csv", 2)):  # CSV: the header is line 1
        examples = load_examples(sources[fmt], task, require_answer=False)
        assert [e.answer for e in examples] == [None, None, "10\n#### 10"], fmt
        with pytest.raises(DataError, match=rf"d\.{fmt}:{line}: answer: (missing|empty)"):
            load_examples(sources[fmt], task)
    # an id derived without an answer does not change when the answer arrives later
    bare = load_examples(sources["jsonl"], task, require_answer=False)[0].id
    (tmp_path / "later.jsonl").write_text(json.dumps({"question": "2 + 2?"}) + "\n")
    assert load_examples(tmp_path / "later.jsonl", task, require_answer=False)[0].id == bare


def test_bad_records_name_file_line_and_field(tmp_path: Path) -> None:
    task = get_task("gsm8k")
    csv = tmp_path / "bad.csv"
    csv.write_text('id,question,answer\na,"2 + 2?","4\n#### 4"\nb,,"#### 1"\n')
    with pytest.raises(DataError, match=r"bad\.csv:4: question: empty"):  # after a quoted newline
        load_examples(csv, task)
    # a quote left open once swallowed the rest of the file into one question, silently
    csv.write_text('id,question,answer\na,"2 + 2?,#### 4\nb,1 + 1?,#### 2\n')
    with pytest.raises(DataError, match=r"bad\.csv:2: not valid CSV \(unexpected end of data; "
                                        r"a quote opened here is not closed\)"):
        load_examples(csv, task)
    csv.write_text('id,question,answer\na,"2 + 2?"x,#### 4\n')  # text after a closing quote
    with pytest.raises(DataError, match=r"bad\.csv:2: not valid CSV"):
        load_examples(csv, task)
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_examples(tmp_path / "x.txt", task)
    with pytest.raises(DataError, match="cannot load the dataset"):
        load_examples(f"hf:{tmp_path / 'nothing'}:train", task)


def test_labels_the_user_has_leave_the_pool_and_form_the_initial_set(tmp_path: Path) -> None:
    from starlora.config import TaskConfig
    from starlora.run.data import load_data, make_task

    pool = tmp_path / "pool.csv"
    pool.write_text("id,question\np1,2 + 2?\np2,3 + 4?\np3,5 + 5?\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": "9 + 9?", "answer": "#### 18"}) + "\n")
    labelled = tmp_path / "mine.jsonl"
    labelled.write_text(json.dumps({"id": "p2", "question": "3 + 4?", "answer": "#### 7"}) + "\n"
                        + json.dumps({"id": "x9", "question": "1 + 1?", "answer": "#### 2"}) + "\n")
    cfg = TaskConfig(name="gsm8k", train=str(pool), test=str(test), labelled=str(labelled))
    data = load_data(cfg, make_task(cfg))
    assert [ex.id for ex in data.pool] == ["p1", "p3"] and all(ex.answer is None for ex in data.pool)
    assert [(ex.id, ex.answer) for ex in data.labelled] == [("p2", "#### 7"), ("x9", "#### 2")]
    labelled.write_text(json.dumps({"id": "p1", "question": "7 + 7?", "answer": "#### 14"}) + "\n")
    with pytest.raises(DataError, match=r"mine\.jsonl:1: id: 'p1' names another question"):
        load_data(cfg, make_task(cfg))

    # the same item under another id (ids numbered by line in two files cut from one source)
    # leaves the pool too, case and spaces folded as for the test set
    labelled.write_text(json.dumps({"id": "7", "question": "5  +  5?", "answer": "#### 10"}) + "\n")
    assert [ex.id for ex in load_data(cfg, make_task(cfg)).pool] == ["p1", "p2"]
    # a labelled record that repeats a test record is refused: it would be trained on, then
    # graded on (unless the user turns the overlap check off)
    labelled.write_text(json.dumps({"id": "a", "question": "1 + 1?", "answer": "#### 2"}) + "\n"
                        + json.dumps({"id": "b", "question": "9 + 9?", "answer": "#### 18"}) + "\n")
    with pytest.raises(DataError, match=r"mine\.jsonl:2: question: repeats test record 'L000001-"):
        load_data(cfg, make_task(cfg))
    off = cfg.model_copy(update={"drop_test_overlap": False})
    assert [ex.id for ex in load_data(off, make_task(off)).labelled] == ["a", "b"]


def test_every_bad_record_is_reported_with_the_file_role(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a", "question": "2 + 2?", "answer": "4"}\n'
                    '{"id": "b", "question": "3 + 4?"}\n'
                    '{"id": "c", "answer": "1"}\n'
                    'not json\n'
                    '{"id": "a", "question": "5 + 5?", "answer": "10"}\n')
    with pytest.raises(DataError) as e:
        load_examples(path, get_task("jsonl"), role="test")
    assert str(e.value).splitlines() == [
        f"{path}: 4 problems:",
        f"{path}:2: answer: missing (the test set, task.test)",
        f"{path}:3: question: missing (the test set, task.test)",
        f"{path}:4: not valid JSON (Expecting value) (the test set, task.test)",
        f"{path}:5: id: duplicate id 'a' (first on line 1) (the test set, task.test)",
    ]
    with pytest.raises(DataError, match=r"no such file \(the pool, task.train\)"):
        load_examples(tmp_path / "none.jsonl", get_task("jsonl"), role="pool")
    # a relative path names the directory it was looked for in (a run resumed elsewhere)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"none.jsonl: no such file in {tmp_path} \(the pool"):
        load_examples("none.jsonl", get_task("jsonl"), role="pool")


def test_a_test_file_without_answers_says_it_is_the_test_set(tmp_path: Path) -> None:
    from starlora.config import load_config
    from starlora.run.data import load_data, make_task

    pool, test = tmp_path / "pool.jsonl", tmp_path / "pool_noid.jsonl"
    pool.write_text('{"question": "a"}\n{"question": "b"}\n')
    test.write_text('{"question": "c"}\n')
    cfg = load_config(None, ["task.name=jsonl", f"task.train={pool}", f"task.test={test}"]).task
    with pytest.raises(DataError) as e:
        load_data(cfg, make_task(cfg))
    assert str(e.value) == (f"{test}:1: answer: missing from every record, the first on this "
                            "line (their fields: question); set task.answer_field to the one "
                            "that holds it (the test set, task.test)")


def test_a_field_named_otherwise_in_every_record_is_one_problem_naming_the_setting(
        tmp_path: Path) -> None:
    """A pool whose questions are under `prompt`: one problem saying which fields the records
    have and which setting names the field (it was one "question: missing" per record, 20
    shown and the rest counted); a field missing from some records stays one per record."""
    task = get_task("jsonl")
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "q"}) + "\n" for i in range(30)))
    with pytest.raises(DataError) as e:
        load_examples(pool, task, require_answer=False)
    assert str(e.value) == (f"{pool}:1: question: missing from every record, the first on this "
                            "line (their fields: id, prompt); set task.question_field to the "
                            "one that holds it")
    assert [ex.question for ex in load_examples(pool, task, question_field="prompt",
                                                require_answer=False)] == ["q"] * 30
    pool.write_text('{"question": "a"}\n{"prompt": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"2 problems:\n.*:2: question: missing\n.*:3: question: "
                                        r"missing"):
        load_examples(pool, task, require_answer=False)


def test_a_csv_saved_with_semicolons_is_told_to_be_saved_comma_separated(tmp_path: Path) -> None:
    """Review 15, 9b: a spreadsheet in a semicolon locale writes 'id;question'; the pool
    loader said to set task.question_field, which cannot help."""
    pool = tmp_path / "semi.csv"
    pool.write_text("id;question\np1;What is 1?\n")
    with pytest.raises(DataError) as e:
        load_examples(pool, get_task("jsonl"), require_answer=False)
    assert str(e.value) == (f"{pool}:2: question: missing from every record, the first on this "
                            "line (their fields: id;question); it looks separated by "
                            "semicolons: save the file comma-separated")


def test_a_csv_saved_with_a_byte_order_mark_reads_as_without(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark, which made the first column
    '\\ufeffid' ("id: missing column" under a header that shows `id`)."""
    sources = write_all(tmp_path, RECORDS)
    plain = Path(sources["csv"]).read_bytes()
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + plain)
    task = get_task("gsm8k")
    assert load_examples(tmp_path / "excel.csv", task) == load_examples(sources["csv"], task)
