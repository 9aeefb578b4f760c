"""The ASGI app of ``starlora annotate``: one page and a two-endpoint JSON API over a run's
open query (see `starlora.annotate` for why Starlette, the security model and the lock).

    GET  /                the page (``?token=T``); HTML, CSS and script in one response
    GET  /api/queries     the open query: every row, with any saved answer, and progress
    POST /api/labels      ``{"id": ..., "answer": ..., "previous_sha256": ...}`` -> 200 ``{"id",
                          "answer", "answer_sha256", "answered", "total"}``, or 400
                          ``{"error": text}``

``previous_sha256`` (optional): the SHA-256 hex digest (`sha256_of`, as the API gives it for
each saved answer) of the saved answer the sender last saw for the id (null: none); a
script may send that answer itself as ``previous`` instead (not both). The page sends the
digest, so a revision costs no more body than the answer itself. When another answer (not
the one sent) has been saved since, nothing is saved and the reply is 409 ``{"error", "id",
"current", "current_sha256"}`` (the answer saved now), so one person's answer never
silently replaces another's; sending it again with ``previous_sha256`` = ``current_sha256``
replaces it. Without either (a script) a save replaces whatever is saved.

Every request needs the token: the page takes it as ``?token=T`` or a bearer header, the API
only as ``Authorization: Bearer T`` (so a cross-site request cannot carry it without a CORS
preflight, which this app never grants). Missing or wrong: 401. Request bodies over
`MAX_BODY` bytes: 413. The store's lock is busy for over `LOCK_TIMEOUT` s: 503. The disk is
full: 507 (nothing saved). A run file broken by hand (a labelled.jsonl row without an id...):
500 ``{"error": text}`` naming the file, line and field.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from starlora.errors import (
    DataError,
    DiskFullError,
    LabelConflictError,
    LockTimeoutError,
    QueryClosedError,
    StarloraError,
)
from starlora.io import parse_json
from starlora.run.labels import Answer, check_answers
from starlora.run.store import RunStore, resume_command

MAX_BODY = 64 * 1024  #: bytes a request body may have (an answer is usually a few hundred)
LOCK_TIMEOUT = 10.0  #: seconds a save waits for the run's lock before answering 503
SOURCE = "annotate"  #: the ``source`` of labels saved through the page
WHERE = "annotate"  #: where a posted answer's DataError says it was read
NO_STORE = {"Cache-Control": "no-store"}
PAGE_HEADERS = {
    **NO_STORE,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the URL carries the token
    "X-Frame-Options": "DENY",
}
CSP = ("default-src 'none'; script-src 'nonce-{n}'; style-src 'nonce-{n}'; connect-src 'self'; "
       "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class UNCHECKED:
    """`Annotator.save`'s `seen` when the sender gave no previous answer: not checked."""


SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_of(answer: str | None) -> str | None:
    """The SHA-256 hex digest of `answer`'s UTF-8 (None for no answer): how the API names a
    saved answer, so a client can say which one it saw without sending it back."""
    return None if answer is None else hashlib.sha256(answer.encode("utf-8")).hexdigest()


