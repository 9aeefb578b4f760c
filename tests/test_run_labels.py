"""Labels from people: export of pending queries, import of answers, all-or-nothing checks."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from starlora.cli import main
from starlora.config import load_config
from starlora.errors import DataError
from starlora.run.labels import export_queries, import_labels
from starlora.run.store import RunStore

QUERIES = [
    {"id": f"q{i}", "question": f"What is {i} + {i}?", "prompt": f"Question: What is {i} + {i}?",
     "draft": f"{i + i}", "uncertainty": 1.0 - i / 10, "round": 1}
    for i in range(4)
]


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    """A run paused on a human query of 4 examples (one of them answered already)."""
    store = RunStore.create_or_resume(tmp_path / "run", load_config(
        None, ["active_learning.oracle=human"]))
    store.add_labels([{"id": "a", "round": 0, "answer": "x", "source": "simulated"}])
    store.write_queries(1, QUERIES)
    store.save_labels({"q3": "6"}, "import:first.jsonl")
    return store


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_export_formats_carry_the_pending_queries_best_first(store: RunStore, tmp_path: Path) -> None:
    assert [q["id"] for q in store.pending()] == ["q0", "q1", "q2"]
    export_queries(store, tmp_path / "q.jsonl", "jsonl")
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert rows == [{k: q[k] for k in ("id", "question", "prompt", "draft", "uncertainty", "round")}
                    for q in QUERIES[:3]]
    export_queries(store, tmp_path / "q.csv", "csv")
    with open(tmp_path / "q.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == ["q0", "q1", "q2"] and all(r["answer"] == "" for r in table)
    export_queries(store, tmp_path / "ls.json", "label-studio")
    tasks = json.loads((tmp_path / "ls.json").read_text())
    assert [t["data"]["id"] for t in tasks] == ["q0", "q1", "q2"]
    prediction = tasks[0]["predictions"][0]
    assert prediction["score"] == 1.0 and prediction["result"][0]["value"]["text"] == ["0"]
    config = (tmp_path / "ls.label_config.xml").read_text()
    assert '<TextArea name="answer" toName="prompt"' in config and 'value="$prompt"' in config


def test_jsonl_csv_and_label_studio_imports_apply_with_their_source(store: RunStore, tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "q0", "answer": " 0 "}) + "\n")
    assert import_labels(store, tmp_path / "a.jsonl") == (1, 2)
    (tmp_path / "b.csv").write_text("id,answer,note\nq1,2,ok\n")
    assert import_labels(store, tmp_path / "b.csv") == (1, 1)
    export_queries(store, tmp_path / "ls.json", "label-studio")
    tasks = json.loads((tmp_path / "ls.json").read_text())
    tasks[0]["annotations"] = [
        {"was_cancelled": False, "result": [{"from_name": "answer", "type": "textarea",
                                             "value": {"text": ["wrong"]}}]},
        {"was_cancelled": False, "result": [{"from_name": "answer", "type": "textarea",
                                             "value": {"text": ["4"]}}]},
        {"was_cancelled": True, "result": [{"from_name": "answer", "type": "textarea",
                                            "value": {"text": ["cancelled"]}}]},
    ]
    (tmp_path / "export.json").write_text(json.dumps(tasks, indent=2))
    assert import_labels(store, tmp_path / "export.json") == (1, 0)
    labels = {r["id"]: (r["answer"], r["source"], r["round"]) for r in store.labelled()}
    assert labels == {"a": ("x", "simulated", 0), "q0": ("0", "import:a.jsonl", 1),
                      "q1": ("2", "import:b.csv", 1), "q2": ("4", "import:export.json", 1),
                      "q3": ("6", "import:first.jsonl", 1)}
    assert store.close_query(1) and store.pending() == []


def test_label_studio_tasks_without_annotations_stay_pending(store: RunStore, tmp_path: Path) -> None:
    export_queries(store, tmp_path / "ls.json", "label-studio")
    assert import_labels(store, tmp_path / "ls.json") == (0, 3)


def test_a_partly_filled_csv_export_imports_and_the_empty_rows_stay_pending(
        store: RunStore, tmp_path: Path) -> None:
    """Issue 36, bug 1: the exported CSV, with 1 of 3 answers filled in, imports that one; an
    empty cell means "not answered yet". A cell made only of whitespace is still an error."""
    export_queries(store, tmp_path / "q.csv", "csv")
    with open(tmp_path / "q.csv", newline="") as f:
        table = list(csv.DictReader(f))
    table[1]["answer"] = "2"
    with open(tmp_path / "q.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    assert import_labels(store, tmp_path / "q.csv") == (1, 2)
    assert [q["id"] for q in store.pending()] == ["q0", "q2"]
    assert {r["id"]: r["answer"] for r in store.labelled()}["q1"] == "2"
    (tmp_path / "blank.csv").write_text("id,answer\nq0,\nq2,\"  \"\n")
    before = snapshot(store.root)
    with pytest.raises(DataError, match="blank.csv:3: answer: empty answer for id 'q2'"):
        import_labels(store, tmp_path / "blank.csv")
    assert snapshot(store.root) == before


def test_a_partly_filled_jsonl_export_imports_and_the_unanswered_lines_stay_pending(
        store: RunStore, tmp_path: Path) -> None:
    """Review 15, 9c: the exported JSONL with one answer filled in failed whole ("answer:
    missing" for the others, "empty answer" for ""), where a CSV's empty cell stays pending.
    A line without an answer, or with null or "", now stays pending too; one made only of
    whitespace is still an error, as in a CSV."""
    export_queries(store, tmp_path / "q.jsonl", "jsonl")
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    rows[1]["answer"], rows[2]["answer"] = "2", ""
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert import_labels(store, tmp_path / "q.jsonl") == (1, 2)
    assert [q["id"] for q in store.pending()] == ["q0", "q2"]
    (tmp_path / "blank.jsonl").write_text('{"id": "q0", "answer": null}\n'
                                          '{"id": "q2", "answer": "  "}\n')
    before = snapshot(store.root)
    with pytest.raises(DataError, match="blank.jsonl:2: answer: empty answer for id 'q2'"):
        import_labels(store, tmp_path / "blank.jsonl")
    assert snapshot(store.root) == before


@pytest.mark.parametrize("name,text,where", [
    ("unknown.jsonl", '{"id": "q0", "answer": "0"}\n{"id": "zz", "answer": "1"}\n',
     "unknown.jsonl:2: id: 'zz' unknown id"),
    ("done.jsonl", '{"id": "q0", "answer": "0"}\n{"id": "q3", "answer": "1"}\n',
     "done.jsonl:2: id: 'q3' is not pending: answered already (`starlora import --revise`"),
    ("earlier.jsonl", '{"id": "a", "answer": "1"}\n',
     "earlier.jsonl:1: id: 'a' is not pending: labelled in an earlier round"),
    ("dup.jsonl", '{"id": "q0", "answer": "0"}\n{"id": "q0", "answer": "1"}\n',
     "dup.jsonl:2: id: duplicate id 'q0' (first on line 1)"),
    ("empty.jsonl", '{"id": "q0", "answer": "0"}\n{"id": "q1", "answer": "  "}\n',
     "empty.jsonl:2: answer: empty answer for id 'q1'"),
    ("broken.jsonl", '{"id": "q0", "answer": "0"}\n{"id": "q1", "answer": \n',
     "broken.jsonl:2: not valid JSON"),
    ("field.jsonl", '{"id": "q0", "answer": "0"}\n{"id": "q1", "answer": [1]}\n',
     "field.jsonl:2: answer: must be a string, got list"),
    ("nocol.csv", "id,text\nq0,0\n", "nocol.csv:1: answer: missing column (the header has: "
     "'id', 'text')"),
    # review 15, 9b: a CSV saved with semicolons got only "id: missing column"
    ("semi.csv", "id;answer\nq0;0\n", "semi.csv:1: id: missing column (the header has: "
     "'id;answer'; it looks separated by semicolons: save the file comma-separated)"),
    ("cells.csv", "id,answer\nq0,0\nq1,2,3\n", "cells.csv:3: more cells than header columns"),
    ("csvdup.csv", "id,answer\nq0,0\nq1,2\nq0,5\n", "csvdup.csv:4: id: duplicate id 'q0'"),
    ("ls.json", '[\n {"data": {"id": "q0"}, "annotations": []},\n {"nodata": 1}\n]\n',
     "ls.json:3: data: missing"),
    ("lsbad.json", '[\n {"data": {"id": "q0"}},\n {"data": \n', "lsbad.json:4: not valid JSON"),
    # issue 36, bug 6: annotations that are not objects raised AttributeError
    ("lsann.json", '[\n {"data": {"id": "q0"}, "annotations": ["x"]}\n]\n',
     "lsann.json:2: annotations: must be a list of objects"),
    ("lsann2.json", '[\n {"data": {"id": "q0"}, "annotations": "x"}\n]\n',
     "lsann2.json:2: annotations: must be a list of objects"),
    ("lsres.json", '[\n {"data": {"id": "q0"}, "annotations": [{"result": [3]}]}\n]\n',
     "lsres.json:2: annotations.result: must be a list of objects"),
    # review 15, 3: what followed the closing "]" was ignored (a second export's answers lost)
    ("lstwo.json", '[{"data": {"id": "q0"}}]\n[{"data": {"id": "q1"}, "annotations": [\n'
     '{"result": [{"from_name": "answer", "value": {"text": ["2"]}}]}]}]\n',
     "lstwo.json:2: not valid JSON (extra data after the list of tasks)"),
    ("lsjunk.json", '[\n {"data": {"id": "q0"}}\n]\n\n  this is not JSON {\n',
     "lsjunk.json:5: not valid JSON (extra data after the list of tasks)"),
])
def test_a_malformed_import_changes_nothing(store: RunStore, tmp_path: Path, capsys,
                                            name: str, text: str, where: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    before = snapshot(store.root)
    with pytest.raises(DataError) as e:
        import_labels(store, path)
    assert where in str(e.value)
    assert snapshot(store.root) == before
    assert main(["import", str(store.root), str(path)]) == 2  # the CLI: one line, exit 2
    assert where in capsys.readouterr().err
    assert snapshot(store.root) == before


def test_a_label_studio_export_says_it_wrote_the_labelling_config_too(
        store: RunStore, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ls.json"
    assert main(["export", str(store.root), "--format", "label-studio", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    config = tmp_path / "ls.label_config.xml"
    assert f"wrote 3 pending queries to {out} and their labelling config to {config}" in err
    assert config.is_file()


def test_an_import_with_three_faulty_lines_reports_all_three(store: RunStore, tmp_path: Path,
                                                              capsys) -> None:
    path = tmp_path / "three.jsonl"
    path.write_text('{"id": "q0", "answer": "0"}\n'      # fine
                    '{"id": "zz", "answer": "1"}\n'      # unknown id
                    '{"id": "q1", "answer": \n'          # not JSON
                    '{"answer": "4"}\n')                 # no id
    before = snapshot(store.root)
    assert main(["import", str(store.root), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"starlora: error: {path}: 3 problems:",
        f"{path}:2: id: 'zz' unknown id",
        f"{path}:3: not valid JSON (Expecting value)",
        f"{path}:4: id: missing",
    ]
    assert snapshot(store.root) == before  # nothing applied, not even the good line


def test_an_import_lists_twenty_problems_then_counts_the_rest(store: RunStore,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "many.csv"
    path.write_text("id,answer\n" + "".join(f"x{i},{i}\n" for i in range(25)))
    with pytest.raises(DataError) as e:
        import_labels(store, path)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{path}: 25 problems:" and lines[-1] == "... and 5 more" and len(lines) == 22
    assert lines[1] == f"{path}:2: id: 'x0' unknown id"
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 2, "id")


def test_saved_answers_may_be_revised_until_the_query_closes(store: RunStore) -> None:
    store.save_labels({"q0": "1", "q1": "2", "q2": "4"}, "annotate")
    store.save_labels({"q0": "0"}, "annotate")
    assert {r["id"]: r["answer"] for r in store.labelled()}["q0"] == "0"
    assert len(store.labelled()) == 5 and store.close_query(1)
    with pytest.raises(Exception, match="not in the open query"):
        store.save_labels({"q0": "9"}, "annotate")


def test_import_revise_replaces_answers_to_the_open_query_only(store: RunStore, tmp_path: Path,
                                                               capsys) -> None:
    """A corrected answer file imports again with --revise (it was refused as "answered
    already", and only the annotate page could change an answer); an answer of an earlier
    round stays refused, and with it the whole file."""
    (tmp_path / "fix.csv").write_text("id,answer\nq3,7\nq0,0\n")
    before = snapshot(store.root)
    assert main(["import", str(store.root), str(tmp_path / "fix.csv")]) == 2
    assert "'q3' is not pending: answered already" in capsys.readouterr().err
    assert snapshot(store.root) == before
    assert main(["import", str(store.root), str(tmp_path / "fix.csv"), "--revise"]) == 0
    assert "imported 2 answers" in capsys.readouterr().out
    labels = {r["id"]: (r["answer"], r["source"]) for r in store.labelled()}
    assert labels["q3"] == ("7", "import:fix.csv") and labels["q0"] == ("0", "import:fix.csv")
    assert len(store.labelled()) == 3
    (tmp_path / "old.csv").write_text("id,answer\nq1,2\na,y\n")
    before = snapshot(store.root)
    with pytest.raises(DataError, match="old.csv:3: id: 'a' is not pending: labelled in an earl"):
        import_labels(store, tmp_path / "old.csv", revise=True)
    assert snapshot(store.root) == before


def test_an_answer_saved_again_as_it_is_changes_nothing_and_a_revision_keeps_its_place(
        store: RunStore, tmp_path: Path, capsys) -> None:
    """Review 15, 1: `import --revise` of an answer identical to the saved one was counted as
    imported and moved its row to the end of labelled.jsonl (training takes the rows in that
    order: another adapter, another next selection). It is now left as it is, not counted;
    a revised answer replaces its row where it stands, with the query's round."""
    (tmp_path / "first.csv").write_text("id,answer\nq0,0\nq1,2\n")
    assert import_labels(store, tmp_path / "first.csv") == (2, 1)
    order = [r["id"] for r in store.labelled()]
    assert order == ["a", "q3", "q0", "q1"]
    (tmp_path / "same.csv").write_text("id,answer\nq3, 6\nq0,0\n")
    before = snapshot(store.root)
    assert main(["import", str(store.root), str(tmp_path / "same.csv"), "--revise"]) == 0
    assert "imported 0 answers" in capsys.readouterr().out
    assert snapshot(store.root) == before
    (tmp_path / "fix.csv").write_text("id,answer\nq3,7\nq0,0\n")  # q3 revised, q0 as it is
    assert import_labels(store, tmp_path / "fix.csv", revise=True) == (1, 1)
    rows = store.labelled()
    assert [r["id"] for r in rows] == order
    assert rows[1] == {"id": "q3", "round": 1, "answer": "7", "source": "import:fix.csv"}
    assert rows[2]["source"] == "import:first.csv"
    assert store.save_labels({"q0": "0", "q2": "4"}, "annotate") == 1  # q2 new, at the end
    assert [r["id"] for r in store.labelled()] == [*order, "q2"]
    assert store.labelled()[2]["source"] == "import:first.csv"


def test_import_says_what_the_run_does_next(store: RunStore, tmp_path: Path, capsys) -> None:
    """Review 15, 8: with no query open, `starlora import` said "nothing pending: starlora
    run --run-dir RUN continues it" even of a finished run. It now says what is true."""
    answers = tmp_path / "a.csv"
    answers.write_text("id,answer\nq0,0\nq1,2\nq2,4\n")
    resume = f"starlora run --run-dir {store.root}"

    def said() -> str:
        assert main(["import", str(store.root), str(answers)]) == 0
        return capsys.readouterr().out.strip()

    assert said() == f"imported 3 answers into {store.root}; nothing pending: {resume} continues it"
    assert store.close_query(1)  # the run went on: it trains on them
    assert said() == (f"imported 0 answers into {store.root}; no query is open: the run is not "
                      f"waiting for answers (when no starlora run works in it, {resume} "
                      "continues it)")
    store.set_state(1, "evaluate", finished=True)
    assert said() == f"imported 0 answers into {store.root}; no query is open: the run is finished"


def _answer(question: str) -> str:
    a, b = question.removeprefix("What is ").removesuffix("?").split(" + ")
    return str(int(a) + int(b))


@pytest.mark.slow
def test_a_human_oracle_run_on_a_pool_without_answers(tmp_path: Path, capsys) -> None:
    """Three pauses, three ways to answer: a JSONL import; a partial CSV import and the rest;
    a Label Studio export, edited, imported. The run then finishes, and labelled.jsonl holds
    exactly the imported answers."""
    pool, test = tmp_path / "pool.jsonl", tmp_path / "test.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + {i % 7}?"})
                            + "\n" for i in range(30)))
    test.write_text("".join(json.dumps({"question": f"What is {i} + 9?", "answer": str(i + 9)})
                            + "\n" for i in range(40, 44)))
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    run_dir = tmp_path / "run"
    run = ["run", str(tiny), "--run-dir", str(run_dir), "--set", "task.name=jsonl",
           "--set", f"task.train={pool}", "--set", f"task.test={test}",
           "--set", "active_learning.oracle=human", "--set", "active_learning.rounds=3",
           "--set", "active_learning.initial_size=4", "--set", "active_learning.query_size=4"]
    imported: dict[str, str] = {}
    notes = []  # the note on bare prompts to a model with a chat template: as the run starts

    def pause() -> list[dict]:
        assert main(run) == 0
        said = capsys.readouterr()
        assert "4 queries of round " in said.out
        notes.append(said.err.count("note: the prompts go in as their bare text"))
        pending = RunStore.open(run_dir).pending()
        assert len(pending) == 4 and main(["status", str(run_dir), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["pending"] == 4
        return pending

    # 1: the initial set, answered in JSONL
    rows = pause()
    assert all(r["draft"] is not None and r["prompt"].startswith("What is") for r in rows)
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"id": r["id"], "answer": _answer(r["question"])})
                               + "\n" for r in rows))
    assert main(["import", str(run_dir), str(answers)]) == 0
    imported.update({r["id"]: _answer(r["question"]) for r in rows})
    # 2: after round 0, a CSV with two answers, then the other two
    rows = pause()
    assert rows[0]["uncertainty"] >= rows[-1]["uncertainty"]  # highest uncertainty first
    for part, name in ((rows[:2], "b1.csv"), (rows[2:], "b2.csv")):
        (tmp_path / name).write_text("id,answer\n" + "".join(
            f"{r['id']},{_answer(r['question'])}\n" for r in part))
        assert main(["import", str(run_dir), str(tmp_path / name)]) == 0
        imported.update({r["id"]: _answer(r["question"]) for r in part})
    # 3: after round 1, through Label Studio
    pause()
    assert main(["export", str(run_dir), "--format", "label-studio",
                 "--out", str(tmp_path / "ls.json")]) == 0
    tasks = json.loads((tmp_path / "ls.json").read_text())
    for t in tasks:
        t["annotations"] = [{"was_cancelled": False, "result": [
            {"from_name": "answer", "to_name": "prompt", "type": "textarea",
             "value": {"text": [_answer(t["data"]["question"])]}}]}]
        imported[t["data"]["id"]] = _answer(t["data"]["question"])
    (tmp_path / "ls-export.json").write_text(json.dumps(tasks))
    assert main(["import", str(run_dir), str(tmp_path / "ls-export.json")]) == 0
    capsys.readouterr()
    assert main(run) == 0
    assert "run finished" in capsys.readouterr().out
    store = RunStore.open(run_dir)
    assert {r["id"]: r["answer"] for r in store.labelled()} == imported
    assert [m["n_labelled"] for m in store.metrics()] == [4, 8, 12]
    assert notes == [1, 0, 0]
    assert {r["source"] for r in store.labelled()} == {
        "import:a.jsonl", "import:b1.csv", "import:b2.csv", "import:ls-export.json"}


