"""`starlora.report` on synthetic run directories: aggregation, AULC, grouping, files."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import matplotlib.image
import pytest

from starlora.errors import DataError
from starlora.report import aggregate, aulc, build_report, load_runs, pooled_bins

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N = [50, 100, 200]
ACC = {  # (strategy, seed) -> accuracy per round
    ("random", 0): [0.40, 0.50, 0.60],
    ("random", 1): [0.44, 0.52, 0.66],
    ("pe-dynamic", 0): [0.40, 0.55, 0.70],
    ("pe-dynamic", 1): [0.42, 0.61, 0.74],
    ("pe-dynamic", 2): [0.38, 0.58, 0.75],
}


def write_run(
    root: Path,
    strategy: str,
    seed: int,
    acc: list[float],
    task: str = "obqa",
    protocol: str = "p1",
    bins: list[dict] | None = None,
) -> Path:
    run = root / f"{task}-{protocol}-{strategy}-{seed}"
    run.mkdir(parents=True)
    lines = []
    for k, (n, a) in enumerate(zip(N, acc)):
        rec = {
            "round": k,
            "n_labelled": n,
            "accuracy": a,
            "ece": 0.1 + 0.01 * k + 0.001 * seed,
            "strategy": strategy,
            "seed": seed,
            "seconds": 1.0,
            "task": task,
            "protocol": protocol,
        }
        lines.append(json.dumps(rec))
        (run / "rounds" / str(k)).mkdir(parents=True)
        metrics = {
            "accuracy": a,
            "ece": rec["ece"],
            "n": 10,
            "mode": "choice",
            "bins": bins
            or [
                {"lower": 0.0, "upper": 0.5, "count": 4, "confidence": 0.3, "accuracy": 0.25},
                {
                    "lower": 0.5,
                    "upper": 1.0,
                    "count": 6,
                    "confidence": 0.8,
                    "accuracy": 0.5 + seed / 10,
                },
            ],
        }
        (run / "rounds" / str(k) / "metrics.json").write_text(json.dumps(metrics))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [write_run(tmp_path / "runs", s, seed, acc) for (s, seed), acc in ACC.items()]


def test_aggregate_equals_hand_computation(runs):
    groups = aggregate(load_runs(runs))
    assert list(groups) == [("obqa", "p1")]
    strategies = groups[("obqa", "p1")]
    assert sorted(strategies) == ["pe-dynamic", "random"]
    for strategy, seeds in (("random", [0, 1]), ("pe-dynamic", [0, 1, 2])):
        stats = strategies[strategy]
        assert [s.round for s in stats] == [0, 1, 2] and [s.n_labelled for s in stats] == N
        for k, s in enumerate(stats):
            values = [ACC[(strategy, seed)][k] for seed in seeds]
            assert s.n == len(seeds)
            assert s.accuracy_mean == pytest.approx(statistics.mean(values))
            assert s.accuracy_std == pytest.approx(statistics.stdev(values))
            eces = [0.1 + 0.01 * k + 0.001 * seed for seed in seeds]
            assert s.ece_mean == pytest.approx(statistics.mean(eces))


def test_aulc_equals_hand_computation():
    # trapezoids: 50 * (0.4 + 0.5) / 2 + 100 * (0.5 + 0.7) / 2 = 82.5, over a range of 150
    assert aulc([50, 100, 200], [0.4, 0.5, 0.7]) == pytest.approx(0.55)
    assert aulc([200, 50, 100], [0.7, 0.4, 0.5]) == pytest.approx(0.55)  # order-free
    assert aulc([50], [0.3]) == pytest.approx(0.3)
    assert aulc([10, 20], [1.0, 1.0]) == pytest.approx(1.0)


def test_resumed_run_keeps_the_last_line_of_a_round(tmp_path):
    run = write_run(tmp_path, "random", 0, [0.4, 0.5, 0.6])
    with (run / "metrics.jsonl").open("a") as f:  # round 2 logged again after a resume
        f.write(
            json.dumps(
                {
                    "round": 2,
                    "n_labelled": 200,
                    "accuracy": 0.9,
                    "ece": 0.2,
                    "strategy": "random",
                    "seed": 0,
                    "task": "obqa",
                    "protocol": "p1",
                }
            )
        )
    stats = aggregate(load_runs([run]))[("obqa", "p1")]["random"]
    assert [s.accuracy_mean for s in stats] == [0.4, 0.5, 0.9]


def test_tasks_and_protocols_are_never_mixed(tmp_path):
    dirs = [
        write_run(tmp_path, "random", 0, [0.1, 0.2, 0.3], task="obqa", protocol="p1"),
        write_run(tmp_path, "random", 0, [0.5, 0.6, 0.7], task="obqa", protocol="p2"),
        write_run(tmp_path, "random", 0, [0.8, 0.8, 0.9], task="boolq", protocol="p1"),
    ]
    groups = aggregate(load_runs(dirs))
    assert sorted(groups) == [("boolq", "p1"), ("obqa", "p1"), ("obqa", "p2")]
    finals = {g: s["random"][-1] for g, s in groups.items()}
    assert {g: (f.accuracy_mean, f.n) for g, f in finals.items()} == {
        ("boolq", "p1"): (0.9, 1),
        ("obqa", "p1"): (0.3, 1),
        ("obqa", "p2"): (0.7, 1),
    }
    written = build_report(dirs, tmp_path / "report")
    assert "obqa-p2_summary.md" in written and "boolq-p1_accuracy.png" in written
    assert len(written) == 3 * 5
    assert "0.700 ± 0.000" in written["obqa-p2_summary.md"].read_text()
    assert "0.700" not in written["obqa-p1_summary.md"].read_text()


def test_reliability_bins_are_pooled_over_seeds(runs):
    pooled = pooled_bins([r for r in runs if "random" in r.name], 2)
    assert [b["count"] for b in pooled] == [8, 12]
    assert pooled[0]["confidence"] == pytest.approx(0.3)
    # seeds 0 and 1 have accuracy 0.5 and 0.6 with 6 items each
    assert pooled[1]["accuracy"] == pytest.approx((6 * 0.5 + 6 * 0.6) / 12)


def test_build_report_writes_valid_pngs_and_tables(runs, tmp_path):
    written = build_report(runs, tmp_path / "report")
    assert sorted(written) == [
        "accuracy.png",
        "ece.png",
        "reliability.png",
        "study.csv",  # random and pe-dynamic share seeds 0 and 1
        "study.md",
        "summary.csv",
        "summary.md",
    ]
    for name in ("accuracy.png", "ece.png", "reliability.png"):
        path = written[name]
        assert path.parent == tmp_path / "report" and path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image.std() > 0.01  # something is drawn
    md = written["summary.md"].read_text()
    pe = [ACC[("pe-dynamic", s)] for s in range(3)]
    final = [a[-1] for a in pe]
    curve = [statistics.mean(a[k] for a in pe) for k in range(3)]
    row = next(line for line in md.splitlines() if line.startswith("| pe-dynamic"))
    assert f"{statistics.mean(final):.3f} ± {statistics.stdev(final):.3f}" in row
    assert f"{aulc(N, curve):.3f}" in row
    assert f"{curve[1]:.3f} ± " in row and "r1 (n=100)" in md
    assert md.index("| random") < md.index("| pe-dynamic")
    with written["summary.csv"].open() as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    assert float(rows["random"]["final_accuracy"]) == pytest.approx(0.63)
    assert float(rows["pe-dynamic"]["aulc"]) == pytest.approx(aulc(N, curve))
    assert rows["random"]["seeds"] == "2" and rows["pe-dynamic"]["r2_n_labelled"] == "200"


def test_missing_or_malformed_metrics_raise_data_error(tmp_path, runs):
    with pytest.raises(DataError, match="metrics.jsonl: no such file"):
        load_runs([tmp_path / "nowhere"])
    bad = write_run(tmp_path, "random", 5, [0.1, 0.2, 0.3])
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text(lines[0] + "\n{oops\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not valid JSON"):
        build_report([bad], tmp_path / "out")
    (bad / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1].replace('"accuracy"', '"acc"'))
    with pytest.raises(DataError, match=r"metrics.jsonl:2: accuracy: missing"):
        load_runs([bad])
    twin = write_run(tmp_path / "again", "random", 0, [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="same task/protocol/strategy/seed"):
        load_runs([runs[0], twin])


def test_a_folder_stands_for_the_runs_below_it(tmp_path):
    """``starlora report runs/<setting>``: every run directory under the folder, nested
    (``<arm>/seed<s>``) or not, each once, and the same records as naming them one by one."""
    runs = [write_run(tmp_path / "runs" / arm, arm, s, [0.1 * s, 0.2, 0.3])
            for arm in ("random", "pe") for s in (1, 2)]
    (tmp_path / "runs" / "report").mkdir()  # a folder of outputs, not a run: passed over
    by_folder = load_runs([tmp_path / "runs"])
    assert {Path(r["run_dir"]) for r in by_folder} == {r.resolve() for r in runs}
    assert by_folder == load_runs(sorted(runs))
    # a run named again beside its folder is read once, not refused as a twin
    assert len(load_runs([runs[0], tmp_path / "runs"])) == len(by_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty/metrics.jsonl: no such file"):
        load_runs([tmp_path / "empty"])


def test_empty_bins_as_evaluation_writes_them(tmp_path):
    """Bins straight from `expected_calibration_error`: empty ones carry None."""
    import numpy as np

    from starlora.evaluation import expected_calibration_error

    _, bins = expected_calibration_error(np.array([0.95, 0.9, 0.35]), np.array([1, 0, 1]), 15)
    assert any(b["confidence"] is None for b in bins)
    runs = [write_run(tmp_path, "random", seed, [0.4, 0.5, 0.6], bins=bins) for seed in (0, 1)]
    pooled = pooled_bins(runs, 2)
    assert [b["count"] for b in pooled if b["count"]] == [2, 2, 2]
    assert pooled[-1]["confidence"] == pytest.approx(0.95)
    assert "reliability.png" in build_report(runs, tmp_path / "report")


def test_report_writes_to_report_here_without_out(runs, tmp_path, monkeypatch, capsys):
    from starlora.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["report", *map(str, runs)]) == 0
    assert (tmp_path / "report" / "summary.md").is_file()
    assert f"summary.md: {Path('report') / 'summary.md'}" in capsys.readouterr().out


def test_report_names_runs_still_going_and_can_leave_them_out(runs, tmp_path, capsys):
    """A run still going is drawn up to its last evaluated round, and stderr names it (a study
    then compares the rounds every run has); --finished-only leaves it out. A run directory
    with no evaluated round yet, below a folder, is named as left out (it was left out
    without a word)."""
    from starlora.cli import main
    from starlora.config import ExperimentConfig, dump_config
    from starlora.io import write_json
    from starlora.run.store import RunPaths

    folder = runs[0].parent
    going, started = write_run(folder, "random", 2, [0.42, 0.5]), folder / "started"
    started.mkdir()
    for run, state in ((going, {"round": 2, "phase": "train"}), (started, None)):
        RunPaths(run).config.write_text(dump_config(ExperimentConfig()))
        if state:
            write_json(RunPaths(run).state, state)

    def random_seeds(out: Path) -> list[str]:
        rows = csv.DictReader((out / "summary.csv").open())
        return [r["seeds"] for r in rows if r["strategy"] == "random"]

    assert main(["report", str(folder), "--out", str(tmp_path / "all")]) == 0
    err = capsys.readouterr().err
    assert "note: 1 run(s) not finished, drawn up to their last evaluated round" in err
    assert f"{going.resolve()} (round 2, phase train)" in err
    assert f"note: 1 run(s) with no evaluated round yet, left out: {started.resolve()}" in err
    assert random_seeds(tmp_path / "all") == ["3"]
    assert main(["report", str(folder), "--out", str(tmp_path / "done"), "--finished-only"]) == 0
    assert "not finished, left out (--finished-only)" in capsys.readouterr().err
    assert random_seeds(tmp_path / "done") == ["2"]


def test_report_out_on_a_file_is_an_error_naming_it(runs, tmp_path, capsys):
    """`--out` naming a file (or a folder below one) ends with one line naming it, exit 2 (it
    was a FileExistsError traceback), and the file is as it was."""
    from starlora.cli import main

    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile", tmp_path / "afile" / "report"):
        assert main(["report", *map(str, runs), "--out", str(out)]) == 2
        assert f"{out}: not a folder (a file of that name is in the way, here or above)" in (
            capsys.readouterr().err)
    assert (tmp_path / "afile").read_text() == "mine"
