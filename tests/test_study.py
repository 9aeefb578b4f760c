"""The study of `starlora report`: paired statistics, arm labels and tables, on synthetic runs."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from starlora.config import dump_config, flatten_config, load_config
from starlora.report import build_report, load_runs
from starlora.run.protocol import protocol_id
from starlora.run.uncertainty import COLUMNS
from starlora.study import label_arms
from starlora.study.report import write_studies
from starlora.study.stats import (
    aulc,
    aulc_weights,
    auroc,
    bootstrap_diff_ci,
    holm,
    sign_flip_p,
    spearman,
    tost_p,
)
from starlora.tasks import get_task

# -- statistics ---------------------------------------------------------------------------


def brute_sign_flip(d: list[int]) -> float:
    """Reference: every sign vector, in exact integer arithmetic."""
    obs = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= obs
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


def test_sign_flip_p_on_known_examples():
    assert sign_flip_p([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]) == 2 / 64  # all positive: 0.03125
    assert sign_flip_p([1, 2, 3, 4]) == 2 / 16
    assert sign_flip_p([1, 1, 1, -1]) == 10 / 16  # |sum| >= 2 unless two + and two -
    assert sign_flip_p([0.0, 0.0]) == 1.0
    assert sign_flip_p([-0.5]) == 1.0


def test_sign_flip_p_counts_float_ties(monkeypatch):
    # the sums of 0.7, 0.3, 0, -0.4, -0.4 under some sign vectors equal the observed 0.2 only
    # up to rounding; exact arithmetic counts them
    d = [0.7, 0.3, 0.0, -0.4, -0.4]
    assert sign_flip_p(d) == brute_sign_flip([7, 3, 0, -4, -4]) == 1.0
    assert sign_flip_p([0.1, 0.2, -0.3, 0.7]) == brute_sign_flip([1, 2, -3, 7]) == 10 / 16
    monkeypatch.setattr("starlora.study.stats.REL_TOL", 0.0)
    assert sign_flip_p(d) < 1.0  # without the tolerance, the ties are lost


@pytest.mark.parametrize("n", [5, 9, 17])  # 17 takes the chunked path (over 16 values)
def test_sign_flip_p_equals_enumeration(n):
    d = np.random.default_rng(n).integers(-9, 10, size=n).tolist()
    if n == 17:  # brute force in NumPy: 2^17 sign vectors
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        expected = np.mean(np.abs(signs @ np.array(d)) >= abs(sum(d)))
    else:
        expected = brute_sign_flip(d)
    assert sign_flip_p([x / 7 for x in d]) == pytest.approx(expected, abs=0)


def test_one_sided_sign_flip_and_tost_on_known_examples():
    assert sign_flip_p([1, 2, 3, 4], "greater") == 1 / 16  # only all-positive reaches 10
    assert sign_flip_p([1, 2, 3, 4], "less") == 1.0
    assert sign_flip_p([-1, -2, -3, -4], "less") == 1 / 16
    assert sign_flip_p([1, 1, 1, -1], "greater") == 5 / 16  # sum 4 once, sum 2 four times
    assert sign_flip_p([1, 1, 1, -1], "less") == 15 / 16  # every sum <= 2 but the sum of 4
    # equivalence within 1: both shifted tests see four equal values
    assert tost_p([0, 0, 0, 0], 1.0) == 1 / 16
    assert tost_p([0.5] * 4, 0.1) == 1.0  # all 0.5: outside ±0.1, never equivalent
    with pytest.raises(ValueError, match="alternative"):
        sign_flip_p([1.0], "both")


@pytest.mark.parametrize("n", [5, 17])  # 17 takes the chunked path (over 16 values)
def test_one_sided_sign_flip_equals_enumeration(n):
    d = np.random.default_rng(n).integers(-9, 10, size=n)
    signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    sums = signs @ d
    assert sign_flip_p(d / 7, "greater") == np.mean(sums >= d.sum())
    assert sign_flip_p(d / 7, "less") == np.mean(sums <= d.sum())


def test_holm_on_known_p_values():
    # sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> 0.02, 0.03, 0.06, max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([0.2]) == [0.2]


def test_aulc_weights_are_the_trapezoid():
    assert aulc_weights([50, 100, 200]) == pytest.approx([50 / 2 / 150, 150 / 2 / 150,
                                                          100 / 2 / 150])
    assert aulc_weights([200, 50, 100]) == pytest.approx([100 / 300, 50 / 300, 150 / 300])
    assert aulc([50, 100, 200], [0.4, 0.5, 0.7]) == pytest.approx(0.55)
    assert aulc([7, 7], [0.2, 0.4]) == pytest.approx(0.3)


def test_aulc_is_the_correctly_rounded_sum_so_tables_match_on_every_cpu():
    """A BLAS dot product rounds by its kernel: the committed summary tables' AULC differed in
    the last digit between an AVX-512 and an AVX2 machine. The exact sum does not."""
    import math

    rng = np.random.default_rng(0)
    n = [16, 32, 48, 64, 80, 96, 112]
    for _ in range(200):
        acc = (rng.integers(0, 301, size=7) / 300).tolist()
        assert aulc(n, acc) == math.fsum((aulc_weights(n) * np.asarray(acc)).tolist())


def test_bootstrap_is_deterministic_and_resamples_items():
    rng = np.random.default_rng(3)
    seed_level = np.array([0.05, 0.02, 0.04, 0.03, 0.06, 0.01])
    items = seed_level[:, None] + rng.normal(0, 0.3, size=(6, 40))
    items -= items.mean(axis=1, keepdims=True) - seed_level[:, None]  # row means = seed_level
    a = bootstrap_diff_ci(item_diffs=items, resamples=500, seed=0)
    assert a == bootstrap_diff_ci(item_diffs=items, resamples=500, seed=0)
    assert a != bootstrap_diff_ci(item_diffs=items, resamples=500, seed=1)
    flat = np.repeat(seed_level[:, None], 40, axis=1)  # the same seeds, no item spread
    b = bootstrap_diff_ci(item_diffs=flat, resamples=500, seed=0)
    assert a[0] < b[0] <= seed_level.mean() <= b[1] < a[1]
    assert bootstrap_diff_ci([0.2, 0.2, 0.2], resamples=100) == pytest.approx((0.2, 0.2))
    lo, hi = bootstrap_diff_ci(seed_level, resamples=2000, seed=0)
    assert 0.01 <= lo < seed_level.mean() < hi <= 0.06


def test_spearman_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2.5, 2.5, 4) and (1, 2, 3, 4): Pearson = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def brute_auroc(scores: list[float], positive: list[bool]) -> float:
    """Reference: every (positive, negative) pair, a tie counting 1/2."""
    pos = [x for x, p in zip(scores, positive) if p]
    neg = [x for x, p in zip(scores, positive) if not p]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def test_auroc_on_known_examples_with_ties_and_an_empty_class():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    # pairs (pos, neg): (1, 1) tie 1/2, (1, 2) 0, (3, 1) 1, (3, 2) 1 -> 2.5 / 4
    assert auroc([1, 1, 2, 3], [True, False, False, True]) == 0.625
    assert auroc([5, 5, 5], [True, False, False]) == 0.5  # all tied: chance
    assert np.isnan(auroc([1, 2, 3], [True, True, True]))  # no negative
    assert np.isnan(auroc([1, 2], [False, False]))  # no positive
    assert np.isnan(auroc([], []))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, size=40).tolist(), (rng.random(40) < 0.3).tolist()  # many ties
    assert auroc(x, y) == pytest.approx(brute_auroc(x, y), abs=1e-12)
    with pytest.raises(ValueError, match="finite"):
        auroc([1.0, float("nan")], [True, False])


# -- arms -------------------------------------------------------------------------------------

STUDY_ARMS = {  # label -> (strategy, overrides)
    "random": ("random", []),
    "pe [answers=gold]": ("pe", ["scoring.answers=gold"]),
    "pe-dynamic [answers=gold]": ("pe-dynamic", ["scoring.answers=gold"]),
    "pe": ("pe", []),
    "pe-dynamic": ("pe-dynamic", []),
    "me-dynamic": ("me-dynamic", []),
    "pe-dynamic [b_decay_mode=none, dropout=0.0, mc_passes=1]": (
        "pe-dynamic", ["training.b_decay_mode=none", "lora.dropout=0", "scoring.mc_passes=1"]),
}


def config_of(strategy: str, overrides: list[str], seed: int = 0):
    return load_config(None, ["task.name=arith", "task.pool_size=30", "task.test_size=10",
                              "active_learning.initial_size=4", "active_learning.query_size=4",
                              "active_learning.rounds=3", f"active_learning.strategy={strategy}",
                              f"seed={seed}", *overrides])


def test_arms_are_labelled_by_the_settings_that_differ():
    entries, expected = [], []
    for seed in (0, 1):
        for label, (strategy, overrides) in STUDY_ARMS.items():
            neutral = [f"scoring.batch_size={8 + seed}", f"active_learning.rounds={3 + seed}"]
            entries.append((strategy, flatten_config(config_of(strategy, overrides + neutral,
                                                               seed))))
            expected.append(label)
    assert label_arms(entries) == expected
    # without configs, or with configs that differ in the strategy only, the strategy is the arm
    assert label_arms([("random", None), ("pe", None)]) == ["random", "pe"]
    same = [(s, flatten_config(config_of(s, []))) for s in ("random", "pe-dynamic")]
    assert label_arms(same) == ["random", "pe-dynamic"]
    # a key shared by two differing settings is named in full
    two = [("pe", flatten_config(config_of("pe", ["scoring.max_new_tokens=7"]))),
           ("pe", flatten_config(config_of("pe", ["evaluation.max_new_tokens=9"])))]
    assert label_arms(two) == ["pe [scoring.max_new_tokens=7]",
                               "pe [evaluation.max_new_tokens=9]"]


# -- whole reports ----------------------------------------------------------------------------

N_LABELLED = [4, 8, 12]
TEST_IDS = [f"arith-test-{i:06d}" for i in range(10)]


def write_study_run(root: Path, label: str, seed: int, correct_per_round: list[list[int]],
                    selected: list[list[str]] | None = None, scores: list[dict] | None = None,
                    predictions: bool = True, uncertainty: list[dict] | None = None) -> Path:
    strategy, overrides = STUDY_ARMS[label]
    config = config_of(strategy, overrides, seed)
    run = root / f"{label.replace(' ', '_')}-{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(config))
    lines = []
    for k, correct in enumerate(correct_per_round):
        lines.append(json.dumps({
            "round": k, "n_labelled": N_LABELLED[k], "accuracy": float(np.mean(correct)),
            "ece": 0.2 - 0.01 * k - 0.001 * seed, "strategy": strategy, "seed": seed,
            "task": "arith", "protocol": protocol_id(config)}))
        rdir = run / "rounds" / str(k)
        rdir.mkdir(parents=True)
        if predictions:
            (rdir / "predictions.jsonl").write_text("".join(
                json.dumps({"id": i, "prediction": "1", "gold": "1", "correct": bool(c)}) + "\n"
                for i, c in zip(TEST_IDS, correct)))
        if scores is not None and k < 2:
            (rdir / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))
        if selected is not None and k < 2:
            (rdir / "selected.jsonl").write_text("".join(
                json.dumps({"id": i, "rank": j, "utility": 1.0 - j}) + "\n"
                for j, i in enumerate(selected[k])))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if uncertainty is not None:  # the last round's test_uncertainty.jsonl
        (run / "rounds" / str(len(correct_per_round) - 1) / "test_uncertainty.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in uncertainty))
    return run


POOL = [ex.id for ex in get_task("arith").generate("train", 30, 0)]
SCORES = [{"id": i, "pe": float(j), "pe_base": float(-j)} for j, i in enumerate(POOL[:10])]


def curve(seed: int, bonus: int) -> list[list[int]]:
    """Per round, 10 items' correctness: 3 + round + bonus right, shifted by the seed."""
    out = []
    for k in range(3):
        right = min(10, 3 + k + bonus)
        out.append([int((i + seed) % 10 < right) for i in range(10)])
    return out


