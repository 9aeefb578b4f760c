"""A practitioner's pool: the run-store side of a round on a million unlabelled prompts.

    python benchmarks/pool_scale.py --pool 1000000
    python benchmarks/pool_scale.py --pool 10000,100000,1000000     # growth, one process each

It writes a JSONL pool of N prompts without answers or ids (ids are derived from line and
content) and a test set of 2,000 answered records, 1,000 of which repeat a pool prompt, then
times each step of a human-oracle round through starlora's own functions:

    load       `load_data`: both files read and validated, test overlap kept
    dedupe     `drop_test_overlap`: pool records that repeat a test record dropped
    start      `RunStore.create_or_resume`, `check_pool` (hash of every pool id) and 1,000
               labels from an earlier round (`add_labels`)
    subsample  the score phase's candidates: the unlabelled pool, seeded subsample of N/2
    scores     the score phase's output written (`scores.jsonl`, one row per candidate). No
               model runs: the rows are what `scoring.answers: generated` writes (the own answer
               and its token count, synthetic here), so the figures are the store's, not the
               model's (benchmarks/scoring.py times scoring)
    select     the select phase (`loop._select`): scores read back, 10,000 chosen, written
    label      the label phase: the human query written with drafts from the scores
               (`oracle.label_collectively`), the run pauses
    export     `export_queries` to CSV (10,000 pending rows)
    import     `import_labels` of a JSONL file of 10,000 answers (checks, one atomic write)

(the query is 10,000, or N/10 when that is smaller: 1,000 for a pool of 10,000)
    status     `RunStore.status` (what ``starlora status`` prints)

Steps from subsample on run twice, for the strategies `random` and `length` (the longest own
answer first: its ``answer_tokens`` column comes from the scores), each in its own run
directory. Every step prints its wall seconds, its CPU seconds (this process's, user + system:
on a shared machine the wall time also holds other jobs' turns) and its peak RSS (the
process's high-water mark, reset before the step through /proc/self/clear_refs; without
that, the peak so far). The last line is ``pool=N total_s=<sum of the steps> peak_rss_mb=<highest step peak>``; writing
the input files is not counted. Targets on 2 CPU cores: total under 60 s, peak under 2 GB.
With several sizes each runs in its own process, a table of each step's seconds per size and
the growth per 10x follows, and the last line is the largest size's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

STEPS = ("load", "dedupe", "start", "subsample", "scores", "select", "label", "export",
         "import", "status")
QUERY, LABELLED, TEST, OVERLAP = 10_000, 1_000, 2_000, 1_000
WORDS = ["apple", "box", "crate", "marble", "ticket", "coin", "pencil", "stamp", "shell", "cup"]


def question(i: int) -> str:
    """A prompt of ~100 characters, distinct for every i."""
    w, v = WORDS[i % 10], WORDS[(i // 10) % 10]
    return (f"A shop has {i % 97 + 3} {w}s in each of {i % 89 + 2} boxes and sells {i % 13} "
            f"{v}s a day. How many {w}s are left after order {i}?")


def make_files(folder: Path, n: int) -> tuple[Path, Path]:
    pool, test = folder / "pool.jsonl", folder / "test.jsonl"
    with pool.open("w", encoding="utf-8") as f:
        for start in range(0, n, 10_000):
            f.write("".join(json.dumps({"question": question(i)}) + "\n"
                            for i in range(start, min(n, start + 10_000))))
    repeats = random.Random(0).sample(range(n), min(OVERLAP, n // 2))
    rows = [{"question": question(i), "answer": "42"} for i in repeats]
    rows += [{"question": f"A test prompt number {i}?", "answer": "7"}
             for i in range(TEST - len(rows))]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return pool, test


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Steps:
    """Times each step and records its peak RSS."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float]] = []
        self.resets = reset_peak()

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        seconds, cpu, peak = time.perf_counter() - t0, time.process_time() - c0, peak_rss_mb()
        self.rows.append((name, seconds, cpu, peak))
        print(f"  {name:<10} {seconds:8.2f} s  (cpu {cpu:6.2f} s)   peak {peak:6.0f} MiB",
              flush=True)
        return out


