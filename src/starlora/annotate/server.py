"""Serving the annotate app with uvicorn on a socket bound here (so a busy port is a clear
error, and port 0 picks a free one)."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import sys
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from starlora.annotate.app import create_app
from starlora.errors import StarloraError


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (`host`, `port`); StarloraError naming the option when that is
    not possible (a port outside 0-65535, a host that does not resolve, a port taken...)."""
    if not 0 <= port <= 65535:
        raise StarloraError(f"--port {port}: not a port number (0 to 65535; 0: any free one)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError as e:  # socket.gaierror: its errno is no OS error number
        raise StarloraError(f"--host {host}: cannot resolve it ({e.strerror or e}); give an "
                            "address of this machine, such as 127.0.0.1") from None
    try:
        return socket.create_server((host, port), family=family, backlog=64)
    except OSError as e:
        raise StarloraError(f"--host {host} --port {port}: cannot listen there "
                            f"({e.strerror or e}); pass another --port or --host") from None


def url_of(sock: socket.socket, host: str, token: str) -> str:
    """The page's URL, token included (percent-escaped: ``&``, ``#``, ``+``, ``%`` and spaces
    mean something else in a URL), for the address `sock` is bound to."""
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/?token={quote(token, safe='')}"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765,
                token: str | None = None) -> tuple[Any, socket.socket, str]:
    """A uvicorn server for `run_dir`'s page, the socket it will serve on (already listening)
    and the page's URL. `server.run(sockets=[sock])` serves; ``server.should_exit = True``
    stops it. StarloraError when `run_dir` is not a run directory or the port is taken."""
    import uvicorn

    token = token or secrets.token_urlsafe(24)
    app = create_app(run_dir, token)  # refuses a folder that is not a run directory
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    return server, sock, url_of(sock, host, token)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765,
          token: str | None = None, out: TextIO = sys.stdout) -> None:
    """Serve the page for `run_dir` until interrupted (Ctrl-C), printing its URL to `out`."""
    server, sock, url = make_server(run_dir, host, port, token)
    print(f"answer the queries of {run_dir} at {url}", file=out)
    if not is_loopback(host):
        print(f"note: --host {host} makes the page reachable from other machines; anyone "
              "with the URL can answer", file=out)
    print("Ctrl-C stops the server; saved answers stay in the run directory", file=out,
          flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then re-raises the signal
        pass
    finally:
        sock.close()
    print("stopped", file=out)