@pytest.fixture
def study_runs(tmp_path: Path) -> list[Path]:
    return make_study_runs(tmp_path)


def make_study_runs(tmp_path: Path) -> list[Path]:
    """random and pe-dynamic, seeds 0-5; pe-dynamic [answers=gold], seeds 0-2."""
    runs = []
    for seed in range(6):
        runs.append(write_study_run(tmp_path / "runs", "random", seed, curve(seed, 0),
                                    selected=[POOL[:4], POOL[4:8]]))
        # pe-dynamic beats random on every seed; its picks: the top 4 by pe, then 2 of them
        runs.append(write_study_run(tmp_path / "runs", "pe-dynamic", seed, curve(seed, 1 + seed % 2),
                                    selected=[POOL[6:10], POOL[:2] + POOL[8:10]], scores=SCORES))
        if seed < 3:  # the gold arm has 3 seeds; it loses to random on one
            runs.append(write_study_run(tmp_path / "runs", "pe-dynamic [answers=gold]", seed,
                                        curve(seed, [1, -1, 2][seed])))
    return runs


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_study_tables_hold_the_paired_statistics(study_runs, tmp_path):
    written = build_report(study_runs, tmp_path / "report")
    md, rows = written["study.md"].read_text(), read_csv(written["study.csv"])
    assert "| pe-dynamic [answers=gold] | 3 | 0,1,2 |" in md  # not merged with pe-dynamic
    paired = {(r["arm"], r["quantity"]): r for r in rows if r["section"] == "paired"}
    assert {(r["baseline"]) for r in paired.values()} == {"random"}  # no pe/me arm here
    main, gold = paired[("pe-dynamic", "aulc")], paired[("pe-dynamic [answers=gold]", "aulc")]
    diffs = []
    for seed in range(6):
        a, b = (aulc(N_LABELLED, np.mean(curve(seed, x), axis=1)) for x in (1 + seed % 2, 0))
        diffs.append(a - b)
    assert float(main["estimate"]) == pytest.approx(np.mean(diffs), abs=1e-6)
    assert main["p"] == "0.031250"  # 6 positive differences: 2 / 64
    assert gold["n"] == "3" and gold["p"] == "0.750000"  # 2 of 3 positive: |mean| beaten by 6/8
    assert main["p_holm"] == "0.062500" and gold["p_holm"] == "0.750000"
    assert main["note"] == "primary; ci seeds x items"
    assert float(main["ci_low"]) <= float(main["estimate"]) <= float(main["ci_high"])
    assert paired[("pe-dynamic", "final_accuracy")]["note"].startswith("secondary")
    assert paired[("pe-dynamic", "final_ece")]["p_holm"] == ""
    arms = {(r["arm"], r["quantity"]): r for r in rows if r["section"] == "arms"}
    assert arms[("random", "aulc")]["n"] == "6" and float(arms[("random", "aulc")]["std"]) == 0
    diag = {(r["arm"], r["round"], r["quantity"]): r for r in rows if r["section"] == "diagnostics"}
    assert diag[("pe-dynamic", "0", "spearman(pe,pe_base)")]["estimate"] == "-1.000000"
    assert diag[("pe-dynamic", "0", "top-k overlap (pe)")]["estimate"] == "1.000000"
    assert diag[("pe-dynamic", "1", "top-k overlap (pe)")]["estimate"] == "0.500000"
    steps = {ex.id: ex.meta["steps"] for ex in get_task("arith").generate("train", 30, 0)}
    for s in (1, 2, 3):
        share = np.mean([steps[i] == s for i in POOL[:4]])
        assert float(diag[("random", "0", f"selected steps={s}")]["estimate"]) == share
    assert "| pe-dynamic | random | 6 |" in md and "0.03125 | 0.06250 |" in md


