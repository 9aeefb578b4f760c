"""Declared comparisons (`starlora report --comparisons`): the primary family a protocol
fixes, its TOST verdicts and the labels-to-reach endpoint, on synthetic runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import test_study
from test_study import N_LABELLED, curve, read_csv, write_study_run

from starlora.errors import DataError
from starlora.report import build_report, load_runs
from starlora.study.declared import load_declared
from starlora.study.report import write_studies
from starlora.study.stats import aulc, first_reach, tost_p

RAW_FULL = "pe-dynamic [normalize=raw_full]"


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """random, pe, and a repaired STAR arm (the authors' mixing, a setting other than the
    answers: a "variant" to the first study's family), 6 seeds each: STAR beats random on
    every seed, and equals pe on 3 seeds, beats it by one round's item on the others."""
    monkeypatch.setitem(test_study.STUDY_ARMS, RAW_FULL,
                        ("pe-dynamic", ["active_learning.normalize=raw_full"]))
    out = []
    for seed in range(6):
        out.append(write_study_run(tmp_path / "runs", "random", seed, curve(seed, 0)))
        out.append(write_study_run(tmp_path / "runs", "pe", seed, curve(seed, 1)))
        out.append(write_study_run(tmp_path / "runs", RAW_FULL, seed, curve(seed, 1 + seed % 2)))
    return out


def declare(tmp_path, text: str):
    path = tmp_path / "comparisons.yaml"
    path.write_text(text)
    return path


FAMILY = f"""# the protocol's family
primary:
  - {{arm: "{RAW_FULL}", baseline: random}}
  - {{arm: "{RAW_FULL}", baseline: pe, margin: 0.05}}
"""


def test_first_reach_interpolates_between_rounds():
    assert first_reach([4, 8, 12], [0.3, 0.5, 0.7], 0.6) == pytest.approx(10.0)
    assert first_reach([4, 8, 12], [0.6, 0.5, 0.7], 0.6) == 4.0  # reached at the start
    assert first_reach([4, 8, 12], [0.3, 0.5, 0.55], 0.6) == float("inf")
    assert first_reach([4, 8, 12], [0.3, 0.7, 0.9], 0.5) == pytest.approx(6.0)


def test_the_declared_pairs_are_the_primary_family_with_tost(runs, tmp_path):
    without = read_csv(write_studies(load_runs(runs), tmp_path / "a")["study.csv"])
    # the first study's family: the repaired arm is a variant, only against plain pe-dynamic,
    # which is not here: nothing primary
    assert not [r for r in without if r["section"] == "paired" and "primary" in r["note"]]
    written = build_report(runs, tmp_path / "b", declare(tmp_path, FAMILY))
    rows = read_csv(written["study.csv"])
    paired = {(r["baseline"], r["quantity"]): r for r in rows
              if r["section"] == "paired" and r["arm"] == RAW_FULL}
    assert set(paired) == {(b, q) for b in ("random", "pe")
                           for q in ("aulc", "final_accuracy", "final_ece")}
    vs_random, vs_pe = paired[("random", "aulc")], paired[("pe", "aulc")]
    assert vs_random["p"] == "0.031250" and vs_pe["p"] == "0.250000"  # 6 > 0; 3 > 0, 3 ties
    assert vs_random["p_holm"] == "0.062500" and vs_pe["p_holm"] == "0.250000"
    assert vs_random["note"].startswith("primary") and vs_pe["note"].startswith("primary")
    diffs = [aulc(N_LABELLED, np.mean(curve(s, 1 + s % 2), axis=1))
             - aulc(N_LABELLED, np.mean(curve(s, 1), axis=1)) for s in range(6)]
    tost = [r for r in rows if r["section"] == "tost"]
    assert len(tost) == 1 and tost[0]["baseline"] == "pe"
    assert float(tost[0]["p"]) == pytest.approx(tost_p(diffs, 0.05), abs=1e-6)
    assert tost[0]["note"] == "equivalence within ±0.05"
    md = written["study.md"].read_text()
    assert "The pairs declared in `comparisons.yaml` (sha256 " in md
    assert "| margin | TOST p |" in md and "| ±0.05 |" in md
    # labels to reach random's final accuracy: pe reaches it (0.5) a round early
    reach = {r["arm"]: r for r in rows if r["section"] == "reach"}
    assert set(reach) == {"pe", RAW_FULL}
    assert float(reach["pe"]["estimate"]) == pytest.approx(8.0)  # 0.5 at round 1 (n=8)
    assert "saved 4.000000" in reach["pe"]["note"] and "target 0.500000" in reach["pe"]["note"]
    assert float(reach[RAW_FULL]["estimate"]) < 8.0  # 0.55 at n=8 half the seeds: earlier
    assert "## Labels to reach random's final accuracy (secondary)" in md
    # the interval sits beside the count it is of, not beside the saving
    assert "| labelled to reach | its 95% CI | saved |" in md
    # the same runs and file give the same bytes
    again = build_report(list(reversed(runs)), tmp_path / "c", tmp_path / "comparisons.yaml")
    for name in ("study.md", "study.csv"):
        assert again[name].read_bytes() == written[name].read_bytes()


def test_without_a_declaration_nothing_changes(runs, tmp_path):
    """The first study's tables do not move: no tost or reach rows, the old wording."""
    md = write_studies(load_runs(runs), tmp_path / "a")["study.md"].read_text()
    assert "declared" not in md and "TOST" not in md and "Labels to reach" not in md


def test_a_pair_missing_from_a_group_is_listed_untested(runs, tmp_path, monkeypatch):
    """A second experiment (another pool size: another design) has random and pe only: the
    declared pair that needs the repaired arm is not tested there, and said so."""
    other = []
    for label, strategy in (("random@40", "random"), ("pe@40", "pe")):
        monkeypatch.setitem(test_study.STUDY_ARMS, label, (strategy, ["task.pool_size=40"]))
        other += [write_study_run(tmp_path / "runs", label, seed, curve(seed, strategy == "pe"))
                  for seed in range(3)]
    text = FAMILY + '  - {arm: "pe", baseline: random}\n'
    written = build_report(runs + other, tmp_path / "r", declare(tmp_path, text))
    studies = sorted(n for n in written if n.endswith("study.csv"))
    assert len(studies) == 2
    pairs = [{(r["arm"], r["baseline"]) for r in read_csv(written[n])
              if r["section"] == "paired"} for n in studies]
    assert sorted(pairs, key=len) == [{("pe", "random")},
                                      {(RAW_FULL, "random"), (RAW_FULL, "pe"), ("pe", "random")}]
    small = next(written[n.replace(".csv", ".md")].read_text() for n, p in zip(studies, pairs)
                 if len(p) == 1)
    assert ("Not tested (each counts as p = 1 in Holm's family of the 3 declared pairs): "
            f"{RAW_FULL} vs random (no arm {RAW_FULL} here); "
            f"{RAW_FULL} vs pe (no arm {RAW_FULL} here)." in small)
    # Holm over the 3 declared pairs, not over the 1 tested here: pe beats random on all 3
    # seeds, p = 2/8, Holm p = 3 x 2/8 (the two untested pairs count as p = 1)
    row = next(r for n, p in zip(studies, pairs) if len(p) == 1 for r in read_csv(written[n])
               if r["section"] == "paired" and r["quantity"] == "aulc")
    assert row["p"] == "0.250000" and row["p_holm"] == "0.750000"
    assert "| 0.25000 | 0.75000 | seeds x items | 0.25000 | 0.75000 |" in small  # min p, Holm
    assert ("Cannot reach significance with so few seeds (even at its smallest p, the Holm p "
            "is not below 0.05): pe vs random (3 seeds)." in small)


def with_agreement(run, values: list) -> None:
    """Add stop-set agreements (one per round) to a run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "stop_agreement": v}) + "\n"
                            for r, v in zip(recs, values, strict=True)))


def test_a_declared_stopping_rule_gives_each_arm_its_stop_point(runs, tmp_path):
    """`pe` drops below the rule in round 2 and stops after round 1 (8 labelled, accuracy
    0.5 against 0.6 at the end); the repaired arm's rule first holds in its last round;
    `random` recorded no stop set and is left out."""
    for run in runs:
        if run.name.startswith("pe-") and "dynamic" not in run.name:
            with_agreement(run, [None, 0.6, 0.2])
        elif "dynamic" in run.name:
            with_agreement(run, [None, 0.4, 0.6])
    path = declare(tmp_path, FAMILY + 'stop_when: "agreement >= 0.5"\n')
    written = build_report(runs, tmp_path / "r", path)
    rows = {r["arm"]: r for r in read_csv(written["study.csv"]) if r["section"] == "stop"}
    assert set(rows) == {"pe", RAW_FULL}
    assert rows["pe"]["estimate"] == "8.000000" and rows["pe"]["n"] == "6"
    assert rows["pe"]["note"] == ("rule agreement >= 0.5 for 1 rounds; stopped early 6; "
                                  "accuracy at stop 0.500000; final 0.600000; saved 4.000000")
    assert rows[RAW_FULL]["estimate"] == "12.000000" and "stopped early 0" in rows[RAW_FULL]["note"]
    md = written["study.md"].read_text()
    assert "## Stopping: `agreement >= 0.5 for 1 rounds` (secondary)" in md
    assert "| pe | 6 | 6/6 | 8.0 | 0.500 | 0.600 | 4.0 | 0.100 |" in md


def with_answers(run, answers: list[str], gold: str = "1") -> None:
    """Rewrite a run's test answers: in round k every item answers `answers[k]`, with a
    generated answer's confidence field (`logprob_mean`), the given gold answer and, unless
    gold is "1", a `correct` that changes from round to round (the labels a label-free signal
    must not read)."""
    for k, answer in enumerate(answers):
        path = run / "rounds" / str(k) / "predictions.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({
            **r, "prediction": answer, "gold": gold, "logprob_mean": -0.1 * (k + 1),
            "correct": r["correct"] if gold == "1" else (i + k) % 2 == 0}) + "\n"
            for i, r in enumerate(rows)))


def test_stop_on_test_reads_the_rule_from_the_test_answers_and_no_label(runs, tmp_path):
    """`stop_on: test`: the agreement of each round's test answers with the previous round's.
    `pe` answers the same in rounds 0 and 1 (agreement 1 in round 1: it stops there, 8
    labelled); the repaired arm changes every answer in round 1 and keeps them in round 2 (it
    fires in its last round); `random` changes every round (never fires). No run set a stop
    set aside, and the labels (gold, correct) do not matter."""
    def stops(gold: str) -> dict:
        for run in runs:
            pattern = ({"pe": "aab", "random": "abc"}.get(run.name.rsplit("-", 1)[0], "abb")
                       if "dynamic" not in run.name else "abb")
            with_answers(run, list(pattern), gold)
        path = declare(tmp_path, FAMILY + 'stop_when: "agreement >= 0.5"\nstop_on: test\n')
        written = build_report(runs, tmp_path / f"r{gold}", path)
        md = written["study.md"].read_text()
        assert "computed on the test answers (`stop_on: test`" in md
        return {r["arm"]: r for r in read_csv(written["study.csv"]) if r["section"] == "stop"}

    rows = stops("1")
    assert set(rows) == {"pe", "random", RAW_FULL}
    assert rows["pe"]["estimate"] == "8.000000" and "stopped early 6" in rows["pe"]["note"]
    assert rows[RAW_FULL]["estimate"] == "12.000000" and "stopped early 0" in rows[RAW_FULL]["note"]
    assert rows["random"]["estimate"] == "12.000000" and "stopped early 0" in rows["random"]["note"]
    assert stops("b") == rows  # other gold answers and correctness, the same stop points
    without = declare(tmp_path, FAMILY + 'stop_when: "agreement >= 0.5"\n')  # stop_set
    assert not [r for r in read_csv(build_report(runs, tmp_path / "s", without)["study.csv"])
                if r["section"] == "stop"]


@pytest.mark.parametrize(("text", "line", "field", "problem"), [
    ("primary:\n  - {arm: pe, baseline: random}\nstop_when: agreement >= often\n", 3,
     "stop_when", "not a stopping rule"),
    ("primary: []\n", 1, "primary", "non-empty list"),
    ("primary:\n  - {arm: pe, baseline: random}\nstop_on: test\n", 3, "stop_on",
     "needs a stop_when rule"),
    ("primary:\n  - {arm: pe, baseline: random}\nstop_when: agreement >= 0.5\nstop_on: pool\n",
     4, "stop_on", "expected one of stop_set, test"),
    ("primary:\n  - {arm: pe}\n", 2, "baseline", "missing"),
    ("primary:\n  - {arm: pe, baseline: random, margin: -0.1}\n", 2, "margin", "positive"),
    ("primary:\n  - {arm: pe, baseline: random, margni: 0.1}\n", 2, "margni", "unknown field"),
    ("primary:\n  - {arm: pe, baseline: pe}\n", 2, "baseline", "itself"),
    ("primary:\n  - {arm: pe, baseline: random}\n  - {arm: pe, baseline: random}\n", 3, None,
     "declared twice (also line 2)"),
    ("primary:\n  - {arm: 3, baseline: random}\n", 2, "arm", "wrong type"),
    ("pairs: []\n", 1, "pairs", "unknown key"),
    ("primary: [\n", 2, None, "not YAML"),
])
def test_a_bad_comparisons_file_names_its_line_and_field(tmp_path, text, line, field, problem):
    with pytest.raises(DataError) as e:
        load_declared(declare(tmp_path, text))
    assert (e.value.line, e.value.field) == (line, field) and problem in e.value.problem
    assert e.value.path.endswith("comparisons.yaml")


def test_a_declared_arm_no_run_has_fails_before_anything_is_written(runs, tmp_path):
    path = declare(tmp_path, "primary:\n  - {arm: pe-dynamic, baseline: random}\n")
    out = tmp_path / "report"
    out.mkdir()
    (out / "study.md").write_text("the last report\n")
    cmd = [sys.executable, "-m", "starlora", "report", *map(str, runs), "--out", str(out),
           "--comparisons", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "comparisons.yaml:2: arm: no study arm is labelled 'pe-dynamic'" in proc.stderr
    assert RAW_FULL in proc.stderr  # the arms it does have
    assert sorted(p.name for p in out.iterdir()) == ["study.md"]
    assert (out / "study.md").read_text() == "the last report\n"