@pytest.mark.slow
def test_a_human_run_resumes_from_its_run_dir_with_one_round_number_everywhere(
        tmp_path: Path, capsys) -> None:
    """Started with a config and --set overrides, a paused human run goes on with `starlora
    run --run-dir RUN` alone; the pause message and status print exactly that command, and a
    query's round is the same number in the message, status, the export, the annotate page,
    the log, queries/<r>.jsonl and labelled.jsonl."""
    from starlette.testclient import TestClient

    from starlora.annotate.app import create_app

    pool, test = tmp_path / "pool.jsonl", tmp_path / "test.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + {i % 7}?"})
                            + "\n" for i in range(20)))
    test.write_text("".join(json.dumps({"question": f"What is {i} + 9?", "answer": str(i + 9)})
                            + "\n" for i in range(40, 42)))
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    run_dir = tmp_path / "run"
    resume = f"starlora run --run-dir {run_dir}"
    first = ["run", str(tiny), "--run-dir", str(run_dir), "--set", "task.name=jsonl",
             "--set", f"task.train={pool}", "--set", f"task.test={test}",
             "--set", "active_learning.oracle=human", "--set", "active_learning.rounds=2",
             "--set", "active_learning.initial_size=3", "--set", "active_learning.query_size=3",
             "--set", "evaluation.max_new_tokens=4"]

    def check_paused(r: int, out: str, err: str) -> None:
        assert f"3 queries of round {r} wait for answers" in out and out.rstrip().endswith(resume)
        assert f"paused: 3 queries of round {r} wait for answers" in err
        assert main(["status", str(run_dir), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert (status["round"], status["pending"], status["resume"]) == (r, 3, resume)
        assert main(["status", str(run_dir)]) == 0
        assert f"resume:     {resume}\n" in capsys.readouterr().out
        assert main(["export", str(run_dir), "--format", "jsonl",
                     "--out", str(tmp_path / f"q{r}.jsonl")]) == 0  # a file per round
        rows = [json.loads(line) for line in (tmp_path / f"q{r}.jsonl").read_text().splitlines()]
        assert {row["round"] for row in rows} == {r}
        page = TestClient(create_app(run_dir, "t")).get(
            "/api/queries", headers={"Authorization": "Bearer t"}).json()
        assert (page["round"], page["continue"]) == (r, resume)
        assert (run_dir / "queries" / f"{r}.jsonl").is_file()
        answers = tmp_path / f"a{r}.jsonl"
        answers.write_text("".join(json.dumps({"id": row["id"], "answer": _answer(
            row["question"])}) + "\n" for row in rows))
        assert main(["import", str(run_dir), str(answers)]) == 0
        capsys.readouterr()

    assert main(first) == 0
    check_paused(0, *capsys.readouterr())
    assert main(["run", "--run-dir", str(run_dir)]) == 0  # no config, no --set
    out, err = capsys.readouterr()
    assert "resuming at round 0" in err and "round 0/1: training on 3 labelled" in err
    check_paused(1, out, err)
    assert main(["run", "--run-dir", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert "resuming at round 1" in err and "round 1/1: training on 6 labelled" in err
    assert "run finished" in out
    store = RunStore.open(run_dir)
    assert store.config == load_config(tiny, first[5::2])  # the overrides held throughout
    assert sorted({(r["round"], r["source"].split(":")[0]) for r in store.labelled()}) == [
        (0, "import"), (1, "import")]
    assert [m["n_labelled"] for m in store.metrics()] == [3, 6]


def test_a_paused_run_counts_its_queries_in_words_that_agree() -> None:
    from starlora.run.oracle import Paused, waiting

    one, three = waiting("runs/r", 1, 0), waiting("runs/r", 3, 2)
    assert one.startswith("1 query of round 0 waits for answers: starlora annotate runs/r ")
    assert three.startswith("3 queries of round 2 wait for answers: ")
    assert one.endswith("then starlora run --run-dir runs/r")
    assert str(Paused(Path("runs/r"), 3, 2)) == three  # one text for the run and the command
    # each round's export gets its own file; a path with a space is quoted in every command
    spaced = waiting("runs/my run", 2, 1)
    assert ("starlora annotate 'runs/my run' (or starlora export 'runs/my run' --out "
            "queries-round1.csv, then starlora import 'runs/my run' queries-round1.csv)") in spaced


def test_export_takes_its_format_from_the_name_and_refuses_a_folder(
        store: RunStore, tmp_path: Path, capsys) -> None:
    """`--out q.csv` writes CSV (the default was JSONL whatever the name, which `starlora
    import q.csv` then refused); a name that says no format, or a folder, is an error that
    names it (a folder was a traceback), and nothing is written."""
    assert main(["export", str(store.root), "--out", str(tmp_path / "q.csv")]) == 0
    assert (tmp_path / "q.csv").read_text().startswith("id,question,prompt,draft,")
    (tmp_path / "q.csv").write_text((tmp_path / "q.csv").read_text().replace(",1\n", ",1,5\n"))
    assert main(["import", str(store.root), str(tmp_path / "q.csv")]) == 0
    capsys.readouterr()
    (tmp_path / "folder.csv").mkdir()
    for out, said in ((tmp_path / "q.txt", "cannot tell the format from the name"),
                      (tmp_path / "folder.csv", "is a folder; give a file name")):
        assert main(["export", str(store.root), "--out", str(out)]) == 2
        assert f"{out}: {said}" in capsys.readouterr().err
    assert not (tmp_path / "q.txt").exists()


def test_status_counts_the_rounds_a_budget_leaves(tmp_path: Path) -> None:
    """`starlora status` said "rounds 0-6" of a run whose budget of 48 labels ends it after
    round 2 (16 + 2 x 16); it counts the rounds the run plans, from round 0's labelled set."""
    from starlora.report_confidence import status_lines

    config = load_config(None, ["active_learning.budget=48", "active_learning.rounds=7",
                                "active_learning.initial_size=16", "active_learning.query_size=16"])
    store = RunStore.create_or_resume(tmp_path / "run", config)
    store.add_labels([{"id": f"p{i}", "round": 0, "answer": "x", "source": "simulated"}
                      for i in range(16)])
    status = store.status()
    assert status["rounds"] == 3
    assert "(rounds 0-2)" in "\n".join(status_lines(store.root, status))
    store.add_labels([{"id": f"f{i}", "round": 0, "answer": "x", "source": "file:l.jsonl"}
                      for i in range(16)])  # 32 labelled at round 0: 32 + 16 = 48
    assert store.status()["rounds"] == 2


def test_export_never_replaces_a_file_without_force(store: RunStore, tmp_path: Path,
                                                    capsys) -> None:
    """Running the printed export command again replaced a filled-in answer sheet without a
    word, and `--out RUN/labelled.jsonl` replaced the run's labels (the run then failed with
    a KeyError). An existing file needs --force; the run directory is refused always."""
    sheet = tmp_path / "q.csv"
    assert main(["export", str(store.root), "--out", str(sheet)]) == 0
    sheet.write_text(sheet.read_text().replace(",1,\n", ",1,MY ANSWER\n", 1))
    assert main(["export", str(store.root), "--out", str(sheet)]) == 2
    assert "q.csv: exists (answers typed into it" in capsys.readouterr().err
    assert "MY ANSWER" in sheet.read_text()
    assert main(["export", str(store.root), "--out", str(sheet), "--force"]) == 0
    assert "MY ANSWER" not in sheet.read_text()
    before = snapshot(store.root)
    for inside in (store.root / "labelled.jsonl", store.root / "q.jsonl"):
        assert main(["export", str(store.root), "--out", str(inside), "--force"]) == 2
        assert "inside the run directory" in capsys.readouterr().err
    assert snapshot(store.root) == before


def test_answers_saved_already_as_they_are_import_again_without_error(store: RunStore,
                                                                     tmp_path: Path) -> None:
    """A Label Studio project kept across rounds exports every task each time: answers of an
    earlier round, or saved already, were each an error and the whole file was refused. The
    same answer is now left as it is; another answer to one of them is still an error."""
    kept = tmp_path / "project.jsonl"
    kept.write_text("".join(json.dumps(r) + "\n" for r in (
        {"id": "a", "answer": "x"}, {"id": "q3", "answer": " 6"}, {"id": "q0", "answer": "0"})))
    assert import_labels(store, kept) == (1, 2)
    assert import_labels(store, kept) == (0, 2)  # the same file again: nothing to do
    labels = {r["id"]: (r["answer"], r["source"]) for r in store.labelled()}
    assert labels["a"] == ("x", "simulated") and labels["q3"] == ("6", "import:first.jsonl")
    kept.write_text(json.dumps({"id": "a", "answer": "y"}) + "\n")
    with pytest.raises(DataError, match="project.jsonl:1: id: 'a' is not pending: labelled"):
        import_labels(store, kept)


def test_unreadable_answer_and_run_files_are_named_errors(store: RunStore, tmp_path: Path,
                                                          capsys) -> None:
    """An answer file saved with a byte-order mark reads as without (it was "id: missing
    column"); a folder given as the answer file, and a hand-edited labelled.jsonl that is no
    longer JSON, were tracebacks: each is now one line naming the file (and line)."""
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfid,answer\nq0,0\n")
    assert import_labels(store, tmp_path / "bom.csv") == (1, 2)
    (tmp_path / "adir.csv").mkdir()
    assert main(["import", str(store.root), str(tmp_path / "adir.csv")]) == 2
    assert "adir.csv: cannot be read (Is a directory)" in capsys.readouterr().err
    labelled = store.root / "labelled.jsonl"
    lines = labelled.read_text().splitlines()
    labelled.write_text(lines[0] + ",\n" + "\n".join(lines[1:]) + "\n")
    for command in (["status", str(store.root)], ["export", str(store.root), "--out",
                                                  str(tmp_path / "e.jsonl")]):
        assert main(command) == 2
        assert "labelled.jsonl:1: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("row,said", [
    ({"round": 1, "answer": "x", "source": "me"}, "labelled.jsonl:3: id: missing"),
    ({"id": 7, "round": 1, "answer": "x"}, "labelled.jsonl:3: id: must be a string, got int"),
    ({"id": "q0", "round": 1}, "labelled.jsonl:3: answer: missing"),
    ({"id": "q3", "round": 1, "answer": "5"},
     "labelled.jsonl:3: id: 'q3' labelled twice (first on line 2)"),
])
def test_a_hand_broken_labelled_file_is_a_named_error_in_every_command(
        store: RunStore, tmp_path: Path, capsys, row: dict, said: str) -> None:
    """Review 15, 5: a labelled.jsonl row without an id (or with a number for one) made
    status, export, import and annotate end in a KeyError traceback. Each now says which
    file, line and field, exits 2, and changes nothing."""
    from starlora.annotate.app import create_app

    with open(store.root / "labelled.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    (tmp_path / "a.csv").write_text("id,answer\nq1,2\n")
    before = snapshot(store.root)
    for command in (["status", str(store.root)], ["import", str(store.root), str(tmp_path / "a.csv")],
                    ["export", str(store.root), "--out", str(tmp_path / "e.jsonl")]):
        assert main(command) == 2, command
        assert said in capsys.readouterr().err
    with pytest.raises(DataError, match=re.escape(said)):
        create_app(store.root, "t")  # `starlora annotate` refuses before serving
    assert snapshot(store.root) == before and not (tmp_path / "e.jsonl").exists()


def test_a_labelled_id_in_no_data_file_is_a_named_error_before_training(store: RunStore) -> None:
    """Review 15, 5: an id that is not in the pool (a hand-added row) was a KeyError in
    `starlora run`; it is a DataError naming labelled.jsonl, the line and the id."""
    from starlora.run.context import Run
    from starlora.tasks import Example

    by_id = {i: Example(i, f"question {i}", None) for i in ("a", "q0", "q1", "q2")}
    run = Run(store.config, store, None, None, None, 1, False, by_id=by_id)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"labelled.jsonl:2: id: 'q3' is not in the pool nor in "
                                        r"task.labelled$"):
        run.check_labels()
    by_id["q3"] = Example("q3", "question q3", None)
    assert [(ex.id, ex.question, ex.answer) for ex in run.labelled_examples()] == [
        ("a", "question a", "x"), ("q3", "question q3", "6")]

