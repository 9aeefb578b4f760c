"""Run a benchmark and commit what it printed: the source file of a figure in docs/benchmarks.md.

    python benchmarks/record.py docs/benchmarks/NAME.txt -- python benchmarks/scoring.py --limit 24

Runs the command after ``--`` (its stdout is shown and kept; stderr passes through) and, if it
exits 0, writes NAME.txt: ``#`` lines with the command (and ``OMP_NUM_THREADS`` when set), the
code's commit (marked when src/ has uncommitted changes), the date, the machine (CPU, cores,
memory, torch, GPU), the load average before and after, and the wall time; then the command's
stdout, unchanged. Quote its figures in docs/benchmarks.md under
``<!-- source: docs/benchmarks/NAME.txt -->``; tests/test_figures.py checks them against it.
An existing file is kept unless ``--force``; ``--note`` adds a ``#`` line (e.g. "shared machine").
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def code() -> str:
    """The checkout's short commit, marked when src/ has uncommitted changes."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    if _git("status", "--porcelain", "--untracked-files=no", "--", "src"):
        commit += " (with uncommitted changes under src/)"
    return commit


def machine() -> str:
    """CPU model, logical cores, memory, torch version and GPU, in one line."""
    cpu = platform.processor() or platform.machine()
    memory = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        torch = f"torch {importlib.metadata.version('torch')}"
    except importlib.metadata.PackageNotFoundError:
        torch = "no torch"
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout.strip().splitlines()
        gpu = ", ".join(names) or gpu
    return f"{cpu}, {os.cpu_count()} logical cores{memory}; {torch}; {gpu}"


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: python benchmarks/record.py OUT.txt [--force] [--note TEXT] -- COMMAND...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    parser.add_argument("--note", action="append", default=[], help="another # line")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        sys.exit("no command after --")
    if args.out.exists() and not args.force:
        sys.exit(f"{args.out} exists: it is the source of quoted figures (--force replaces it)")
    threads = os.environ.get("OMP_NUM_THREADS")
    shown = (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(command)
    started = datetime.datetime.now(datetime.timezone.utc)
    before, t0 = load(), time.perf_counter()
    out: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            out.append(line)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"record: the command exited {proc.returncode}; {args.out} not written",
              file=sys.stderr)
        return proc.returncode
    ended = datetime.datetime.now(datetime.timezone.utc)
    head = [
        f"command: {shown}",
        f"code: {code()}",
        f"date: {started:%Y-%m-%d %H:%M:%S} UTC (ended {ended:%H:%M:%S}; {seconds:.1f} s wall)",
        f"machine: {machine()}",
        f"load average (1/5/15 min): {before} before, {load()} after",
        *args.note,
    ]
    text = "".join(f"# {line}\n" for line in head) + "".join(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"record: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
