"""``starlora annotate``: answers too long to send twice, and tokens that need escaping in
the printed URL. The browser tests drive Debian's ``chromium`` with Playwright (they skip
without it), with the fixtures of test_annotate.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

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


def opened(browser, url: str, answered: str = "0 of 4 answered"):  # noqa: F811
    page = browser.new_page()
    page.goto(url)
    page.get_by_text(answered).wait_for()
    return page


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