def test_per_protocol_files_name_each_line_by_its_arm_label(study_runs, tmp_path):
    """The gold-answer arm has a protocol of its own, so its curves and summary are in files of
    their own: they call it by its study label, not by its bare strategy."""
    written = build_report(study_runs, tmp_path / "report")
    summaries = {name: written[name].read_text() for name in written
                 if name.endswith("_summary.md")}
    assert len(summaries) == 2
    gold = [t for t in summaries.values() if "| pe-dynamic [answers=gold] | 3 |" in t]
    own = [t for t in summaries.values() if "| pe-dynamic | 6 |" in t and "| random | 6 |" in t]
    assert len(gold) == 1 and len(own) == 1 and "[answers=gold]" not in own[0]
    for name in written:
        if name.endswith("_summary.csv"):
            strategies = {r["strategy"] for r in read_csv(written[name])}
            assert strategies in ({"pe-dynamic [answers=gold]"}, {"random", "pe-dynamic"})


def test_study_files_are_byte_identical_on_a_second_report(study_runs, tmp_path):
    first = build_report(study_runs, tmp_path / "a")
    second = write_studies(load_runs(list(reversed(study_runs))), tmp_path / "b")
    for name in ("study.md", "study.csv"):
        assert first[name].read_bytes() == second[name].read_bytes()
        assert str(tmp_path) not in first[name].read_text()


