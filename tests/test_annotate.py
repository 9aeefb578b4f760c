"""``starlora annotate``: the JSON API (Starlette's TestClient) and the page in a real headless
Chromium (Debian's ``chromium``, driven by Playwright; those tests skip without it).

Paused runs are made without a model, as in test_run_labels.py: a run directory plus a
queries file. One slow test answers a real paused tiny run through the API and continues it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from starlora.annotate import app as app_module
from starlora.annotate.app import MAX_BODY, create_app
from starlora.annotate.server import make_server
from starlora.cli import main
from starlora.config import load_config
from starlora.errors import StarloraError
from starlora.run.store import RunStore

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVIL = "<img src=x onerror=alert(1)>"
QUERIES = [
    {"id": f"q{i}", "question": f"What is {i} + {i}?", "prompt": f"Question: What is {i} + {i}?"
     "\nAnswer:", "draft": f"{i + i + 1}", "uncertainty": round(0.9 - i / 10, 2), "round": 1}
    for i in range(4)
]


def paused(root: Path, rows: list[dict] = QUERIES, saved: dict[str, str] | None = None) -> RunStore:
    """A run directory paused on a human query of `rows` (with answers `saved` already)."""
    store = RunStore.create_or_resume(root, load_config(None, ["active_learning.oracle=human"]))
    store.add_labels([{"id": "a", "round": 0, "answer": "x", "source": "simulated"}])
    store.write_queries(1, list(rows))
    if saved:
        store.save_labels(saved, "import:first.jsonl")
    return store


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    # listed out of order: the API sorts by uncertainty, highest first
    return paused(tmp_path / "run", [QUERIES[2], QUERIES[0], QUERIES[3], QUERIES[1]],
                  saved={"q3": "6"})


@pytest.fixture
def client(store: RunStore) -> TestClient:
    return TestClient(create_app(store.root, TOKEN))


# -- the API ----------------------------------------------------------------------------------
def test_requests_without_the_token_are_refused(client: TestClient) -> None:
    for headers, path in [({}, "/"), ({}, "/?token=wrong"), ({"Authorization": "Bearer x"}, "/"),
                          ({}, "/api/queries"), ({}, f"/api/queries?token={TOKEN}"),
                          ({"Authorization": "Basic " + TOKEN}, "/api/queries"), ({}, "/x.js")]:
        response = client.get(path, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert "missing or wrong token" in response.text and TOKEN not in response.text
    assert client.post("/api/labels", json={"id": "q0", "answer": "1"}).status_code == 401
    page = client.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and "starlora annotate" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'nonce-" in csp and "default-src 'none'" in csp
    assert client.get("/api/queries", headers=AUTH).status_code == 200


def test_the_api_lists_the_open_query_and_saves_through_the_store(client: TestClient,
                                                                  store: RunStore) -> None:
    data = client.get("/api/queries", headers=AUTH).json()
    assert [q["id"] for q in data["queries"]] == ["q0", "q1", "q2", "q3"]  # highest first
    assert (data["answered"], data["total"], data["round"]) == (1, 4, 1)
    assert data["queries"][3] == {**{k: QUERIES[3][k] for k in ("id", "question", "prompt",
                                                                "draft", "uncertainty")},
                                  "answer": "6", "answer_sha256": sha256(b"6").hexdigest()}
    root = store.root
    assert data["continue"] == f"starlora run --run-dir {root}"
    response = client.post("/api/labels", headers=AUTH, json={"id": "q1", "answer": " 2\n"})
    assert response.status_code == 200
    assert response.json() == {"id": "q1", "answer": "2", "answered": 2, "total": 4,
                               "answer_sha256": sha256(b"2").hexdigest()}
    # a saved answer may be revised, an imported one too; the source says where it came from
    assert client.post("/api/labels", headers=AUTH, json={"id": "q3", "answer": "7"}).json()[
        "answered"] == 2
    labels = {r["id"]: (r["answer"], r["source"]) for r in RunStore.open(root).labelled()}
    assert labels == {"a": ("x", "simulated"), "q1": ("2", "annotate"), "q3": ("7", "annotate")}
    assert [q["id"] for q in store.pending()] == ["q2", "q0"]  # the store's own order


def test_a_save_over_an_answer_saved_meanwhile_gets_409_and_keeps_it(
        client: TestClient, store: RunStore) -> None:
    """Two people answer q1, both having seen no answer: the first save stands, the second
    gets 409 with the first's answer and saves nothing; sent again as a change of that
    answer, it replaces it. Without ``previous`` a save replaces whatever is saved."""
    def post(body: dict) -> tuple[int, dict]:
        response = client.post("/api/labels", headers=AUTH, json=body)
        return response.status_code, response.json()

    def saved() -> dict[str, str]:
        return {r["id"]: r["answer"] for r in RunStore.open(store.root).labelled()}

    assert post({"id": "q1", "answer": "2", "previous": None})[0] == 200
    before = snapshot(store.root)
    code, body = post({"id": "q1", "answer": "3", "previous": None})
    assert code == 409 and body["id"] == "q1" and body["current"] == "2"
    assert "someone saved another answer to 'q1' meanwhile" in body["error"]
    assert snapshot(store.root) == before and saved()["q1"] == "2"
    assert post({"id": "q1", "answer": "3", "previous": "2"}) == (
        200, {"id": "q1", "answer": "3", "answer_sha256": sha256(b"3").hexdigest(),
              "answered": 2, "total": 4})
    # a revision of one's own saved answer, and of an imported one
    assert post({"id": "q1", "answer": "4", "previous": "3"})[0] == 200
    assert post({"id": "q3", "answer": "7", "previous": "5"})[1]["current"] == "6"
    assert post({"id": "q3", "answer": "7", "previous": "6"})[0] == 200
    assert post({"id": "q1", "answer": " 4 ", "previous": None})[0] == 200  # the same answer
    assert post({"id": "q1", "answer": "9"})[0] == 200  # no `previous`: not checked
    assert (saved()["q1"], saved()["q3"]) == ("9", "7")
    assert post({"id": "q0", "answer": "1", "previous": 5}) == (
        400, {"error": "previous: not a string or null"})


def test_saving_an_answer_again_as_it_is_changes_no_byte(client: TestClient,
                                                         store: RunStore) -> None:
    """Review 15, 1: Ctrl+Enter again on a saved query rewrote labelled.jsonl with its row
    moved to the end (training follows that order). The same answer is now left as it is;
    a revision replaces the row where it stands."""
    def post(body: dict) -> int:
        return client.post("/api/labels", headers=AUTH, json=body).status_code

    assert post({"id": "q1", "answer": "2"}) == 200
    before = snapshot(store.root)
    assert post({"id": "q3", "answer": " 6", "previous_sha256": sha256(b"6").hexdigest()}) == 200
    assert post({"id": "q3", "answer": "6"}) == 200
    assert snapshot(store.root) == before
    assert post({"id": "q3", "answer": "7"}) == 200
    assert [(r["id"], r["answer"], r["round"]) for r in store.labelled()] == [
        ("a", "x", 0), ("q3", "7", 1), ("q1", "2", 1)]


def test_a_labelled_file_broken_while_serving_is_named_not_a_traceback(
        client: TestClient, store: RunStore) -> None:
    """Review 15, 5: a labelled.jsonl row without an id made GET /api/queries a 500 from a
    KeyError, and a save said "id: missing" as if the request lacked it. Both now name the
    file and line, and nothing is saved."""
    with open(store.root / "labelled.jsonl", "a") as f:
        f.write('{"round": 1, "answer": "x"}\n')
    before = snapshot(store.root)
    for response in (client.get("/api/queries", headers=AUTH),
                     client.post("/api/labels", headers=AUTH, json={"id": "q1", "answer": "2"})):
        assert response.status_code == 500
        assert response.json()["error"].endswith("labelled.jsonl:3: id: missing")
    assert snapshot(store.root) == before


@pytest.mark.parametrize("body,error", [
    ({"id": "zz", "answer": "1"}, "id: 'zz' unknown id"),
    ({"id": "a", "answer": "1"}, "id: 'a' is not pending"),
    ({"id": "a", "answer": "x"}, "id: 'a' is not pending"),  # as saved in round 0: still 400
    ({"id": "q0", "answer": "  "}, "answer: empty answer for id 'q0'"),
    ({"id": "q0"}, "answer: missing, or not a string"),
    ({"id": 3, "answer": "1"}, "id: missing, or not a string"),
    (["q0", "1"], "the body must be a JSON object"),
    (b'{"id": "q0", "answer": ', "the body is not valid JSON"),
])
def test_a_bad_answer_gets_400_with_the_error_text(client: TestClient, store: RunStore,
                                                   body: object, error: str) -> None:
    before = snapshot(store.root)
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = client.post("/api/labels", headers=AUTH, **kwargs)
    assert response.status_code == 400 and response.json()["error"].startswith(error)
    assert snapshot(store.root) == before


def test_a_body_over_the_limit_gets_413(client: TestClient, store: RunStore) -> None:
    before = snapshot(store.root)
    big = json.dumps({"id": "q0", "answer": "9" * MAX_BODY}).encode()
    response = client.post("/api/labels", headers=AUTH, content=big)  # Content-Length declared
    assert response.status_code == 413 and "over 65536 bytes" in response.json()["error"]
    chunks = (big[i:i + 8192] for i in range(0, len(big), 8192))  # chunked: counted as it comes
    assert client.post("/api/labels", headers=AUTH, content=chunks).status_code == 413
    assert snapshot(store.root) == before


def test_once_the_run_closes_the_query_a_save_gets_400(client: TestClient, store: RunStore) -> None:
    for i in range(3):
        assert client.post("/api/labels", headers=AUTH,
                           json={"id": f"q{i}", "answer": str(2 * i)}).status_code == 200
    assert store.close_query(1)  # what `starlora run` does before it goes on
    response = client.post("/api/labels", headers=AUTH, json={"id": "q0", "answer": "5"})
    assert response.status_code == 400
    assert response.json()["error"].startswith("the run has gone on: query 1 is closed")
    data = client.get("/api/queries", headers=AUTH).json()
    assert (data["queries"], data["round"], data["total"]) == ([], None, 0)
    assert {r["id"]: r["answer"] for r in store.labelled()}["q0"] == "0"


def test_saves_racing_the_runs_close_lose_no_label(client: TestClient, store: RunStore) -> None:
    """Revisions keep coming while the run closes the query: the label the run keeps is the
    last one the API confirmed, and every save after the close is refused."""
    for i in range(3):
        client.post("/api/labels", headers=AUTH, json={"id": f"q{i}", "answer": "0"})
    confirmed: list[str] = []
    refused: list[str] = []

    def revise() -> None:
        for n in range(1, 500):
            r = client.post("/api/labels", headers=AUTH, json={"id": "q0", "answer": str(n)})
            if r.status_code != 200:
                refused.append(r.json()["error"])
                return
            confirmed.append(str(n))

    worker = threading.Thread(target=revise)
    worker.start()
    time.sleep(0.05)
    closed = store.close_query(1)
    worker.join()
    assert closed and confirmed and refused[0].startswith("the run has gone on")
    assert {r["id"]: r["answer"] for r in store.labelled()}["q0"] == confirmed[-1]


def test_a_save_waits_for_the_lock_another_process_holds(client: TestClient, store: RunStore,
                                                         monkeypatch) -> None:
    """The lock is the run directory's file lock, so it also holds across processes: a save
    waits for it, and gets 503 when it waits too long."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock\n"
         "with FileLock(sys.argv[1]):\n print('held', flush=True); time.sleep(0.8)",
         str(store.paths.lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(app_module, "LOCK_TIMEOUT", 0.1)
        busy = client.post("/api/labels", headers=AUTH, json={"id": "q0", "answer": "0"})
        assert busy.status_code == 503 and "holds the run's lock" in busy.json()["error"]
        monkeypatch.setattr(app_module, "LOCK_TIMEOUT", 10.0)
        start = time.monotonic()
        ok = client.post("/api/labels", headers=AUTH, json={"id": "q0", "answer": "0"})
        assert ok.status_code == 200
        assert time.monotonic() - start > 0.2  # it waited for the holder to let go
    finally:
        holder.kill()
        holder.wait()
    assert {r["id"]: r["answer"] for r in store.labelled()}["q0"] == "0"


def test_the_command_refuses_a_folder_that_is_not_a_run_and_a_busy_port(store: RunStore,
                                                                         capsys) -> None:
    assert main(["annotate", str(store.root.parent), "--port", "0"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        assert main(["annotate", str(store.root), "--port", port]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err
    # review 15, 9a: a port past 65535 was an OverflowError traceback, and a host that does
    # not resolve "cannot listen there (Unknown error -2)"
    for args, said in ((["--port", "99999"], "--port 99999: not a port number (0 to 65535"),
                       (["--port", "-1"], "--port -1: not a port number"),
                       (["--host", "nosuch.invalid", "--port", "0"],
                        "--host nosuch.invalid: cannot resolve it (")):
        assert main(["annotate", str(store.root), *args]) == 2
        err = capsys.readouterr().err
        assert said in err and "Unknown error" not in err and "Traceback" not in err


# -- the page in a real browser ---------------------------------------------------------------
CHROMIUM = os.environ.get("STARLORA_CHROMIUM") or shutil.which("chromium") or ""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM:
        pytest.skip("no chromium: install Debian's `chromium` package (apt-get install -y "
                    "chromium) for the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RunStore, str]]:
    """A paused run of 4 queries, the API serving it over HTTP on a free loopback port."""
    store = paused(tmp_path / "run", [*QUERIES[:3], {**QUERIES[3], "prompt": f"Why {EVIL}?",
                                                     "question": EVIL, "draft": EVIL}])
    server, sock, url = make_server(store.root, port=0, token=TOKEN)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield store, url
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_two_answers_by_keyboard_survive_a_reload(browser, served) -> None:
    store, url = served
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.get_by_text("0 of 4 answered").wait_for()
    assert page.locator("#prompt").text_content() == QUERIES[0]["prompt"]
    assert page.locator("#answer").input_value() == "1"  # the draft, prefilled
    timings = []
    for n, expected in ((1, "0"), (2, "2")):
        assert page.evaluate("document.activeElement.id") == "answer"
        page.keyboard.press("Control+a")
        page.keyboard.type(expected)
        with page.expect_response(lambda r: r.url.endswith("/api/labels")) as saved:
            page.keyboard.press("Control+Enter")
        assert saved.value.status == 200
        page.get_by_text(f"{n} of 4 answered").wait_for()
        timings.append(page.evaluate(  # ms from navigation start to the POST's response
            "performance.getEntriesByType('resource')"
            ".filter(e => e.name.endsWith('/api/labels')).pop().responseEnd"))
    assert page.locator("#prompt").text_content() == QUERIES[2]["prompt"]  # moved on
    print(f"\nfirst answer by keyboard, navigation start to saved: {timings[0]:.0f} ms; "
          f"second: {timings[1] - timings[0]:.0f} ms after the first")
    assert timings[0] < 5000
    page.reload()
    page.get_by_text("2 of 4 answered").wait_for()
    assert page.locator("nav .mark").all_text_contents()[:3] == ["✓", "✓", ""]
    page.locator("nav button").first.click()
    assert page.locator("#answer").input_value() == "0"
    assert "(saved)" in page.locator("#answer-note").text_content()
    labels = {r["id"]: (r["answer"], r["source"]) for r in RunStore.open(store.root).labelled()}
    assert labels == {"a": ("x", "simulated"), "q0": ("0", "annotate"), "q1": ("2", "annotate")}
    page.close()


def test_markup_in_a_prompt_shows_as_text_and_runs_nothing(browser, served) -> None:
    store, url = served
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url)
    page.get_by_text("0 of 4 answered").wait_for()
    page.locator("nav button").nth(3).click()
    assert page.locator("#prompt").text_content() == f"Why {EVIL}?"
    assert page.locator("#answer").input_value() == EVIL
    assert EVIL in page.locator("nav").inner_text()
    assert page.locator("img").count() == 0 and dialogs == []
    # answering every query shows the command that continues the run
    for n in range(1, 5):  # each save moves on to the next unanswered query
        page.keyboard.press("Control+Enter")
        page.get_by_text(f"{n} of 4 answered").wait_for()
    assert page.locator("#done").is_visible()
    root = store.root
    assert page.locator("#continue").text_content() == f"starlora run --run-dir {root}"
    assert page.locator("img").count() == 0 and dialogs == []
    assert store.pending() == [] and store.close_query(1)
    page.close()


def test_two_people_answering_one_query_see_the_conflict(browser, served) -> None:
    """Two pages open on one query: the first saves q0; the second, which had not seen it,
    is told and keeps its own text in the box (nothing saved); saving again replaces it."""
    store, url = served
    first, second = browser.new_page(), browser.new_page()
    for page in (first, second):
        page.goto(url)
        page.get_by_text("0 of 4 answered").wait_for()
    first.locator("#answer").fill("0")
    first.keyboard.press("Control+Enter")
    first.get_by_text("1 of 4 answered").wait_for()
    second.locator("#answer").fill("5")
    with second.expect_response(lambda r: r.url.endswith("/api/labels")) as sent:
        second.keyboard.press("Control+Enter")
    assert sent.value.status == 409
    second.get_by_text("1 of 4 answered").wait_for()
    status = second.locator("#status").text_content()
    assert 'someone else saved "0" to q0 meanwhile' in status
    assert second.locator("#answer").input_value() == "5"
    assert second.locator("#answer-note").text_content() == "(yours, not saved)"
    assert second.locator("nav .mark").first.text_content() == "✓"
    assert {r["id"]: r["answer"] for r in store.labelled()}["q0"] == "0"
    with second.expect_response(lambda r: r.url.endswith("/api/labels")) as sent:
        second.keyboard.press("Control+Enter")
    assert sent.value.status == 200
    second.get_by_text("Saved the answer to q0").wait_for()
    assert {r["id"]: r["answer"] for r in store.labelled()}["q0"] == "5"
    first.close()
    second.close()


def test_the_browser_without_the_token_is_refused(browser, served) -> None:
    _, url = served
    page = browser.new_page()
    bare = url.split("?")[0]
    assert page.goto(bare).status == 401
    assert page.goto(url.replace(TOKEN, "wrong")).status == 401
    assert page.request.get(bare + "api/queries").status == 401
    assert page.request.get(bare + "api/queries", headers=AUTH).status == 200
    page.close()


# -- a real run -------------------------------------------------------------------------------
@pytest.mark.slow
def test_answers_saved_through_the_api_are_what_the_run_trains_on(tmp_path: Path, capsys) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + 3?"}) + "\n"
                            for i in range(12)))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"question": f"What is {i} + 9?", "answer": str(i + 9)})
                            + "\n" for i in range(40, 42)))
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    run_dir = tmp_path / "run"
    run = ["run", str(tiny), "--run-dir", str(run_dir), "--set", "task.name=jsonl",
           "--set", f"task.train={pool}", "--set", f"task.test={test}",
           "--set", "active_learning.oracle=human", "--set", "active_learning.rounds=2",
           "--set", "active_learning.initial_size=3", "--set", "active_learning.query_size=3",
           "--set", "evaluation.max_new_tokens=4"]
    assert main(run) == 0
    client = TestClient(create_app(run_dir, TOKEN))
    data = client.get("/api/queries", headers=AUTH).json()
    rows = data["queries"]
    assert len(rows) == 3 and all(q["draft"] is not None for q in rows)
    for q in rows:
        n = int(q["question"].split()[2])
        assert client.post("/api/labels", headers=AUTH,
                           json={"id": q["id"], "answer": str(n + 3)}).status_code == 200
    # the page's command (resuming from the run's config.yaml) continues it: trains round 0 on the
    # answers, then pauses on round 1's query
    command = shlex.split(data["continue"])
    assert command[:2] == ["starlora", "run"] and main(command[1:]) == 0
    store = RunStore.open(run_dir)
    assert store.metrics()[0]["n_labelled"] == 3 and len(store.pending()) == 3
    assert {r["source"] for r in store.labelled()} == {"annotate"}
    response = client.post("/api/labels", headers=AUTH, json={"id": rows[0]["id"], "answer": "1"})
    assert response.status_code == 400 and "the run has gone on" in response.json()["error"]


@pytest.mark.parametrize("token", ["pässwort", "tok€n", " padded", "tab\there"])
def test_a_token_the_page_cannot_send_is_refused(store: RunStore, token: str) -> None:
    """The page sends the token in an Authorization header: a browser refuses one with
    characters beyond Latin-1 (the page then failed on every save), and a bearer token loses
    spaces at its ends. Refused before serving, with the reason."""
    with pytest.raises(StarloraError, match="--token: use printable ASCII"):
        create_app(store.root, token)
