"""Many annotators at once: ``starlora annotate`` under 20 concurrent clients.

    python benchmarks/annotate_load.py                       # 2,000 pending, 20 clients
    python benchmarks/annotate_load.py --requests 20000 --clients 20 --pending 2000

It makes a run directory paused on a human query of `--pending` rows (no model: the rows are
what the label phase writes), starts the real command ``python -m starlora annotate RUN
--host 127.0.0.1 --port 0`` (loopback only) and drives it from `--clients` threads, each with
its own keep-alive connection, until `--requests` requests are done:

* every pending id is POSTed, with an answer of its own (~200 characters naming the id and
  the client, so a torn or mixed-up write cannot pass for a whole one) and, as the page
  sends it, ``"previous_sha256": null`` (the client saw no saved answer): once, or for `--twice` of
  them twice, by two clients at the same moment (a barrier releases the pair together),
  each with its own answer;
* the rest are GETs, mostly ``/api/queries`` (the whole query with saved answers, as the page
  loads it) and every tenth the page itself.

It prints requests/s and p50/p99 latency per kind, then checks the run directory:
``labelled.jsonl`` parses line by line, holds every id that got a 200 exactly once (lost: an
accepted id missing; duplicated: an id twice), each with exactly one of the answers accepted
for it (torn: anything else). Of two saves of one id at once, exactly one must get 200 and
the other 409 naming the first one's answer as the saved one (the save that takes the run's
lock second saw no answer, and one is saved by then: a conflict, not a silent replacement;
both saved or both refused is an error). ``starlora status`` must then say nothing is
pending. Last line: ``requests=<n> errors=<failed, or non-2xx but a pair's 409> lost=<n>
p99_ms=<all requests>`` (and duplicated, torn and refused counts before it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
TOKEN = "load-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def paused_run(root: Path, pending: int) -> None:
    """A run directory paused on a human query of `pending` rows, 100 labels before it."""
    from starlora.config import load_config
    from starlora.run.store import RunStore

    store = RunStore.create_or_resume(root, load_config(None, [
        "active_learning.oracle=human", f"active_learning.query_size={pending}"]))
    store.add_labels([{"id": f"l{i}", "round": 0, "answer": str(i), "source": "import:a"}
                      for i in range(100)])
    store.write_queries(1, [{
        "id": f"q{i:05d}", "question": f"Question {i}: how many apples are in {i} boxes of 12?",
        "prompt": f"Question: how many apples are in {i} boxes of 12?\nAnswer:",
        "draft": f"{12 * i} apples", "uncertainty": 1.0 - i / (pending + 1), "round": 1}
        for i in range(pending)])


def start_server(run_dir: Path) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "starlora", "annotate", str(run_dir),
                             "--host", "127.0.0.1", "--port", "0", "--token", TOKEN],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if found:
            return proc, int(found.group(1))
    raise RuntimeError(f"starlora annotate did not start (exit {proc.wait()})")


def answer_text(id_: str, client: int) -> str:
    return f"{id_} answered by client {client}: " + f"{id_}-{client} " * 16


class Client:
    """One annotator: a keep-alive connection, reopened after an error, and before a request
    when it sat idle for longer than the server keeps one open (uvicorn: 5 s), as browsers
    do, so that a closed idle connection does not count as a failed request."""

    IDLE_S = 4.0

    def __init__(self, port: int):
        self.port, self.used = port, time.monotonic()
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {**AUTH, "Content-Type": "application/json"} if data else dict(AUTH)
        if time.monotonic() - self.used > self.IDLE_S:
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            out = response.status, response.read()
            self.used = time.monotonic()
            return out
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            return 0, b""


def plan_work(ids: list[str], twice: int, total: int, clients: int, seed: int) -> list[list]:
    """Per client, its list of tasks: ("post", id, answer), ("pair", id, answer, barrier) or
    ("get", path). Pairs go to two different clients at the same position in their lists."""
    rng = random.Random(seed)
    pairs = rng.sample(ids, twice)
    posts = [("post", i) for i in sorted(set(ids) - set(pairs))]
    n_gets = max(0, total - len(posts) - 2 * twice)
    gets = [("get", "/?token=" + TOKEN if g % 10 == 9 else "/api/queries")
            for g in range(n_gets)]
    singles = posts + gets
    rng.shuffle(singles)
    # every task gets a time in [0, 1); a client does its tasks in time order, so the pairs
    # come in the same order on every client (no two clients wait for each other crosswise)
    timed: list[list[tuple[float, tuple]]] = [[] for _ in range(clients)]
    for j, task in enumerate(singles):
        timed[j % clients].append((j / max(1, len(singles)), task))
    for pid in pairs:  # two clients, the same moment: they reach the barrier together
        at, barrier = rng.random(), threading.Barrier(2)
        for c in rng.sample(range(clients), 2):
            timed[c].append((at, ("pair", pid, barrier)))
    work: list[list] = [[task for _, task in sorted(ts, key=lambda t: t[0])] for ts in timed]
    for c in range(clients):
        work[c] = [(*t[:2], answer_text(t[1], c)) if t[0] == "post" else
                   (*t, answer_text(t[1], c)) if t[0] == "pair" else t for t in work[c]]
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--pending", type=int, default=2_000)
    parser.add_argument("--twice", type=int, default=200,
                        help="ids POSTed by two clients at the same moment")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from starlora.io import read_records

    with tempfile.TemporaryDirectory(prefix="annotate-load-") as tmp:
        run_dir = Path(tmp) / "run"
        paused_run(run_dir, args.pending)
        ids = [f"q{i:05d}" for i in range(args.pending)]
        proc, port = start_server(run_dir)
        try:
            work = plan_work(ids, args.twice, args.requests, args.clients, args.seed)
            latencies: dict[str, list[float]] = defaultdict(list)
            accepted: dict[str, list[str]] = defaultdict(list)  # id -> answers that got 200
            refused: dict[str, list[str]] = defaultdict(list)  # id -> "current" of its 409s
            errors: list[str] = []
            lock = threading.Lock()

            def drive(c: int) -> None:
                client = Client(port)
                for task in work[c]:
                    if task[0] == "pair":
                        try:
                            task[2].wait(timeout=300)
                        except threading.BrokenBarrierError:
                            with lock:
                                errors.append(f"pair {task[1]}: the other client never came")
                    method = "GET" if task[0] == "get" else "POST"
                    path = task[1] if method == "GET" else "/api/labels"
                    body = None if method == "GET" else \
                        {"id": task[1], "answer": task[-1], "previous_sha256": None}
                    t0 = time.perf_counter()
                    status, data = client.request(method, path, body)
                    ms = (time.perf_counter() - t0) * 1000
                    kind = "get page" if path.startswith("/?") else \
                        "get queries" if method == "GET" else "post"
                    with lock:
                        latencies[kind].append(ms)
                        if status == 409 and task[0] == "pair":
                            refused[task[1]].append(json.loads(data)["current"])
                        elif status != 200:
                            errors.append(f"{method} {path} {task[1]}: {status} {data[:200]!r}")
                        elif method == "POST":
                            saved = json.loads(data)
                            if saved["answer"] != task[-1].strip():
                                errors.append(f"POST {task[1]}: echoed another answer")
                            accepted[task[1]].append(task[-1].strip())

            t0 = time.perf_counter()
            threads = [threading.Thread(target=drive, args=(c,)) for c in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)

        everything = [ms for values in latencies.values() for ms in values]
        n = len(everything)
        print(f"{n} requests from {args.clients} clients in {seconds:.1f} s: "
              f"{n / seconds:.0f} requests/s ({args.pending} pending, {args.twice} ids posted "
              "twice at once)")
        for kind in sorted(latencies):
            values = sorted(latencies[kind])
            print(f"  {kind:<12} {len(values):6d}  p50 {statistics.median(values):7.1f} ms  "
                  f"p99 {values[int(0.99 * (len(values) - 1))]:7.1f} ms")
        p99 = sorted(everything)[int(0.99 * (n - 1))]

        rows = [r for _, r in read_records(run_dir / "labelled.jsonl")]  # every line parses
        count: dict[str, int] = defaultdict(int)
        stored: dict[str, str] = {}
        for r in rows:
            count[r["id"]] += 1
            stored[r["id"]] = r["answer"]
        lost = [i for i in accepted if count[i] == 0]
        duplicated = [i for i, c in count.items() if c > 1]
        torn = [i for i in accepted if count[i] and stored[i] not in accepted[i]]
        pairs = {t[1] for tasks in work for t in tasks if t[0] == "pair"}
        settled = [i for i in pairs if len(accepted[i]) == 1 and refused[i] == accepted[i]
                   and stored.get(i) == accepted[i][0]]
        errors += [f"pair {i}: {len(accepted[i])} saved, refused naming {refused[i]!r}"
                   for i in sorted(pairs - set(settled))]
        print(f"labelled.jsonl: {len(rows)} rows; {len(accepted)} ids accepted; of the "
              f"{len(pairs)} ids posted twice at once, {len(settled)} saved once and refused "
              "once (409 naming the saved answer, which labelled.jsonl holds)")
        status = subprocess.run([sys.executable, "-m", "starlora", "status", str(run_dir),
                                 "--json"], capture_output=True, text=True, check=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
        pending = json.loads(status.stdout)["pending"]
        if pending or len(accepted) != args.pending:
            errors.append(f"{pending} still pending, {len(accepted)} of {args.pending} accepted")
        for e in errors[:10]:
            print("error:", e)
        print(f"duplicated={len(duplicated)} torn={len(torn)} "
              f"refused={sum(map(len, refused.values()))}")
        print(f"requests={n} errors={len(errors)} lost={len(lost)} p99_ms={p99:.0f}")


if __name__ == "__main__":
    main()