def test_without_predictions_the_interval_resamples_seeds_only(study_runs, tmp_path):
    victim = next(r for r in study_runs if r.name == "random-2")
    shutil.rmtree(victim / "rounds" / "1")
    written = write_studies(load_runs(study_runs), tmp_path / "report")
    notes = {r["arm"]: r["note"] for r in read_csv(written["study.csv"])
             if r["section"] == "paired" and r["quantity"] == "aulc"}
    assert notes["pe-dynamic"] == "primary; ci seeds only (no predictions.jsonl)"
    assert "seeds only (no predictions.jsonl)" in written["study.md"].read_text()


def test_rounds_of_other_labelled_counts_are_said_not_averaged_silently(study_runs, tmp_path):
    """A budget is no design setting (it can be raised to extend a run), so a budget that cut
    one run's last query shares its group: the study and the summary say the counts differ
    (the summary's column said one count, the last strategy's)."""
    victim = next(r for r in study_runs if r.name == "pe-dynamic-1")
    lines = [json.loads(line) for line in (victim / "metrics.jsonl").read_text().splitlines()]
    lines[-1]["n_labelled"] = N_LABELLED[-1] - 2
    (victim / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    written = build_report(study_runs, tmp_path / "report")
    last = f"{N_LABELLED[-1] - 2}, {N_LABELLED[-1]}"
    assert f"round 2: the runs labelled {last} examples" in written["study.md"].read_text()
    summary = next(written[n].read_text() for n in written if n.endswith("_summary.md")
                   and "| random | 6 |" in written[n].read_text())
    mean = (6 * N_LABELLED[-1] - 2) / 6
    assert f"r2 (n={mean:g}-{N_LABELLED[-1]:g})" in summary
    clean = build_report(make_study_runs(tmp_path / "clean"), tmp_path / "r2")
    assert "the runs labelled" not in clean["study.md"].read_text()


def test_no_study_without_two_arms_sharing_two_seeds(study_runs, tmp_path):
    alone = [r for r in study_runs if r.name.endswith("-0")]  # every arm with seed 0 only
    assert write_studies(load_runs(alone), tmp_path / "r") == {}
    assert write_studies(load_runs(study_runs), tmp_path / "r")  # the same runs, all seeds


def test_choice_task_diagnostics_read_gold_classes_and_predictions(tmp_path):
    """obqa without its data files: gold classes come from labelled.jsonl, predicted class
    shares from predictions.jsonl."""
    runs = []
    for strategy in ("random", "pe-dynamic"):
        for seed in (0, 1):
            config = load_config(None, ["task.name=obqa", f"active_learning.strategy={strategy}",
                                        f"seed={seed}", "task.train=missing.jsonl"])
            run = tmp_path / f"{strategy}-{seed}"
            (run / "rounds" / "0").mkdir(parents=True)
            (run / "config.yaml").write_text(dump_config(config))
            (run / "metrics.jsonl").write_text(json.dumps({
                "round": 0, "n_labelled": 4, "accuracy": 0.25, "ece": 0.1, "strategy": strategy,
                "seed": seed, "task": "obqa", "protocol": protocol_id(config)}) + "\n")
            preds = ["A", "C", "C", "D"] if seed == 0 else ["B", "C", "D", "D"]
            (run / "rounds" / "0" / "predictions.jsonl").write_text("".join(
                json.dumps({"id": f"t{i}", "prediction": p, "gold": "A", "correct": i == 0})
                + "\n" for i, p in enumerate(preds)))
            (run / "rounds" / "0" / "selected.jsonl").write_text("".join(
                json.dumps({"id": f"q{i}", "rank": i, "utility": 0.0}) + "\n" for i in range(4)))
            (run / "labelled.jsonl").write_text("".join(
                json.dumps({"id": f"q{i}", "round": 1, "answer": a, "source": "oracle"}) + "\n"
                for i, a in enumerate(["A", "A", "B", "C"])))
            runs.append(run)
    written = write_studies(load_runs(runs), tmp_path / "report")
    diag = {(r["arm"], r["quantity"]): r for r in read_csv(written["study.csv"])
            if r["section"] == "diagnostics"}
    assert diag[("random", "selected gold=A")]["estimate"] == "0.500000"
    assert diag[("pe-dynamic", "selected gold=D")]["estimate"] == "0.000000"
    assert diag[("random", "predicted=C")]["estimate"] == "0.375000"  # 2/4 and 1/4
    assert diag[("random", "predicted=D")]["std"] == f"{np.std([0.25, 0.5], ddof=1):.6f}"
    assert "gold classes from labelled.jsonl" in written["study.md"].read_text()


def test_a_variant_is_compared_with_its_usual_arm_outside_the_primary_family(study_runs,
                                                                              tmp_path):
    """The constraint ablation (same strategy, other training/scoring settings) is compared
    with the usual pe-dynamic arm, as a secondary result: it neither joins the Holm family nor
    serves as anyone's baseline."""
    ablation = "pe-dynamic [b_decay_mode=none, dropout=0.0, mc_passes=1]"
    runs = [*study_runs, *(write_study_run(tmp_path / "runs", ablation, seed, curve(seed, 0))
                           for seed in range(6))]
    rows = read_csv(write_studies(load_runs(runs), tmp_path / "report")["study.csv"])
    paired = {(r["arm"], r["baseline"], r["quantity"]): r for r in rows
              if r["section"] == "paired"}
    assert {(a, b) for a, b, _ in paired} == {
        ("pe-dynamic", "random"), ("pe-dynamic [answers=gold]", "random"),
        (ablation, "pe-dynamic")}
    versus = paired[(ablation, "pe-dynamic", "aulc")]
    assert versus["note"].startswith("secondary") and versus["p_holm"] == ""
    assert versus["p"] == "0.031250"  # the ablation loses on all 6 seeds
    # the Holm family is unchanged by the variant: 2 comparisons
    assert paired[("pe-dynamic", "random", "aulc")]["p_holm"] == "0.062500"


def uncertainty_rows(correct: list[int], seed: int, unscored: str | None = None) -> list[dict]:
    """test_uncertainty.jsonl of a run whose last round got `correct`: pe_gold_1 separates
    wrong from right perfectly, pe_gold_mc is reversed, the ME columns are constant, the own
    columns are a seed-shifted pattern with ties; `unscored` is null everywhere."""
    rows = []
    for j, (i, c) in enumerate(zip(TEST_IDS, correct)):
        row = {"id": i, "correct": bool(c)}
        for col in COLUMNS:
            measure, answers, _ = col.split("_")
            if measure == "me":
                row[col] = 1.0
            elif answers == "own":
                row[col] = float((3 * j + seed) % 7)
            else:
                row[col] = float(c) if col == "pe_gold_mc" else 1.0 - c + 0.01 * j
        if unscored:
            row[unscored] = None
        rows.append(row)
    return rows


def test_auroc_section_from_the_runs_that_have_test_uncertainty(tmp_path):
    """pe-dynamic: all 6 seeds have the file; random: seeds 0-3, seed 3 without own_1 values;
    the gold arm: none (5 of 15 runs missing)."""
    runs = []
    for seed in range(6):
        c_rand, c_dyn = curve(seed, 0), curve(seed, 1 + seed % 2)
        runs.append(write_study_run(
            tmp_path / "runs", "random", seed, c_rand,
            uncertainty=uncertainty_rows(c_rand[-1], seed, "pe_own_1" if seed == 3 else None)
            if seed < 4 else None))
        runs.append(write_study_run(tmp_path / "runs", "pe-dynamic", seed, c_dyn,
                                    uncertainty=uncertainty_rows(c_dyn[-1], seed)))
        if seed < 3:
            runs.append(write_study_run(tmp_path / "runs", "pe-dynamic [answers=gold]", seed,
                                        curve(seed, 1)))
    written = write_studies(load_runs(runs), tmp_path / "report")
    md, rows = written["study.md"].read_text(), read_csv(written["study.csv"])
    got = {(r["arm"], r["quantity"]): r for r in rows if r["section"] == "auroc"}
    assert {a for a, _ in got} == {"random", "pe-dynamic"}  # no row for an arm without files
    assert {q for _, q in got} == set(COLUMNS)
    dyn = got[("pe-dynamic", "pe_gold_1")]
    assert (dyn["n"], dyn["estimate"], dyn["std"], dyn["round"]) == ("6", "1.000000",
                                                                      "0.000000", "2")
    assert got[("pe-dynamic", "pe_gold_mc")]["estimate"] == "0.000000"
    assert got[("random", "me_own_mc")]["estimate"] == "0.500000"  # constant: all ties
    own = [brute_auroc([float((3 * j + s) % 7) for j in range(10)],
                       [not c for c in curve(s, 1 + s % 2)[-1]]) for s in range(6)]
    assert float(got[("pe-dynamic", "pe_own_mc")]["estimate"]) == pytest.approx(
        np.mean(own), abs=1e-6)
    assert float(got[("pe-dynamic", "pe_own_mc")]["std"]) == pytest.approx(
        np.std(own, ddof=1), abs=1e-6)
    assert got[("random", "pe_own_1")]["n"] == "3"  # seed 3 has no values there
    assert got[("random", "pe_own_mc")]["n"] == "4"
    assert got[("random", "pe_gold_1")]["note"] == "2 of 6 runs without the file"
    assert got[("pe-dynamic", "pe_gold_1")]["note"] == ""
    assert "## Uncertainty as a predictor of a wrong test answer (secondary)" in md
    assert "| pe-dynamic | PE | 6 | 1.0000 ± 0.0000 | 0.0000 ± 0.0000 |" in md
    assert "(n=3)" in md
    assert "Left out (no `rounds/2/test_uncertainty.jsonl`; " in md and ": 5 of 15 runs." in md
    again = write_studies(load_runs(list(reversed(runs))), tmp_path / "again")
    assert again["study.md"].read_bytes() == written["study.md"].read_bytes()
    assert again["study.csv"].read_bytes() == written["study.csv"].read_bytes()


def test_auroc_section_says_when_no_run_has_the_file(study_runs, tmp_path):
    written = write_studies(load_runs(study_runs), tmp_path / "report")
    assert "No run has `rounds/2/test_uncertainty.jsonl` yet" in written["study.md"].read_text()
    assert not [r for r in read_csv(written["study.csv"]) if r["section"] == "auroc"]


RESULTS = Path(__file__).resolve().parents[1] / "results"
STUDY = RESULTS / "arith-study"
#: each committed study report: its runs, its folder, its declared comparisons (the commands
#: in results/README.md and results/study-2/README.md)
REPORTS = {
    "arith-study": (sorted(STUDY.glob("runs/*/seed*[0-9]")), STUDY / "report", None),
    **{f"study-2 {s}": ([RESULTS / "study-2" / "runs" / s], RESULTS / "study-2" / "report" / s,
                        RESULTS / "study-2" / "comparisons.yaml") for s in ("smollm2", "calendar")},
}


@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(REPORTS))
def test_the_committed_study_report_regenerates_byte_for_byte(tmp_path, study):
    """Issue 19's promise: `starlora report` on the committed runs writes the committed tables
    again, exactly (the PNGs are drawings of them and not compared)."""
    runs, committed, comparisons = REPORTS[study]
    if not (committed / "study.md").is_file():
        pytest.skip("the study's report is committed once all its runs are in")
    written = build_report(runs, tmp_path, comparisons)
    tables = sorted(p.name for p in committed.iterdir() if p.suffix in (".md", ".csv"))
    assert tables and tables == sorted(n for n in written if Path(n).suffix in (".md", ".csv"))
    for name in tables:
        assert written[name].read_bytes() == (committed / name).read_bytes(), name