def one_size(n: int, folder: Path) -> dict[str, Any]:
    from starlora.config import load_config
    from starlora.run import oracle
    from starlora.run.data import drop_test_overlap, load_data, make_task
    from starlora.run.labels import export_queries, import_labels
    from starlora.run.loop import Run, _candidates, _select, config_strategy
    from starlora.run.store import RunStore

    t0 = time.perf_counter()
    pool_file, test_file = make_files(folder, n)
    print(f"pool={n}: files written in {time.perf_counter() - t0:.1f} s "
          f"({pool_file.stat().st_size / 2**20:.0f} MiB pool)", flush=True)
    steps = Steps()
    base = ["task.name=jsonl", f"task.train={pool_file}", f"task.test={test_file}",
            "active_learning.oracle=human", f"active_learning.query_size={QUERY}",
            f"active_learning.initial_size={LABELLED}", "active_learning.rounds=3",
            f"active_learning.pool_subsample={n // 2}", "scoring.answers=generated"]
    query = min(QUERY, n // 10)
    base[4] = f"active_learning.query_size={query}"
    config = load_config(None, base)
    task = make_task(config.task)
    data = steps("load", lambda: load_data(
        config.task.model_copy(update={"drop_test_overlap": False}), task))
    data.pool, data.dropped = steps("dedupe", lambda: drop_test_overlap(data.pool, data.test,
                                                                       task))
    print(f"  ({len(data.pool)} pool records, {data.dropped} dropped as test repeats)")
    for strategy in ("random", "length"):
        print(f" strategy {strategy}:")
        cfg = load_config(None, [*base, f"active_learning.strategy={strategy}"])
        run_dir = folder / f"run-{strategy}"

        def start() -> RunStore:
            import hashlib

            store = RunStore.create_or_resume(run_dir, cfg)  # noqa: B023
            sha = hashlib.sha1("\n".join(ex.id for ex in data.pool).encode()).hexdigest()
            store.check_pool(len(data.pool), sha, str(pool_file))
            store.add_labels([{"id": ex.id, "round": 0, "answer": "1", "source": "import:a"}
                              for ex in data.pool[:LABELLED]])
            return store

        store = steps("start", start)
        run = Run(cfg, store, task, config_strategy(cfg, 3), data, 3, False,
                  by_id={ex.id: ex for ex in data.pool})
        candidates = steps("subsample", lambda: _candidates(run, 0))  # noqa: B023
        rng = random.Random(1)
        steps("scores", lambda: store.write_round(0, "scores.jsonl", [  # noqa: B023
            {"id": ex.id, "answer": "x " * (k := rng.randint(1, 40)), "answer_tokens": k}  # noqa: B023
            for ex in candidates]))  # noqa: B023
        steps("select", lambda: _select(run, 0))  # noqa: B023

        def label() -> None:
            try:
                oracle.label_collectively(run, 1, lambda: store.read_round(  # noqa: B023
                    0, "selected.jsonl"))
            except oracle.Paused as paused:
                assert paused.pending == query, paused.pending  # noqa: B023
            else:
                raise AssertionError("the run did not pause for answers")

        steps("label", label)
        out = folder / f"queries-{strategy}.csv"
        assert steps("export", lambda: export_queries(store, out, "csv")) == query  # noqa: B023
        answers = folder / f"answers-{strategy}.jsonl"
        answers.write_text("".join(json.dumps({"id": r["id"], "answer": "12"}) + "\n"
                                   for r in store.pending()))
        applied, pending = steps("import", lambda: import_labels(store, answers))  # noqa: B023
        assert (applied, pending) == (query, 0), (applied, pending)
        status = steps("status", store.status)
        assert status["n_labelled"] == LABELLED + query and status["pending"] == 0, status
    total = sum(row[1] for row in steps.rows)
    cpu = sum(row[2] for row in steps.rows)
    peak = max(row[3] for row in steps.rows)
    per_step: dict[str, list[float]] = {}
    for name, seconds, cpu_s, _ in steps.rows:
        wall_cpu = per_step.setdefault(name, [0.0, 0.0])
        wall_cpu[0] += seconds
        wall_cpu[1] += cpu_s
    if not steps.resets:
        print("  (peak RSS could not be reset between steps: each peak is the peak so far)")
    print(f"  cpu_s={cpu:.1f} (this process, every step)")
    return {"pool": n, "total_s": total, "peak_rss_mb": peak, "steps": per_step, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", default="1000000",
                        help="pool size, or sizes separated by commas (one process each)")
    parser.add_argument("--json", help=argparse.SUPPRESS)  # a child writes its result here
    args = parser.parse_args()
    sizes = [int(s) for s in args.pool.split(",")]
    if len(sizes) == 1:
        with tempfile.TemporaryDirectory(prefix="pool-scale-") as tmp:
            result = one_size(sizes[0], Path(tmp))
        if args.json:
            Path(args.json).write_text(json.dumps(result))
        print(f"pool={result['pool']} total_s={result['total_s']:.1f} "
              f"peak_rss_mb={result['peak_rss_mb']:.0f}")
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="pool-scale-") as tmp:
        for n in sizes:
            out = Path(tmp) / f"{n}.json"
            subprocess.run([sys.executable, __file__, "--pool", str(n), "--json", str(out)],
                           check=True, env=dict(os.environ))
            results.append(json.loads(out.read_text()))
    print("\nper step, both strategies summed where a step runs twice: wall seconds, then CPU "
          "seconds (the growth per 10x is the CPU's: on a shared machine the wall time also "
          "holds other jobs' turns)")
    sizes_row = "".join(f"{r['pool']:>10}" for r in results)
    growth_head = "".join(f"  x{results[i + 1]['pool'] // results[i]['pool']:<6}"
                          for i in range(len(results) - 1))
    print(f"  {'step':<10}{sizes_row}  |{sizes_row}  | cpu growth{growth_head}")
    for name in STEPS:
        wall = [r["steps"][name][0] for r in results]
        cpu = [r["steps"][name][1] for r in results]
        growth = [cpu[i + 1] / max(cpu[i], 1e-3) for i in range(len(cpu) - 1)]
        print(f"  {name:<10}" + "".join(f"{c:10.2f}" for c in wall) + "  |"
              + "".join(f"{c:10.2f}" for c in cpu) + "  |           "
              + "".join(f"{g:8.1f}" for g in growth))
    totals = [r["total_s"] for r in results]
    print(f"  {'total':<10}" + "".join(f"{c:12.2f}" for c in totals))
    print(f"  {'cpu':<10}" + "".join(f"{r['cpu_s']:12.2f}" for r in results))
    print(f"  {'peak MiB':<10}" + "".join(f"{r['peak_rss_mb']:12.0f}" for r in results))
    last = results[-1]
    print(f"pool={last['pool']} total_s={last['total_s']:.1f} "
          f"peak_rss_mb={last['peak_rss_mb']:.0f}")


if __name__ == "__main__":
    main()