class TokenGuard:
    """ASGI middleware: refuse (401) every HTTP request without the token. API paths take it
    only from ``Authorization: Bearer``; other paths also from ``?token=``."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token.encode()

    def allowed(self, scope: Scope) -> bool:
        given = ""
        auth = Headers(scope=scope).get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif not scope["path"].startswith("/api/"):
            given = QueryParams(scope.get("query_string", b"").decode("latin-1")).get("token", "")
        return secrets.compare_digest(given.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no route takes one
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "http" and not self.allowed(scope):
            text = "missing or wrong token: open the URL that starlora annotate printed"
            headers = {"WWW-Authenticate": "Bearer", **NO_STORE}
            response: Response = (
                JSONResponse({"error": text}, 401, headers=headers)
                if scope["path"].startswith("/api/") else
                PlainTextResponse(text + "\n", 401, headers=headers))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def continue_command(run_dir: str | Path) -> str:
    """The command that continues the run (from the run's own ``config.yaml``)."""
    return resume_command(run_dir)


class Annotator:
    """The run-facing half of the app: reads the open query and saves answers to it, both
    through `RunStore` (blocking file I/O; the endpoints run it in a worker thread)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = str(run_dir)
        self.store = RunStore.open(run_dir)
        self.store.labelled()  # a hand-broken labelled.jsonl: a DataError before serving

    def queries(self) -> dict[str, Any]:
        """The open query's rows (answered ones too, so they can be revised), highest
        uncertainty first, with progress and the command that continues the run."""
        store = self.store
        r = store.open_query()
        rows = store.queries(r) if r is not None else []
        saved = {row["id"]: row["answer"] for row in store.labelled()}
        rows = sorted(rows, key=lambda q: (q.get("uncertainty") is None,
                                           -(q.get("uncertainty") or 0.0)))
        out = [{"id": q["id"], "question": q.get("question"), "prompt": q.get("prompt"),
                "draft": q.get("draft"), "uncertainty": q.get("uncertainty"),
                "answer": saved.get(q["id"]), "answer_sha256": sha256_of(saved.get(q["id"]))}
               for q in rows]
        answered = sum(q["answer"] is not None for q in out)
        return {"run_dir": self.run_dir, "round": r, "queries": out, "answered": answered,
                "total": len(out), "continue": continue_command(self.run_dir)}

    def save(self, id_: str, answer: str, seen: str | None | type[UNCHECKED] = UNCHECKED
             ) -> dict[str, Any]:
        """Check and store one answer under the run's lock (the checks of ``starlora
        import``, revisions allowed). Raises DataError for a bad answer, QueryClosedError
        once the run has closed the query the id was asked in, LabelConflictError when
        `seen` (`sha256_of` the saved answer the sender saw; None: none) is not the digest of
        what is saved now, nor is `answer` (`UNCHECKED`: not checked)."""
        store = self.store
        with store.lock(timeout=LOCK_TIMEOUT):
            r = store.open_query()
            asked: dict[str, int] = {}
            for round_ in store.paths.query_rounds():
                asked.update((q["id"], round_) for q in store.queries(round_))
            if id_ in asked and asked[id_] != r:
                raise QueryClosedError(
                    f"the run has gone on: query {asked[id_]} is closed, so {id_!r} can no "
                    "longer be answered here (reload the page)")
            checked = check_answers(store, [Answer(id_, answer, 1)], WHERE, revise=True)
            if seen is not UNCHECKED:  # the same answer twice is no conflict
                current = next((row["answer"] for row in store.labelled()
                                if row["id"] == id_), None)
                if current != checked[id_] and sha256_of(current) != seen:
                    raise LabelConflictError(id_, current)
            store.save_labels(checked, SOURCE)
            progress = self.queries()
        return {"id": id_, "answer": checked[id_], "answer_sha256": sha256_of(checked[id_]),
                "answered": progress["answered"], "total": progress["total"]}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or HTTPException 413 as soon as it passes `limit` bytes (declared
    or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
    return bytes(body)


def parse_label(body: bytes) -> tuple[str, str, str | None | type[UNCHECKED]]:
    """``(id, answer, seen)`` from a POST body, `seen` being the digest of the answer the
    sender saw (its ``previous_sha256``, or `sha256_of` its ``previous``; None: it saw none;
    `UNCHECKED` where it gives neither), or HTTPException 400 naming what is wrong."""
    try:
        data = parse_json(body)
    except ValueError as e:  # bad UTF-8 or JSON, nesting too deep, an integer too long
        raise HTTPException(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HTTPException(400, 'the body must be a JSON object {"id": ..., "answer": ...}')
    for name in ("id", "answer"):
        if not isinstance(data.get(name), str):
            raise HTTPException(400, f"{name}: missing, or not a string")
    if "previous" in data and "previous_sha256" in data:
        raise HTTPException(400, "previous, previous_sha256: send one of them, not both")
    if "previous_sha256" in data:
        seen = data["previous_sha256"]
        if isinstance(seen, str):
            seen = seen.lower()
        if seen is not None and not (isinstance(seen, str) and SHA256_HEX.fullmatch(seen)):
            raise HTTPException(400, "previous_sha256: not the 64 hex digits of a SHA-256 "
                                "digest, or null")
        return data["id"], data["answer"], seen
    previous = data.get("previous", UNCHECKED)
    if previous is not UNCHECKED and previous is not None and not isinstance(previous, str):
        raise HTTPException(400, "previous: not a string or null")
    return data["id"], data["answer"], previous if previous is UNCHECKED else sha256_of(previous)


def render_page(template: str, nonce: str) -> str:
    """The page with its stylesheet and script inlined under `nonce` (no other requests)."""
    files = resources.files("starlora.annotate")
    css = files.joinpath("page.css").read_text(encoding="utf-8")
    js = files.joinpath("page.js").read_text(encoding="utf-8")
    return (template.replace("{{nonce}}", nonce)
            .replace("/*{{css}}*/", css).replace("/*{{js}}*/", js))


def create_app(run_dir: str | Path, token: str, max_body: int = MAX_BODY) -> Starlette:
    """The Starlette app serving `run_dir`'s open query to holders of `token`. Raises
    StarloraError when `run_dir` is not a run directory, or the token is empty, holds other
    than printable ASCII characters (the page sends it in a header, where a browser refuses
    characters beyond Latin-1) or starts or ends with a space (a bearer token loses them)."""
    if not token:
        raise StarloraError("--token: must not be empty")
    if not all(" " <= c <= "~" for c in token) or token != token.strip():
        raise StarloraError("--token: use printable ASCII characters only (letters, digits, "
                            "punctuation, inner spaces; no accents)")
    annotator = Annotator(run_dir)
    template = resources.files("starlora.annotate").joinpath("page.html").read_text(
        encoding="utf-8")

    async def page(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        return HTMLResponse(render_page(template, nonce),
                            headers={**PAGE_HEADERS, "Content-Security-Policy": CSP.format(n=nonce)})

    async def get_queries(request: Request) -> Response:
        try:
            return JSONResponse(await run_in_threadpool(annotator.queries), headers=NO_STORE)
        except StarloraError as e:  # a run file broken by hand while serving: say which
            return JSONResponse({"error": str(e)}, 500, headers=NO_STORE)

    async def post_label(request: Request) -> Response:
        id_, answer, previous = parse_label(await read_body(request, max_body))
        try:
            saved = await run_in_threadpool(annotator.save, id_, answer, previous)
        except LabelConflictError as e:
            return JSONResponse({"error": str(e), "id": e.id, "current": e.current,
                                 "current_sha256": sha256_of(e.current)}, 409, headers=NO_STORE)
        except DataError as e:  # the message without "annotate:1:", which means nothing here
            if e.path != WHERE:  # a run file broken by hand (labelled.jsonl): name it
                raise HTTPException(500, str(e)) from None
            raise HTTPException(400, f"{e.field}: {e.problem}" if e.field else e.problem) from None
        except LockTimeoutError as e:
            raise HTTPException(503, str(e)) from None
        except DiskFullError as e:  # nothing was saved; the page may send it again
            raise HTTPException(507, str(e)) from None
        except StarloraError as e:  # QueryClosedError, or the store refused under its lock
            raise HTTPException(400, str(e)) from None
        return JSONResponse(saved, headers=NO_STORE)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=NO_STORE)

    app = Starlette(
        routes=[Route("/", page, methods=["GET"]),
                Route("/api/queries", get_queries, methods=["GET"]),
                Route("/api/labels", post_label, methods=["POST"])],
        exception_handlers={HTTPException: http_error},
        middleware=[Middleware(TokenGuard, token=token)],
    )
    return app
