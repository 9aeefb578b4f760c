"""``starlora annotate RUN_DIR``: a local web page where people answer a paused run's queries.

With ``active_learning.oracle: human`` a run stops after each selection and waits for answers
(`starlora.run.oracle`). This package serves one page over the open query: the prompt as the
model sees it, the model's draft in an editable text area, Save (Ctrl+Enter saves and moves
on), Skip, progress, and, once everything is answered, the command that continues the run.
The page talks to a two-endpoint JSON API (`starlora.annotate.app`).

Why Starlette and uvicorn: the server needs two JSON endpoints, one HTML response and a
middleware, run by a production-grade HTTP server. Starlette is the small, widely used ASGI
toolkit underneath FastAPI (routing, requests, responses, a test client) without FastAPI's
validation layer, which two endpoints do not need; uvicorn is the standard ASGI server for
it. Both are pure Python wheels with few dependencies. The page is plain HTML, CSS and a
little script shipped as package data (``page.html``, ``page.css``, ``page.js``): no build
step, nothing fetched from elsewhere.

Security: the server binds to 127.0.0.1 unless told otherwise. Every request, the page
included, must carry a token (``--token``, or a random `secrets.token_urlsafe` printed in
the URL): the page URL as ``?token=T``, the API as ``Authorization: Bearer T``; it is
compared with `secrets.compare_digest`, and a request without it gets 401. The API does not
accept the token from the query string, so no cross-site form or image can carry it, and a
cross-site script would need a CORS preflight that is never granted. Request bodies over
64 KiB get 413. The page renders data and model text only through ``textContent`` and is
served with a Content-Security-Policy that allows only its own inline script and style (by
a per-response nonce) and requests to its own origin, so a prompt that holds markup shows as
text and runs nothing.

No label is lost to a concurrent ``starlora run``: a save checks the answer (the checks of
``starlora import``: `starlora.run.labels.check_answers` with revisions allowed) and writes
it with `RunStore.save_labels`, both inside the run's file lock (`RunStore.lock`). The run
closes a query with `RunStore.close_query`, under the same lock, and only when no id is
pending; it reads ``labelled.jsonl`` for training after that. So a save either lands before
the close, and the run trains on it, or comes after it, and is refused with 400 "the run
has gone on" (the query it answers is closed); a 200 always means the run will see that
answer. Saves wait up to `starlora.annotate.app.LOCK_TIMEOUT` s for the lock, then get 503.

Nor is one person's answer lost to another's: the page sends, with each answer, the digest
of the saved answer it last saw (SHA-256, so a revision's request is no larger than a first
answer's), and a save over an answer saved meanwhile by someone else is refused (409, with
that answer), the page keeping the unsaved text for its author to save again.
"""

from __future__ import annotations

from starlora.annotate.app import create_app
from starlora.annotate.server import serve

__all__ = ["create_app", "serve"]
