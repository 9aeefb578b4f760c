"""``starlora annotate``: what the page keeps while a save waits for the run's lock, answers
too long to send twice, and tokens that need escaping in the printed URL. The browser tests
drive Debian's ``chromium`` with Playwright (they skip without it), with the fixtures of
test_annotate.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient
from test_annotate import AUTH, QUERIES, TOKEN, browser, paused, served  # noqa: F401

from starlora.annotate.app import MAX_BODY, create_app
from starlora.annotate.server import make_server
from starlora.run.store import RunStore

LONG = 40_000  #: characters of an answer over half the body limit


def saved(store: RunStore) -> dict[str, str]:
    return {r["id"]: r["answer"] for r in RunStore.open(store.root).labelled()}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextmanager
def lock_held(store: RunStore) -> Iterator[Callable[[], None]]:
    """Another process holds the run's lock (as a running ``starlora run`` may) until the
    function this yields is called: the page's saves wait for it meanwhile."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from filelock import FileLock\n"
         "with FileLock(sys.argv[1]):\n print('held', flush=True); sys.stdin.readline()",
         str(store.paths.lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def release() -> None:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(10)

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield release
    finally:
        holder.kill()
        holder.wait()


def opened(browser, url: str, answered: str = "0 of 4 answered"):  # noqa: F811
    page = browser.new_page()
    page.goto(url)
    page.get_by_text(answered).wait_for()
    return page


def save_seven_while_locked(page, store: RunStore, meanwhile: Callable[[], None]) -> Any:
    """Type "7" as q0's answer and send it (Ctrl+Enter) while another process holds the run's
    lock; `meanwhile` runs while the save waits; then the lock is released. Returns the
    save's response."""
    page.keyboard.press("Control+a")
    page.keyboard.type("7")
    with lock_held(store) as release:
        with page.expect_response(lambda r: r.url.endswith("/api/labels")) as sent:
            page.keyboard.press("Control+Enter")
            page.get_by_text("saving…").wait_for()
            meanwhile()
            release()
    return sent.value


# -- what is typed while a save waits ---------------------------------------------------------
def test_text_typed_on_the_query_while_its_save_waits_is_kept(browser, served) -> None:  # noqa: F811
    """q0's answer "7" is sent while another process holds the lock; the labeller goes on
    typing ("78"). Once "7" is saved the page stays on q0 with "78" in the box, unsaved, and
    q0 marked saved; saving again revises it to "78" and moves on."""
    store, url = served
    page = opened(browser, url)
    assert save_seven_while_locked(page, store, lambda: page.keyboard.type("8")).status == 200
    page.get_by_text("Saved the answer to q0").wait_for()
    assert saved(store)["q0"] == "7"
    assert page.locator("#prompt").text_content() == QUERIES[0]["prompt"]  # stayed
    assert page.locator("#answer").input_value() == "78"
    assert page.locator("#answer-note").text_content() == "(edited, not saved)"
    assert page.locator("nav .mark").first.text_content() == "✓"
    page.get_by_text("1 of 4 answered").wait_for()
    with page.expect_response(lambda r: r.url.endswith("/api/labels")) as sent:
        page.keyboard.press("Control+Enter")
    assert sent.value.status == 200  # a revision of "7", which the page knows is saved now
    page.get_by_text("Saved the answer to q0").wait_for()
    assert saved(store)["q0"] == "78"
    assert page.locator("#prompt").text_content() == QUERIES[1]["prompt"]  # moved on
    page.close()


def test_text_typed_on_another_query_while_a_save_waits_is_kept(browser, served) -> None:  # noqa: F811
    """q0's answer is sent while the lock is held; the labeller opens q2 and types there.
    Once q0's answer is saved the page stays on q2 with that text (it used to jump to q1, the
    next open query, and drop it); q0 shows its answer saved."""
    store, url = served
    page = opened(browser, url)

    def open_q2_and_type() -> None:
        page.locator("nav button").nth(2).click()
        assert page.locator("#prompt").text_content() == QUERIES[2]["prompt"]
        page.keyboard.press("Control+a")
        page.keyboard.type("44")

    assert save_seven_while_locked(page, store, open_q2_and_type).status == 200
    page.get_by_text("1 of 4 answered").wait_for()
    assert saved(store) == {"a": "x", "q0": "7"}
    assert page.locator("#prompt").text_content() == QUERIES[2]["prompt"]  # stayed on q2
    assert page.locator("#answer").input_value() == "44"
    assert page.locator("nav .mark").all_text_contents() == ["✓", "", "", ""]
    page.locator("nav button").first.click()
    assert page.locator("#answer").input_value() == "7"
    assert page.locator("#answer-note").text_content() == "(saved)"
    page.locator("nav button").nth(2).click()
    assert page.locator("#answer").input_value() == "44"
    assert page.locator("#answer-note").text_content() == "(edited, not saved)"
    page.close()


def test_a_save_asked_for_while_another_waits_is_not_silently_dropped(browser, served) -> None:  # noqa: F811
    """A second Ctrl+Enter while a save waits says so; once the first is saved the second
    text is still in the box, unsaved, and nothing else was sent."""
    store, url = served
    page = opened(browser, url)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.post_data or "") if r.method == "POST" else None)

    def type_and_save_again() -> None:
        page.keyboard.type("9")
        page.keyboard.press("Control+Enter")
        assert "a save is in progress" in page.locator("#status").text_content()

    assert save_seven_while_locked(page, store, type_and_save_again).status == 200
    page.get_by_text("Saved the answer to q0").wait_for()
    assert len(posts) == 1 and saved(store)["q0"] == "7"
    assert page.locator("#answer").input_value() == "79"
    assert page.locator("#answer-note").text_content() == "(edited, not saved)"
    page.close()


