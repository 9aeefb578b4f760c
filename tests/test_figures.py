"""No figure without its source (issue 38, item 3).

A figure in the README, results/README.md or the docs that comes from a run is marked by a
comment naming the committed file it comes from, on the line before its block (a table, a list
item or a paragraph: up to the next blank line):

    <!-- source: docs/benchmarks/round-generated-vs-gold-2026-12-04.txt -->
    | date | mc_passes | phase | gold s | generated s | generated / gold |

Every number in the block must be in one of the named files (thousands commas dropped; a
figure with fewer decimals matches the file's number rounded to them; one without a sign may
be a negative number's size), and so must every commit hash and date. Settings quoted as
`key: value`, file names and link targets are not figures. A source is a benchmark's printed
output under ``docs/benchmarks/`` (its command, code, date and machine on ``#`` lines above
it) or a committed result under ``results/``; ``path.md#anchor`` narrows it to one section of
a markdown file. docs/benchmarks.md's opening says how to add one. On that page every table of
figures and every quoted last line (``key=value``) must be sourced, unless it sits under the
heading "Earlier figures (transcribed ...)".
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- source: (.+?) -->\s*$")
#: a commit hash: 7-40 hex digits with at least one letter and one digit, alone as a word
COMMIT = re.compile(r"(?<![\w-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}(?![\w-])")
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
#: a setting quoted as `key: value` (advice, not a figure)
SETTING = re.compile(r"`[\w.]+: [^`]*`")
#: a file name or path (a link's target, a source's name): not a figure
FILE = re.compile(r"[\w./-]+\.(?:txt|md|png|json|jsonl|csv|py|yaml)\b")
#: a number; a minus is its sign only after a space or an opening bracket (``0.90-0.95`` is a
#: range); scientific notation as Python prints it
NUMBER = re.compile(r"(?:(?<=[\s(\[])[-−])?(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?"
                    r"(?![\w.]*\d)%?")
#: the pages checked: the READMEs and every docs page
PAGES = [ROOT / "README.md", ROOT / "results" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]
TRANSCRIBED = "Earlier figures (transcribed"


def numbers(text: str) -> list[str]:
    """The numbers of `text` as written; commit hashes, dates, file names and settings quoted
    as `key: value` left out."""
    text = DATE.sub(" ", COMMIT.sub(" ", FILE.sub(" ", SETTING.sub(" ", text))))
    return [n.replace(",", "").replace("−", "-") for n in NUMBER.findall(text)]


def matches(figure: str, source: set[str]) -> bool:
    """Whether `figure` is one of `source`'s numbers, or one of them rounded to its decimals
    (never one given with more decimals than the source has; scientific notation exactly). A
    figure without a sign may be a negative one's size ("worse by 0.048")."""
    if figure.endswith("%"):  # 89% is 89 in the source, or 0.89 (0.886 rounded)
        figure = figure[:-1]
        whole, _, frac = figure.lstrip("-").partition(".")
        fraction = f"{Decimal(figure) / 100:.{len(frac) + 2}f}"
        return matches(figure, source) or matches(fraction, source)
    value = Decimal(figure)
    decimals = len(figure.partition(".")[2])
    half = Decimal(1).scaleb(-decimals) / 2
    for s in source:
        other = Decimal(s)
        if not figure.startswith("-"):
            other = abs(other)
        if "e" in figure or "e" in s:
            if other == value:
                return True
        elif len(s.partition(".")[2]) >= decimals and abs(other - value) <= half:
            return True
    return False


def blocks(page: str) -> list[tuple[int, list[str], str]]:
    """``(line number, source paths, block text)`` for every marker of the text `page`."""
    lines = page.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if m:
            end = i + 1
            while end < len(lines) and lines[end].strip():
                end += 1
            out.append((i + 1, [p.strip() for p in m.group(1).split(",")],
                        "\n".join(lines[i + 1:end])))
    return out


