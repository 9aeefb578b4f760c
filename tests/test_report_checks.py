"""`starlora report` on awkward input: bad input raises before anything is written, seed
counts that vary by round are shown, runs computed differently are not one study, and a
missing value is left out alike in study.md and study.csv."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_study import curve, make_study_runs, read_csv, write_study_run

from starlora.errors import DataError
from starlora.report import _curve_plot, aggregate, build_report, load_runs
from starlora.run.store import RunPaths


@pytest.fixture
def study_runs(tmp_path: Path) -> list[Path]:
    return make_study_runs(tmp_path)


def edit_metrics(run: Path, change) -> None:
    """Rewrite `run`'s metrics.jsonl as `change` (a list of round records -> a list) says."""
    path = RunPaths(run).metrics
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in change(recs)))


def test_an_arm_with_a_seed_twice_raises_before_anything_is_written(study_runs, tmp_path):
    """A copy of a run whose rounds carry another protocol id (say, a precision suffix) is the
    same arm and seed twice: an error, and no report folder (the summaries and plots were
    written before the study found it)."""
    copy = tmp_path / "copy"
    shutil.copytree(study_runs[0], copy)
    edit_metrics(copy, lambda recs: [{**r, "protocol": r["protocol"] + "-bf16_bf16_bf16"}
                                     for r in recs])
    out = tmp_path / "report"
    with pytest.raises(DataError, match="has seed 0 twice"):
        build_report([*study_runs, copy], out)
    assert not out.exists()


def test_seed_counts_that_vary_by_round_are_shown_and_noted(study_runs, tmp_path):
    """Random's seed 0 lacks round 2 (a run still going): its last round averages 5 seeds,
    which the summary says ("5-6" seeds, "(n=5)" at round 2 and the final accuracy), as do
    the CSV and the plot's legend; the caller's notes are written into summary.md and study.md;
    a run lacking an inner round makes study.md list the rounds it used."""
    edit_metrics(study_runs[0], lambda recs: recs[:2])
    note = "1 run(s) not finished, drawn up to their last evaluated round: x (round 2, phase train)"
    written = build_report(study_runs, tmp_path / "report", notes=[note])
    name = next(n for n in written if n.endswith("summary.md")
                and "| random |" in written[n].read_text())
    md = written[name].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| random |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "5-6" and cells[2].endswith("± 0.000") and "(n=" not in cells[2]
    assert cells[4].endswith("(n=5)") and cells[5].endswith("(n=5)")  # round 2 and final
    assert "Note: the seed count varies by round" in md and f"Note: {note}" in md
    csv_row = next(r for r in read_csv(written[name.replace(".md", ".csv")])
                   if r["strategy"] == "random")
    assert (csv_row["seeds"], csv_row["r1_seeds"], csv_row["r2_seeds"]) == ("6", "6", "5")
    study = written["study.md"].read_text()
    assert f"Note: {note}" in study and study.startswith("# Study: arith")
    groups = aggregate(load_runs(study_runs))
    fig = _curve_plot("arith", "p", next(g for g in groups.values() if "random" in g),
                      "accuracy", "accuracy")
    assert "random (5-6 seeds)" in fig.axes[0].get_legend_handles_labels()[1]
    # an inner round missing: the study's rounds are 0 and 2, and its header says so
    edit_metrics(study_runs[1], lambda recs: [recs[0], recs[2]])
    study = build_report(study_runs[1:], tmp_path / "gap")["study.md"].read_text()
    assert ("Rounds 0, 2 (the rounds every run has; round(s) 1 missing from some run; "
            "labelled 4 to 12)") in study


def precision(dtype: str) -> dict[str, str]:
    return {"model.dtype": dtype, "scoring.dtype": dtype,
            "training.mixed_precision": "bf16" if dtype == "bfloat16" else "no"}