def test_confidence_signals_become_secondary_endpoints_and_ece_gets_its_footnote(
        study_runs, tmp_path):
    """Runs that recorded confidence signals (issue 34) add final AURC and self-consistency
    AUROC to the arms table and the secondary comparisons; the ECE column keeps a footnote."""
    plain = write_studies(load_runs(study_runs), tmp_path / "plain")["study.md"].read_text()
    assert "| final ECE¹ |" in plain and "it measures the error rate, not calibration" in plain
    assert "final AURC" not in plain and "final_aurc" not in plain
    for run in study_runs:
        path = run / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        seed, better = rows[0]["seed"], "dynamic" in rows[0]["strategy"]
        rows[-1]["signals"] = {  # pe-dynamic ranks its answers better by 0.05 on every seed
            "msp": {"rcc-auc": 0.3 - 0.05 * better - 0.01 * seed, "roc-auc": 0.8},
            "consistency": {"roc-auc": 0.7 + 0.1 * better, "rcc-auc": 0.2}}
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = write_studies(load_runs(study_runs), tmp_path / "signals")
    md = written["study.md"].read_text()
    assert "| final AURC | self-consistency AUROC |" in md
    assert "| random | 6 | 0,1,2,3,4,5 |" in md and "0.2750 ± 0.0187 | 0.7000 ± 0.0000 |" in md
    paired = {(r["arm"], r["baseline"], r["quantity"]): r for r in read_csv(written["study.csv"])
              if r["section"] == "paired"}
    aurc = paired[("pe-dynamic", "random", "final_aurc")]
    assert float(aurc["estimate"]) == pytest.approx(-0.05) and aurc["p"] == "0.031250"
    assert "secondary; ci seeds only" == aurc["note"]
    assert float(paired[("pe-dynamic", "random", "final_sc_auroc")]["estimate"]) == \
        pytest.approx(0.1)


