"""One round of the demo, phase by phase: an earlier commit ("before") against this checkout.

    python benchmarks/round.py                        # before = fa374a5, round 1, pe-dynamic
    python benchmarks/round.py --before <rev> --round 1 --strategy random
    python benchmarks/round.py --sides gold,generated --mc-passes 1   # label-free vs gold

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
    after (generated)   this checkout with ``scoring.answers=generated`` (the default) and
                        ``scoring.base_scores=own``: the adapter and the base model each
                        generate an answer per scored item first (the label-free mode the
                        earlier commit did not have), so its score phase does more work
                        (``own`` was the default when the figures in docs/benchmarks.md were
                        measured; ``--set scoring.base_scores=adapted`` measures today's)

``--sides`` picks some of them (``before``, ``gold``, ``generated``), ``--mc-passes K`` sets
``scoring.mc_passes`` on every side (default: the demo's 2) and ``--set KEY=VALUE`` any other
setting of the demo config on every side.

Last line: ``after_vs_before=<round time ratio>`` and the ratio of each phase (like for like
only when the before revision scores gold answers by default, as fa374a5 does; a later
``--before`` is label-free by default, so read ``generated_vs_before`` then), then
``generated_vs_before=<ratio>`` (with the before side), and
``generated_vs_gold=<ratio>``: the label-free default's round time over the same round on gold
answers, in one run (the price of not reading labels; issue 37 asks <= 1.15 with one MC pass
and <= 1.4 with 3). With the before and generated sides, ``same_selection=<n>/<query size>``
ends the line: how many ids the measured round's query shares between the two (with a recent
``--before``, whose default is also the label-free mode, whether a change kept the selections;
the differing ids are printed above it).
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

from starlora.io import read_jsonl
from starlora.run.store import RunPaths

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
              extra: list[str]) -> tuple[dict[str, float], list[str]]:
    """Seconds of each phase of round `round_` of the demo run from `src` (`extra`: more
    ``--set`` overrides), and the ids that round's query selected, best first."""
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
    selected = read_jsonl(RunPaths(work / "run").round_file(round_, "selected.jsonl"))
    return {"train": seen["evaluate"] - seen["train"],
            "evaluate": seen["accuracy"] - seen["evaluate"],
            "score": seen["next"] - seen["accuracy"],
            "round": seen["next"] - seen["train"]}, [row["id"] for row in selected]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="fa374a5", help="git revision of the 'before' side")
    ap.add_argument("--round", type=int, default=1, help="the round measured (default 1)")
    ap.add_argument("--strategy", default="pe-dynamic")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sides", default="before,gold,generated",
                    help="some of before, gold, generated (comma-separated)")
    ap.add_argument("--mc-passes", type=int, default=None,
                    help="scoring.mc_passes on every side (default: the demo config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another override of the demo config on every side (repeatable), "
                         "e.g. scoring.base_scores=adapted")
    args = ap.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    print(f"demo round {args.round}, strategy {args.strategy}, before={args.before}, "
          f"after=this checkout, sides={args.sides}, mc_passes={args.mc_passes or 'demo'}, "
          f"set={args.set}, threads={threads}, cpus={os.cpu_count()}")
    common = [] if args.mc_passes is None else [f"scoring.mc_passes={args.mc_passes}"]
    common += args.set  # every side's overrides
    # the base model scores its own answers (the figures' setting) unless --set says otherwise
    own = [] if any(o.startswith("scoring.base_scores=") for o in args.set) \
        else ["scoring.base_scores=own"]
    every = {"before": common, "after": ["scoring.answers=gold", *own, *common],
             "after (generated)": ["scoring.answers=generated", *own, *common]}
    names = {"before": "before", "gold": "after", "generated": "after (generated)"}
    wanted = [names[x.strip()] for x in args.sides.split(",") if x.strip()]
    sides = {side: extra for side, extra in every.items() if side in wanted}
    times: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    picked: dict[str, list[str]] = {}  # each side's selection (the same in every repeat)
    with tempfile.TemporaryDirectory(prefix="starlora-round-") as tmp:
        before = export(args.before, Path(tmp) / "before-src") if "before" in sides else None
        for r in range(args.repeats):
            for i, (side, extra) in enumerate(sides.items()):
                work = Path(tmp) / f"side{i}-{r}"
                src = before if side == "before" and before else REPO / "src"
                t, picked[side] = one_round(src, work, args.round, args.strategy, extra)
                times[side].append(t)
                print(f"{side} (repeat {r + 1}): " + ", ".join(
                    f"{k} {t[k]:.1f}s" for k in (*PHASES, "round")), flush=True)
    med = {side: {k: statistics.median(t[k] for t in runs) for k in (*PHASES, "round")}
           for side, runs in times.items()}
    print("| phase | " + " | ".join(f"{side} (s)" for side in med) + " |")
    print("|---|" + "---|" * len(med))
    for k in (*PHASES, "round"):
        print(f"| {k} | " + " | ".join(f"{med[side][k]:.1f}" for side in med) + " |")
    last = []
    if "before" in med and "after" in med:
        ratios = " ".join(f"{k}={med['before'][k] / med['after'][k]:.2f}" for k in PHASES)
        last.append(f"after_vs_before={med['before']['round'] / med['after']['round']:.2f} "
                    f"{ratios}")
    if "before" in med and "after (generated)" in med:
        last.append("generated_vs_before="
                    f"{med['before']['round'] / med['after (generated)']['round']:.2f}")
        a, b = picked["before"], picked["after (generated)"]
        print(f"selected by before, not by after (generated): {sorted(set(a) - set(b))}; "
              f"by after (generated), not by before: {sorted(set(b) - set(a))}")
        last.append(f"same_selection={len(set(a) & set(b))}/{len(b)}")
    if "after" in med and "after (generated)" in med:
        gen, gold = med["after (generated)"], med["after"]
        last.append(" ".join(f"{k}_generated_vs_gold={gen[k] / gold[k]:.2f}" for k in PHASES))
        last.append(f"generated_vs_gold={gen['round'] / gold['round']:.2f}")
    print(" ".join(last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
