"""The README's demo figures, generated from a demo's own output, never typed by hand.

    python docs/hooks/demo_figures.py --from starlora-demo   # after a whole `starlora demo`
    python docs/hooks/demo_figures.py --check                # the README matches docs/demo.json

``--from`` reads the demo's ``demo.json`` (time, machine, accuracy per labelled count; written
by `starlora.demo.run_demo`), adds the commit and the date, and writes ``docs/demo.json``
(the committed source), ``docs/demo-accuracy.png`` (the report's learning curve) and the
README's paragraph between the ``demo-figures`` markers. It refuses a demo that resumed
earlier work, whose time is not the whole demo's. ``make demo UPDATE_README=1`` runs a fresh
demo and then this. ``tests/test_docs.py`` checks that the README's paragraph is what
``docs/demo.json`` renders to.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SOURCE = ROOT / "docs" / "demo.json"
IMAGE = ROOT / "docs" / "demo-accuracy.png"
BEGIN, END = "<!-- demo-figures: begin (docs/hooks/demo_figures.py) -->", "<!-- demo-figures: end -->"


def render(record: dict) -> str:
    """The README's demo paragraph for a `docs/demo.json` record."""
    counts = [n for n, _ in next(iter(record["accuracy"].values()))]
    lines = [
        textwrap.fill(
            f"Last measured on {record['date']} at commit {record['commit']}, on "
            f"{record['cpus']} CPU cores ({record['cpu']}), {record['note']}: the demo took "
            f"**{record['minutes']:.1f} minutes** after set-up. Accuracy on the test problems "
            f"at {', '.join(map(str, counts))} labels:", width=95, break_on_hyphens=False),
        "",
    ]
    for strategy, curve in record["accuracy"].items():
        lines.append(f"- {strategy}: {', '.join(f'{a:.2f}' for _, a in curve)}")
    lines += ["", "One seed on a small test set: a gap between the two says nothing either way."]
    return "\n".join(lines)


def block(text: str) -> str:
    """The README text between the markers (ValueError without them)."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n")


def write_readme(record: dict) -> None:
    text = README.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + render(record) + "\n" + text[end:], encoding="utf-8")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def from_demo(out: Path, note: str) -> dict:
    """`docs/demo.json` from the demo folder `out`; copies its learning curve."""
    demo = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    if demo["resumed"]:
        sys.exit(f"{out}: the demo resumed earlier work, so its time is not the whole demo's; "
                 "remove the folder and run it again")
    commit = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no", "--", "src"):
        commit += " (with uncommitted changes under src/)"
    record = {"date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
              "commit": commit, "note": note, **demo}
    SOURCE.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    shutil.copyfile(out / "report" / "accuracy.png", IMAGE)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="out", type=Path, help="a finished demo's folder")
    parser.add_argument("--note", default="nothing else running",
                        help="how the machine was loaded, e.g. 'another job on the cores'")
    parser.add_argument("--check", action="store_true", help="only check the README")
    args = parser.parse_args()
    if args.check:
        record = json.loads(SOURCE.read_text(encoding="utf-8"))
        if block(README.read_text(encoding="utf-8")) != render(record):
            sys.exit("README.md: the demo paragraph differs from docs/demo.json; run "
                     "python docs/hooks/demo_figures.py --from <demo folder> or restore it")
        return 0
    if args.out is None:
        parser.error("--from or --check")
    write_readme(from_demo(args.out, args.note))
    print(f"wrote {SOURCE.relative_to(ROOT)}, {IMAGE.relative_to(ROOT)} and README.md's demo "
          "paragraph")
    return 0


if __name__ == "__main__":
    sys.exit(main())
