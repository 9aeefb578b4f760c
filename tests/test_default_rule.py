"""results/study-2/default_rule.py: the protocol's rule that sets the default strategy, on
report rows made up to sit on each side of its thresholds."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from scripts import ROOT, load_script

HEAD = ["section", "task", "arm", "baseline", "round", "quantity", "n", "estimate", "ci_low",
        "p", "p_holm", "note"]
A3, A4 = "pe-dynamic [base_scores=adapted]", "pe [diversity=kmeans]"


@pytest.fixture(scope="module")
def rule():
    return load_script("results/study-2/default_rule.py")


def rows(arm: str, aulc: float, vs_random: tuple[float, float], vs_pe: tuple[float, float],
         tost_p: float, task: str = "arith") -> list[dict[str, str]]:
    """`arm`'s AULC rows on 12 seeds: (p_holm, ci_low) against random and against pe, the
    TOST p, and labels saved read at round 6."""
    def r(section, baseline, estimate="", ci_low="", p="", p_holm="", note="", round_=""):
        return dict(zip(HEAD, [section, task, arm, baseline, round_, "aulc", "12",
                               str(estimate), str(ci_low), str(p), str(p_holm), note]))
    return [r("arms", "", aulc),
            r("paired", "random", 0.05, vs_random[1], 0.01, vs_random[0],
              "primary; ci seeds x items"),
            r("paired", "pe", 0.0, vs_pe[1], 0.5, vs_pe[0], "primary; ci seeds x items"),
            r("tost", "pe", 0.0, "", tost_p), r("reach", "random", round_="6")]


GOOD = ((0.002, 0.01), (1.0, -0.02), 0.01)      # beats random, equivalent to pe


def test_the_arms_are_the_ones_comparisons_yaml_declares(rule):
    assert rule.candidates(ROOT / "results/study-2/comparisons.yaml") == [A3, A4]


def test_both_qualify_in_both_settings_the_higher_mean_aulc_wins(rule):
    reports = {"smollm2": rows(A3, 0.43, *GOOD) + rows(A4, 0.42, *GOOD),
               "calendar": rows(A3, 0.30, *GOOD) + rows(A4, 0.32, *GOOD)}
    assert rule.default(reports, [A3, A4])[0] == A4      # 0.370 against 0.365


def test_an_arm_must_qualify_in_every_setting(rule):
    not_random = ((0.06, 0.01), (1.0, -0.02), 0.01)     # Holm p above 0.05
    below_zero = ((0.002, -0.001), (1.0, -0.02), 0.01)  # interval not above 0
    not_equivalent = ((0.002, 0.01), (1.0, -0.05), 0.2)
    beats_pe = ((0.002, 0.01), (0.01, 0.005), 0.2)      # not equivalent, but better than pe
    for bad in (not_random, below_zero, not_equivalent):
        reports = {"smollm2": rows(A3, 0.5, *GOOD) + rows(A4, 0.42, *GOOD),
                   "calendar": rows(A3, 0.5, *bad) + rows(A4, 0.32, *GOOD)}
        assert rule.default(reports, [A3, A4])[0] == A4
    reports = {"smollm2": rows(A3, 0.5, *beats_pe), "calendar": rows(A3, 0.5, *GOOD)}
    assert rule.default(reports, [A3])[0] == A3


def test_none_qualifies_the_default_is_pe_and_a_missing_row_is_an_error(rule):
    reports = {"smollm2": rows(A3, 0.5, (0.2, -0.01), (1.0, -0.02), 0.01)}
    pick, lines = rule.default(reports, [A3])
    assert pick == "pe" and "rule 3" in lines[-1]
    with pytest.raises(KeyError, match="no tost AULC row"):
        rule.default({"x": rows(A3, 0.5, *GOOD)[:3]}, [A3])


def test_the_script_reads_study_csv_files_named_by_their_setting(rule, tmp_path, capsys,
                                                                  monkeypatch):
    paths = []
    for setting, task, aulc in (("smollm2", "arith", 0.4), ("calendar", "calendar", 0.3)):
        path = tmp_path / setting / "study.csv"
        path.parent.mkdir()
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, HEAD, restval="")
            w.writeheader()
            w.writerows(rows(A3, aulc, *GOOD, task) + rows(A4, aulc - 0.01, *GOOD, task))
        paths.append(str(path))
    monkeypatch.setattr("sys.argv", ["default_rule.py", *paths])
    assert rule.main() == 0
    out = capsys.readouterr().out
    assert f"{A3} in calendar: beats random True" in out
    assert out.strip().endswith(f"default: {A3}")
    Path(paths[1]).write_text(",".join(HEAD) + "\n")
    assert rule.main() == 1


def test_the_rule_is_applied_to_the_whole_study_only(rule):
    """Both tasks, 12 seeds on every row the rule reads, intervals over seeds and items, and
    every round: otherwise the report's numbers are not the protocol's endpoints."""
    def whole():
        return {"smollm2": rows(A3, 0.4, *GOOD) + rows(A4, 0.4, *GOOD),
                "calendar": rows(A3, 0.3, *GOOD, "calendar") + rows(A4, 0.3, *GOOD, "calendar")}

    assert rule.incomplete(whole(), [A3, A4]) == []
    one = whole()
    del one["calendar"]
    assert "one report of each task" in rule.incomplete(one, [A3, A4])[0]
    twice = whole()
    twice["calendar"] = twice["smollm2"]
    assert "one report of each task" in rule.incomplete(twice, [A3, A4])[0]
    for field, value, said in (("n", "11", "on 11 seeds, not 12"),
                               ("note", "primary; ci seeds only", "did not resample"),
                               ("round", "5", "ends at round 5")):
        cut = whole()
        section = {"n": "tost", "note": "paired", "round": "reach"}[field]
        next(r for r in cut["calendar"] if r["section"] == section)[field] = value
        assert [said in p for p in rule.incomplete(cut, [A3, A4])] == [True]
