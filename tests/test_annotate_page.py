"""``starlora annotate``: tokens that need escaping in the printed URL. The browser tests drive
Debian's ``chromium`` with Playwright (they skip without it), with the fixtures of
test_annotate.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from starlette.testclient import TestClient
from test_annotate import QUERIES, browser, paused  # noqa: F401

from starlora.annotate.app import create_app
from starlora.annotate.server import make_server
from starlora.run.store import RunStore


def saved(store: RunStore) -> dict[str, str]:
    return {r["id"]: r["answer"] for r in RunStore.open(store.root).labelled()}


def opened(browser, url: str, answered: str = "0 of 4 answered"):  # noqa: F811
    page = browser.new_page()
    page.goto(url)
    page.get_by_text(answered).wait_for()
    return page


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