def test_runs_in_another_precision_or_on_other_data_are_another_study(study_runs, tmp_path,
                                                                        capsys):
    """Configs say ``dtype: auto``; identity.json says seeds 3-5 ran in bf16: two studies,
    each named by its precision, and stderr says why. Runs that agree keep the plain design id
    (the committed reports' names); other test data splits alike."""
    plain = build_report(study_runs, tmp_path / "plain")["study.md"].read_text()
    design = plain.splitlines()[0].removeprefix("# Study: arith (design ").removesuffix(")")
    for run in study_runs:
        seed = json.loads(RunPaths(run).metrics.read_text().splitlines()[0])["seed"]
        data = {"pool": {"source": "g", "sha1": "a" * 40}, "test": {"source": "g", "sha1": "b" * 40}}
        RunPaths(run).identity.write_text(json.dumps(
            {"precision": precision("bfloat16" if seed >= 3 else "float32"), "data": data}))
    agree = [r for r in study_runs
             if json.loads(RunPaths(r).metrics.read_text().splitlines()[0])["seed"] < 3]
    same = build_report(agree, tmp_path / "same")["study.md"].read_text()
    assert same.startswith(f"# Study: arith (design {design})\n")  # all agree: not renamed
    assert "split" not in capsys.readouterr().err
    written = build_report(study_runs, tmp_path / "split")
    studies = sorted(n for n in written if n.endswith("study.md"))
    assert studies == [f"arith-{design}-precision-bf16-bf16-bf16_study.md",
                       f"arith-{design}-precision-fp32-fp32-fp32_study.md"]
    fp32 = written[studies[1]].read_text()
    assert fp32.startswith(f"# Study: arith (design {design} [precision=fp32_fp32_fp32])")
    assert "| random | 3 | 0,1,2 |" in fp32 and "| pe-dynamic | 3 | 0,1,2 |" in fp32
    err = capsys.readouterr().err
    assert (f"note: study arith (design {design}) split: its runs differ in precision "
            "(identity.json), which config.yaml does not fix; "
            f"{design} [precision=bf16_bf16_bf16]: 6 run(s); "
            f"{design} [precision=fp32_fp32_fp32]: 9 run(s)") in err
    # one run evaluated on other test data: a study of its own, named by the test data's hash
    ident = json.loads(RunPaths(study_runs[0]).identity.read_text())
    ident["data"]["test"]["sha1"] = "c" * 40
    RunPaths(study_runs[0]).identity.write_text(json.dumps(ident))
    data = build_report(agree, tmp_path / "data")
    assert [n for n in data if n.endswith("study.md")] == ["study.md"]  # one run: no study
    assert data["study.md"].read_text().startswith(
        f"# Study: arith (design {design} [test=bbbbbbbb])")
    assert "| random | 2 | 1,2 |" in data["study.md"].read_text()
    assert "differ in test (identity.json)" in capsys.readouterr().err


def test_a_missing_value_is_left_out_alike_in_study_md_and_csv(study_runs, tmp_path):
    """One seed's final ECE is null: study.md gave "nan ± nan" where study.csv averaged the
    other seeds; both now give the mean over the 5 seeds that have it, with n."""
    edit_metrics(study_runs[1], lambda recs: [*recs[:-1], {**recs[-1], "ece": None}])
    written = build_report(study_runs, tmp_path / "report")
    row = next(r for r in read_csv(written["study.csv"])
               if (r["section"], r["arm"], r["quantity"]) == ("arms", "pe-dynamic", "final_ece"))
    assert row["n"] == "5"
    md = written["study.md"].read_text()
    cell = f"{float(row['estimate']):.4f} ± {float(row['std']):.4f} (n=5)"
    assert "| pe-dynamic | 6 | 0,1,2,3,4,5 | " in md and cell in md and "nan ± nan" not in md


def test_min_p_and_holm_floor_say_when_a_comparison_cannot_reach_significance(tmp_path):
    """3 seeds: the exact test's smallest p is 2/8; Holm over 2 comparisons makes it 0.5 at
    best: the table gives both and says the comparisons cannot reach significance. With 6
    seeds (2/64, Holm 1/16 at best) it says so too; it never says it of a family that can."""
    runs = [write_study_run(tmp_path / "runs", label, seed, curve(seed, bonus))
            for label, bonus in (("random", 0), ("pe-dynamic", 1), ("pe", 0))
            for seed in range(3)]
    md = build_report(runs, tmp_path / "r")["study.md"].read_text()
    assert "| min p | min Holm p |" in md and "| 0.25000 | 0.50000 |" in md
    assert ("Cannot reach significance with so few seeds (even at its smallest p, the Holm p "
            "is not below 0.05): pe-dynamic vs random (3 seeds); pe-dynamic vs pe (3 seeds).") in md
    assert "95% percentile bootstrap over seeds holds the true mean difference about half" in md
    more = [write_study_run(tmp_path / "more", label, seed, curve(seed, bonus))
            for label, bonus in (("random", 0), ("pe-dynamic", 1)) for seed in range(6)]
    md = build_report(more, tmp_path / "m")["study.md"].read_text()
    assert "| 0.03125 | 0.03125 |" in md and "Cannot reach" not in md