def slug(heading: str) -> str:
    """A markdown heading's anchor, as mkdocs and GitHub make it: ``Paired comparisons: AULC
    (primary)`` is ``paired-comparisons-aulc-primary``."""
    kept = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s+", "-", kept.strip())


def source_text(source: str) -> str | None:
    """The text of a source: a file, or with ``#anchor`` one section of a markdown file (from
    that heading to the next heading of its level or above); None when it is not there."""
    path, _, anchor = source.partition("#")
    if not (ROOT / path).is_file():
        return None
    text = (ROOT / path).read_text(encoding="utf-8")
    if not anchor:
        return text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        level = len(line) - len(line.lstrip("#"))
        if level and line[level:].startswith(" ") and slug(line[level:]) == anchor:
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].startswith("#") and
                        len(lines[j]) - len(lines[j].lstrip("#")) <= level), len(lines))
            return "\n".join(lines[i:end])
    return None


def problems(page: str, name: str) -> list[str]:
    """What is wrong with the sourced blocks of the text `page` (shown as `name`): a missing
    file, a figure, commit or date not in its files."""
    out = []
    for line, sources, text in blocks(page):
        where = f"{name}:{line}"
        if not text:
            out.append(f"{where}: a source marker with no block after it")
        texts = {s: source_text(s) for s in sources}
        missing = [s for s, t in texts.items() if t is None]
        if missing:
            out.append(f"{where}: source file(s) or section(s) not found: {missing}")
            continue
        source = "\n".join(texts.values())
        found = {n.rstrip("%") for n in numbers(source)}
        for figure in numbers(text):
            if not matches(figure, found):
                out.append(f"{where}: {figure} is not in {', '.join(sources)}")
        for token in COMMIT.findall(FILE.sub(" ", text)) + DATE.findall(FILE.sub(" ", text)):
            if token not in source:
                out.append(f"{where}: {token} is not in {', '.join(sources)}")
    return out


def test_numbers_leave_out_hashes_dates_and_read_ranges_and_signs():
    assert numbers("d89e817 at 2026-12-04: 1.26-1.46x, [-0.023, 0.024], 20,000 ok, 6.2e-7") \
        == ["1.26", "1.46", "-0.023", "0.024", "20000", "6.2e-7"]
    assert numbers("3d72548 and ec2a89d, r 64, load 9-14") == ["64", "9", "14"]
    assert numbers("[out](benchmarks/pool-scale-da3cbfc.txt), 1e-5") == ["1e-5"]
    assert numbers("use `scoring.samples: 5`, `mc_passes=1`") == ["1"]
    assert numbers("89% of 16, top-25% (0.5%)") == ["89%", "16", "25%", "0.5%"]


def test_a_figure_matches_its_source_rounded_and_nothing_else():
    source = {"267.6", "1.35", "0.19922", "620.5", "6.2e-7"}
    assert matches("268", source) and matches("1.35", source) and matches("0.20", source)
    assert matches("621", source) and matches("620", source) and matches("6.2e-7", source)
    assert matches("1.4", {"1.35"}) and matches("0.199", {"0.19922"})
    assert not matches("1.36", source) and not matches("267.7", source)
    assert not matches("0.21", source) and not matches("1.350", {"1.35"})
    assert not matches("6.3e-7", source) and not matches("269", source)
    assert matches("0.048", {"-0.0481"}) and not matches("-0.048", {"0.0481"})
    assert matches("89%", {"0.886"}) and matches("49.2%", {"49.2"}) and not matches("88%", {"0.886"})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_sourced_figure_is_in_its_committed_source(page):
    """Change a figure without its source (or name a file that is not there) and this fails."""
    assert not problems(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)))