# -- long answers -----------------------------------------------------------------------------
def test_an_answer_over_half_the_body_limit_can_be_revised_on_the_page(browser, served) -> None:  # noqa: F811
    """A 40,000-character answer is saved, then replaced by another one, by the page (which
    used to send the saved answer along with the new one: 413)."""
    store, url = served
    assert MAX_BODY < 2 * LONG
    page = opened(browser, url)
    first, second = "1" * LONG, "2" * LONG
    page.locator("#answer").fill(first)
    with page.expect_response(lambda r: r.url.endswith("/api/labels")) as sent:
        page.keyboard.press("Control+Enter")
    assert sent.value.status == 200 and saved(store)["q0"] == first
    page.locator("nav button").first.click()
    page.locator("#answer").fill(second)
    with page.expect_response(lambda r: r.url.endswith("/api/labels")) as sent:
        page.keyboard.press("Control+Enter")
    assert sent.value.status == 200, sent.value.text()
    assert saved(store)["q0"] == second
    page.close()


def test_the_api_checks_the_digest_of_the_answer_the_sender_saw(tmp_path: Path) -> None:
    """The page sends ``previous_sha256``, the digest the API gave for the saved answer it
    saw (null: none): a 40,000-character answer is revised with a 64-character check, and a
    digest of another answer than the saved one is a 409 that saves nothing."""
    store = paused(tmp_path / "run", saved={"q3": "6"})
    client = TestClient(create_app(store.root, TOKEN))

    def post(body: dict) -> tuple[int, dict]:
        response = client.post("/api/labels", headers=AUTH, json=body)
        return response.status_code, response.json()

    rows = {q["id"]: q for q in client.get("/api/queries", headers=AUTH).json()["queries"]}
    assert rows["q3"]["answer_sha256"] == sha256("6") and rows["q0"]["answer_sha256"] is None
    first, second = "a" * LONG, "b" * LONG
    code, body = post({"id": "q0", "answer": first, "previous_sha256": None})
    assert code == 200 and body["answer_sha256"] == sha256(first)
    code, body = post({"id": "q0", "answer": second, "previous_sha256": None})  # saw none
    assert (code, body["current"], body["current_sha256"]) == (409, first, sha256(first))
    assert saved(store)["q0"] == first
    assert post({"id": "q0", "answer": second, "previous_sha256": sha256(first)})[0] == 200
    assert post({"id": "q0", "answer": first, "previous_sha256": sha256("x")})[0] == 409
    assert saved(store)["q0"] == second
    # the largest answer human-oracle.md promises: 65,000 ASCII characters, with the digest
    most = "c" * 65_000
    assert post({"id": "q0", "answer": most, "previous_sha256": sha256(second)})[0] == 200
    assert saved(store)["q0"] == most
    # the text itself (scripts) is still accepted, but not both at once, nor a malformed digest
    assert post({"id": "q3", "answer": "7", "previous": "6"})[0] == 200
    assert post({"id": "q3", "answer": "8", "previous": "7", "previous_sha256": sha256("7")}) == (
        400, {"error": "previous, previous_sha256: send one of them, not both"})
    assert post({"id": "q3", "answer": "8", "previous_sha256": "7"}) == (
        400, {"error": "previous_sha256: not the 64 hex digits of a SHA-256 digest, or null"})
    assert saved(store)["q3"] == "7"


# -- tokens -----------------------------------------------------------------------------------
ODD_TOKEN = "a&b#c+d e%41"  # each of these means something else in a URL's query


def test_the_url_printed_for_a_token_with_url_syntax_in_it_works(browser, tmp_path: Path) -> None:  # noqa: F811
    """``starlora annotate --token 'a&b#c+d e%41'`` prints a URL that carries the token
    escaped; the page it opens loads the queries and saves an answer (the API takes the
    token from the URL, as the page reads it)."""
    store = paused(tmp_path / "run")
    server = subprocess.Popen(
        [sys.executable, "-m", "starlora", "annotate", str(store.root), "--port", "0",
         "--token", ODD_TOKEN], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        url = first.rsplit(" at ", 1)[-1].strip()
        assert url.endswith("/?token=a%26b%23c%2Bd%20e%2541"), first
        page = opened(browser, url)
        with page.expect_response(lambda r: r.url.endswith("/api/labels")) as sent:
            page.keyboard.press("Control+Enter")
        assert sent.value.status == 200
        assert saved(store)["q0"] == QUERIES[0]["draft"]
        page.close()
    finally:
        server.kill()
        server.wait()


def test_make_server_quotes_the_token_in_the_url(tmp_path: Path) -> None:
    store = paused(tmp_path / "run")
    server, sock, url = make_server(store.root, port=0, token=ODD_TOKEN)
    port = sock.getsockname()[1]
    sock.close()
    assert url == f"http://127.0.0.1:{port}/?token=a%26b%23c%2Bd%20e%2541"
    client = TestClient(create_app(store.root, ODD_TOKEN))
    assert client.get("/" + url.split("/", 3)[3]).status_code == 200  # the page, by its URL