def test_a_run_resumed_on_another_machine_is_named_in_the_notes(study_runs, tmp_path):
    from starlora.run.identity import check_machine
    from starlora.run.store import RunStore

    store = RunStore.open(study_runs[0])
    first = {"device": "cpu", "name": "AMD EPYC 9R14", "flags": ["avx512_bf16"]}
    here = {"device": "cpu", "name": "Intel Xeon", "flags": ["amx_bf16", "avx512_bf16"]}
    assert check_machine(store, first, {"round": 0, "phase": "train"}) is None  # recorded
    assert check_machine(store, here, {"round": 2, "phase": "evaluate"}).startswith("warning")
    md = write_studies(load_runs(study_runs), tmp_path / "out")["study.md"].read_text()
    label = study_runs[0].name.rsplit("-", 1)[0].replace("_", " ")
    seed = int(study_runs[0].name.rsplit("-", 1)[1])
    assert (f"{label}: seed {seed} resumed on another machine at round 2 (after evaluate) on "
            "Intel Xeon (identity.json)") in md
    assert md.count("resumed on another machine") == 1  # the other runs ran on one machine
    other = {"device": "cpu", "name": "AMD EPYC 7B13", "flags": ["avx2"]}
    check_machine(store, other, {"round": 3, "phase": None})  # none of round 3 done yet
    md = write_studies(load_runs(study_runs), tmp_path / "again")["study.md"].read_text()
    assert "round 3 (before its first phase) on AMD EPYC 7B13" in md  # it said "(after None)"