def test_a_changed_figure_or_a_missing_source_fails():
    """The check itself, on the page with one figure changed, and with a file that is not."""
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "generated_vs_gold=1.35" in page and not problems(page, "page")
    changed = page.replace("generated_vs_gold=1.35", "generated_vs_gold=1.36")
    assert any("1.36 is not in" in p for p in problems(changed, "page"))
    gone = "<!-- source: docs/benchmarks/no-such-file.txt -->\n1.35\n"
    assert any("not found" in p for p in problems(gone, "page"))
    gone = "<!-- source: results/arith-study/report/study.md#no-such-section -->\n1.35\n"
    assert any("not found" in p for p in problems(gone, "page"))
    study = (ROOT / "docs" / "strategies.md").read_text(encoding="utf-8")
    assert any("0.082 is not in" in p
               for p in problems(study.replace("by 0.081", "by 0.082"), "strategies"))


def unsourced(page: str) -> list[str]:
    """The lines of docs/benchmarks.md's text `page` that hold a table row of figures or a
    quoted last line (`key=1.23`) outside a sourced block, above the transcribed section."""
    lines = page.splitlines()
    sourced: set[int] = set()
    for i, line in enumerate(lines):
        if MARKER.match(line):
            end = i + 1
            while end < len(lines) and lines[end].strip():
                sourced.add(end)
                end += 1
    earlier = next((i for i, line in enumerate(lines)
                    if line.startswith("## ") and TRANSCRIBED in line), len(lines))
    out = []
    fenced = False
    for i, line in enumerate(lines[:earlier]):
        fenced ^= line.startswith("```")
        if fenced or i in sourced:
            continue
        row = line.startswith("|") and not line.startswith("|---") and numbers(line)
        header = i + 1 < len(lines) and lines[i + 1].startswith("|---")
        if (row and not header) or re.search(r"`[^`]*\w=\d[^`]*`", line):
            out.append(f"docs/benchmarks.md:{i + 1}: {line[:80]}")
    return out


def test_every_figure_table_and_last_line_in_benchmarks_is_sourced_or_transcribed():
    """In docs/benchmarks.md a table of figures, or a quoted last line (`key=1.23`), sits in a
    sourced block, or below the heading of the transcribed earlier figures."""
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert not unsourced(page), "figures without a source marker:\n" + "\n".join(unsourced(page))
    marker = "<!-- source: docs/benchmarks/pool-scale-da3cbfc.txt -->\n"
    assert marker in page and unsourced(page.replace(marker, ""))
    heading = "## Earlier figures (transcribed, no committed output)"
    assert unsourced(page.replace(heading, "## Earlier figures"))


def _baselines():
    return load_script("results/arith-study/baselines.py")


