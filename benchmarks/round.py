"""One round of the demo, phase by phase: an earlier commit ("before") against this checkout.

    python benchmarks/round.py                        # before = fa374a5, round 1, pe-dynamic
    python benchmarks/round.py --before <rev> --round 1 --strategy random

Each side runs ``starlora run <its own src/starlora/demo.yaml>`` (the demo config: SmolLM2-135M,
arith, pool 200, test 50, 2 MC passes, 100 pool items scored per round) in a subprocess, with
``active_learning.rounds`` = round + 2 so that the measured round queries, and a fresh
``STARLORA_CACHE`` of its own (no cached base scores or generations; the model conversion
happens before round 0 and is not timed). The "before" side is ``git archive <rev> src`` in a
temporary folder. Phases are timed from the run's own progress lines on stderr, stamped as
they arrive:

    train     "round R/..: training on"    -> "round R/..: evaluating on"
    evaluate  "round R/..: evaluating on"  -> "round R: accuracy"
    score     "round R: accuracy"          -> "round R+1/..: training on" (adapter reload,
              base and adapter scoring with their generations, selection, labelling)

The process is stopped once round R+1 starts. Three sides run one after the other
(``--repeats`` alternations; medians):

    before              the earlier commit, which scored the pool on gold answers
    after               this checkout with ``scoring.answers=gold``: the same work
    after (generated)   this checkout's default, ``scoring.answers=generated``: the adapter and
                        the base model each generate an answer per scored item first (the
                        label-free mode the earlier commit did not have), so its score phase
                        does more work

Last line: ``after_vs_before=<round time ratio>`` for the like-for-like pair and the ratio of
each phase, then ``generated_vs_before=<ratio>``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("train", "evaluate", "score")


def export(rev: str, into: Path) -> Path:
    """`rev`'s src/ tree extracted under `into`; returns its src folder."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True,
                             capture_output=True).stdout
    into.mkdir(parents=True)
    tar = into / "src.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "src"


def one_round(src: Path, work: Path, round_: int, strategy: str,
              extra: list[str]) -> dict[str, float]:
    """Seconds of each phase of round `round_` of the demo run from `src` (`extra`: more
    ``--set`` overrides)."""
    env = {**os.environ, "PYTHONPATH": str(src), "STARLORA_CACHE": str(work / "cache"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    config = src / "starlora" / "demo.yaml"
    cmd = [sys.executable, "-m", "starlora.cli", "run", str(config), "--run-dir",
           str(work / "run"), "--set", f"active_learning.rounds={round_ + 2}",
           "--set", f"active_learning.strategy={strategy}",
           *[a for item in extra for a in ("--set", item)]]
    marks = {
        "train": re.compile(rf"round {round_}/\d+: training on"),
        "evaluate": re.compile(rf"round {round_}/\d+: evaluating on"),
        "accuracy": re.compile(rf"round {round_}: accuracy"),
        "next": re.compile(rf"round {round_ + 1}/\d+: training on"),
    }
    seen: dict[str, float] = {}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                            text=True, bufsize=1)
    assert proc.stderr is not None
    tail: list[str] = []
    for line in proc.stderr:
        now = time.perf_counter()
        tail = (tail + [line])[-20:]
        for name, pattern in marks.items():
            if name not in seen and pattern.search(line):
                seen[name] = now
        if "next" in seen:
            proc.kill()
            break
    proc.wait()
    if "next" not in seen:
        raise SystemExit(f"{src}: the run ended before round {round_ + 1}:\n" + "".join(tail))
    return {"train": seen["evaluate"] - seen["train"],
            "evaluate": seen["accuracy"] - seen["evaluate"],
            "score": seen["next"] - seen["accuracy"],
            "round": seen["next"] - seen["train"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="fa374a5", help="git revision of the 'before' side")
    ap.add_argument("--round", type=int, default=1, help="the round measured (default 1)")
    ap.add_argument("--strategy", default="pe-dynamic")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    print(f"demo round {args.round}, strategy {args.strategy}, before={args.before}, "
          f"after=this checkout, threads={threads}, cpus={os.cpu_count()}")
    sides = {"before": [], "after": ["scoring.answers=gold"],
             "after (generated)": ["scoring.answers=generated"]}
    times: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="starlora-round-") as tmp:
        before = export(args.before, Path(tmp) / "before-src")
        for r in range(args.repeats):
            for i, (side, extra) in enumerate(sides.items()):
                work = Path(tmp) / f"side{i}-{r}"
                src = before if side == "before" else REPO / "src"
                times[side].append(one_round(src, work, args.round, args.strategy, extra))
                t = times[side][-1]
                print(f"{side} (repeat {r + 1}): " + ", ".join(
                    f"{k} {t[k]:.1f}s" for k in (*PHASES, "round")), flush=True)
    med = {side: {k: statistics.median(t[k] for t in runs) for k in (*PHASES, "round")}
           for side, runs in times.items()}
    gen = med["after (generated)"]
    print("| phase | before (s) | after (s) | speed-up | after, generated answers (s) |")
    print("|---|---|---|---|---|")
    for k in (*PHASES, "round"):
        print(f"| {k} | {med['before'][k]:.1f} | {med['after'][k]:.1f} | "
              f"{med['before'][k] / med['after'][k]:.2f}x | {gen[k]:.1f} |")
    ratios = " ".join(f"{k}={med['before'][k] / med['after'][k]:.2f}" for k in PHASES)
    print(f"after_vs_before={med['before']['round'] / med['after']['round']:.2f} {ratios} "
          f"generated_vs_before={med['before']['round'] / gen['round']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