def test_a_study_without_a_primary_pair_says_why_and_where_to_declare_one(tmp_path):
    """Only a variant STAR arm shares seeds with `random`: no primary pair, and the study says
    that variants are compared with their usual arm only, and how to declare pairs (it said
    "No STAR arm and baseline share 2 seeds" while one visibly did)."""
    ablation = "pe-dynamic [b_decay_mode=none, dropout=0.0, mc_passes=1]"
    runs = [write_study_run(tmp_path / "runs", label, seed, curve(seed, bonus))
            for label, seeds, bonus in (("random", range(4), 0), (ablation, range(4), 1),
                                         ("pe-dynamic", [9], 1)) for seed in seeds]
    runs += [write_study_run(tmp_path / "runs", "random", seed, curve(0, 0))
             for seed in (10, 11)]  # the usual settings are the most common ones
    text = write_studies(load_runs(runs), tmp_path / "report")["study.md"].read_text()
    assert ("No STAR arm and baseline share 2 seeds (a STAR arm whose settings differ from the "
            "study's usual ones is a variant, compared only with its usual arm; `starlora "
            "report --comparisons FILE` compares the pairs a file declares: docs/study.md).") in text


def test_the_notes_say_when_pairs_leave_seeds_out_or_rounds_are_cut(study_runs, tmp_path):
    """A pair over fewer seeds than its arms have runs, and a run with rounds the others
    lack, are named in the notes: the tables read only the shared seeds and rounds."""
    md = write_studies(load_runs(study_runs), tmp_path / "a")["study.md"].read_text()
    assert ("pe-dynamic [answers=gold] vs random: paired on the 3 seeds both have "
            "(pe-dynamic [answers=gold] has 3, random 6)") in md
    assert "pe-dynamic vs random: paired" not in md and "left out here" not in md
    metrics = study_runs[0] / "metrics.jsonl"  # random seed 0 goes on one round further
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text(metrics.read_text() + json.dumps(
        {**rows[-1], "round": len(rows), "n_labelled": rows[-1]["n_labelled"] + 10}) + "\n")
    md = write_studies(load_runs(study_runs), tmp_path / "b")["study.md"].read_text()
    assert f"1 run(s) have rounds after round {len(rows) - 1}, left out here" in md
