"""The ``starlora annotate`` page in headless Chromium: a screenshot and the time per answer.

    python benchmarks/annotate_page.py --screenshot docs/annotate.png

Builds a paused run (no model: a run directory and a queries file, as the tests do) with
arithmetic word problems of the ``arith`` task and drafts in the format a trained round
writes (some with a slip in one step), serves it on a free loopback port and drives Debian's
chromium with Playwright. It answers `--answers` queries by keyboard (select all, type the
answer, Ctrl+Enter) and prints, from the browser's own clock, the time from navigation start
to the first save's response and the time from one save's response to the next (the typing
is done by the driver, so this is the page's and the server's share of an answer, not a
person's). The screenshot is taken after `--shot-after` answers, with the next query open.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import threading
from pathlib import Path

from starlora.annotate.server import make_server
from starlora.config import load_config
from starlora.run.store import RunStore
from starlora.tasks import get_task


def slip(worked: str, rng: random.Random) -> str:
    """`worked` (``"7 x 2 = 14. 14 + 6 = 20.\\n#### 20"``) with its last step off by a little."""
    steps, _ = worked.split("\n#### ")
    head, value = steps.rstrip(".").rsplit(" = ", 1)
    wrong = max(0, int(value) + rng.choice([-2, -1, 1, 2]))
    return f"{head} = {wrong}.\n#### {wrong}"


def paused_run(root: Path, n: int) -> RunStore:
    """A run paused on round 1's query of `n` arith problems, highest uncertainty first."""
    task = get_task("arith")
    rng = random.Random(7)
    examples = [ex for ex in task.generate("train", 60, 0) if ex.meta.get("steps", 1) >= 2][:n]
    store = RunStore.create_or_resume(root, load_config(None, [
        "active_learning.oracle=human", "task.name=arith"]))
    uncertainty = sorted((rng.uniform(0.35, 0.95) for _ in examples), reverse=True)
    rows = [{"id": ex.id, "question": ex.question, "prompt": task.prompt(ex),
             "draft": slip(ex.answer, rng) if i % 2 == 1 else ex.answer,
             "uncertainty": round(u, 4), "round": 1}
            for i, (ex, u) in enumerate(zip(examples, uncertainty))]
    store.write_queries(1, rows)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", help="PNG to write (e.g. docs/annotate.png)")
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--answers", type=int, default=6, help="queries answered by keyboard")
    parser.add_argument("--shot-after", type=int, default=3, help="answers before the screenshot")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="annotate-"))
    screenshot = Path(args.screenshot).resolve() if args.screenshot else None
    os.chdir(work)  # the page shows the run directory as given: a short relative path
    store = paused_run(Path("runs/arith-human"), args.queries)
    server, sock, url = make_server("runs/arith-human", port=0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800},
                                    device_scale_factor=1)
            page.goto(url)
            page.get_by_text(f"0 of {args.queries} answered").wait_for()
            gold = {r["id"]: r["draft"] for r in store.queries(1)}
            answers = {ex.id: ex.answer for ex in get_task("arith").generate("train", 60, 0)}
            for n in range(1, args.answers + 1):
                shown = page.locator("#meta").text_content().split()[1]
                page.keyboard.press("Control+a")
                page.keyboard.type(answers.get(shown, gold[shown]))
                page.keyboard.press("Control+Enter")
                page.get_by_text(f"{n} of {args.queries} answered").wait_for()
                if n == args.shot_after and screenshot:
                    page.locator("#status").wait_for()
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(screenshot))
            ends = page.evaluate("performance.getEntriesByType('resource')"
                                 ".filter(e => e.name.endsWith('/api/labels'))"
                                 ".map(e => e.responseEnd)")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    saved = [r for r in RunStore.open(work / "runs/arith-human").labelled()
             if r["source"] == "annotate"]
    print(f"saved {len(saved)} answers through the page (labelled.jsonl)")
    print(f"navigation start -> first answer saved: {ends[0]:.0f} ms")
    if gaps:
        print(f"answer -> next answer saved (median of {len(gaps)}): "
              f"{statistics.median(gaps):.0f} ms (min {min(gaps):.0f}, max {max(gaps):.0f})")
    if screenshot:
        print(f"screenshot: {screenshot}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