def test_plain_pe_and_me_beat_random_in_every_seed_as_the_readme_says():
    """README, "which strategy when": on `arith`, `pe`, `me` "beat `random` in every seed of
    the first study", from its committed runs (AULC per seed as
    `results/arith-study/baselines.py` computes it)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "it beat `random` in every seed of the first study" in readme
    runs = ROOT / "results" / "arith-study" / "runs"
    aulcs = _baselines().seed_aulcs
    random = aulcs(runs / "random")
    assert len(random) == 10
    for arm in ("pe", "me"):
        ours = aulcs(runs / arm)
        assert sorted(ours) == sorted(random)
        assert all(ours[s][1] > random[s][1] for s in random), arm


@pytest.mark.parametrize("setting", ["smollm2", "calendar"])
def test_study_2s_exploratory_pairs_regenerate_from_its_committed_runs(
        setting, monkeypatch, capsys):
    """results/study-2/exploratory/pairs-<setting>.md, the source of the README's "plain `pe`
    fell below `random` on `calendar`", is what `baselines.py --pair` prints from the committed
    runs, with the command results/study-2/README.md gives."""
    study = ROOT / "results" / "study-2"
    pairs = ["pe:random", "pe-dynamic-adapted:random", "pe-kmeans:random",
             "pe-kmeans:pe-dynamic-adapted"]
    monkeypatch.setattr("sys.argv", ["baselines.py", str(study / "runs" / setting),
                                     *(a for p in pairs for a in ("--pair", p))])
    assert _baselines().main() == 0
    printed = capsys.readouterr().out
    assert printed == (study / "exploratory" / f"pairs-{setting}.md").read_text(encoding="utf-8")
    assert printed.count("| 12 |") == 4
    readme = (study / "README.md").read_text(encoding="utf-8")
    assert " ".join(f"--pair {p}" for p in pairs) in " ".join(readme.replace("\\\n", " ").split())


def test_a_pair_without_its_colon_is_a_usage_error(monkeypatch, capsys):
    runs = ROOT / "results" / "study-2" / "runs" / "calendar"
    monkeypatch.setattr("sys.argv", ["baselines.py", str(runs), "--pair", "pe-random"])
    with pytest.raises(SystemExit) as exit_:
        _baselines().main()
    assert exit_.value.code == 2 and "'pe-random': expected ARM:BASELINE" in capsys.readouterr().err


def test_the_study_has_the_arms_seeds_and_probe_runs_the_docs_count():
    """docs/strategies.md: "8 arms × 10 paired seeds" (the study report's arms table) and the
    OpenBookQA probe's "9 runs" (its committed runs)."""
    page = (ROOT / "docs" / "strategies.md").read_text(encoding="utf-8")
    assert "8 arms × 10 paired seeds" in page and "(exploratory, 9 runs)" in page
    arms = source_text("results/arith-study/report/study.md#arms").splitlines()
    rows = [line.split("|") for line in arms if line.startswith("| ") and "n seeds" not in line]
    assert len(rows) == 8 and all(row[2].strip() == "10" for row in rows)
    probe = ROOT / "results" / "obqa-probe" / "runs"
    assert len([run for run in probe.glob("*/seed*") if (run / "metrics.jsonl").is_file()]) == 9


def test_every_benchmark_output_says_how_it_was_made_and_is_quoted():
    """Each file under docs/benchmarks/ starts with its command, code, date and machine on
    `#` lines, and some page's marker names it (no output left unquoted)."""
    named = {s.partition("#")[0] for page in PAGES
             for _, sources, _ in blocks(page.read_text(encoding="utf-8")) for s in sources}
    outputs = sorted((ROOT / "docs" / "benchmarks").glob("*.txt"))
    assert outputs
    for path in outputs:
        head = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.startswith("# ")]
        keys = {line[2:].split(":")[0] for line in head}
        assert {"command", "code", "date", "machine"} <= keys, path.name
        assert f"docs/benchmarks/{path.name}" in named, f"{path.name} is quoted nowhere"


def test_record_writes_the_command_code_date_machine_and_output(tmp_path):
    """benchmarks/record.py: the header test_figures and docs/benchmarks.md describe, then the
    command's stdout unchanged; a failing command writes nothing; a file is not replaced."""
    import subprocess
    import sys

    out = tmp_path / "x.txt"
    script = [sys.executable, str(ROOT / "benchmarks" / "record.py")]
    command = [sys.executable, "-c", "print('speed_vs_reference=1.35')"]
    done = subprocess.run([*script, str(out), "--note", "shared machine", "--", *command],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = out.read_text(encoding="utf-8")
    keys = {line[2:].split(":")[0] for line in text.splitlines() if line.startswith("# ")}
    assert {"command", "code", "date", "machine"} <= keys and "# shared machine\n" in text
    assert text.endswith("\nspeed_vs_reference=1.35\n") and "speed_vs_reference=1.35" in done.stdout
    assert matches("1.35", {n.rstrip("%") for n in numbers(text)})
    again = subprocess.run([*script, str(out), "--", *command], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr
    failed = subprocess.run([*script, str(tmp_path / "y.txt"), "--", sys.executable, "-c",
                             "raise SystemExit(3)"], capture_output=True, text=True)
    assert failed.returncode == 3 and not (tmp_path / "y.txt").exists()
