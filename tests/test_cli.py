from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from starlora.cli import main


def test_help_and_version(capsys) -> None:
    proc = subprocess.run([sys.executable, "-m", "starlora", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("demo", "run", "status", "score", "report", "uncertainty", "version"):
        assert command in proc.stdout
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("starlora ")


def test_bad_data_file_exits_2_with_file_line_field(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "B"}\n{"question": "q", "answer": 5}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "starlora", "score", "--model", "tiny-llama", "--task", "jsonl",
         "--data", str(data), "--out", str(tmp_path / "s.jsonl")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert f"{data}:2: answer: must be a string, got int" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s.jsonl").exists()


def test_unknown_model_is_one_clear_line(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    code = main(["score", "--model", "no-such/model", "--task", "jsonl", "--data", str(data),
                 "--out", str(tmp_path / "s.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "not a built-in" in err and "not an existing folder" in err


def test_score_command_writes_one_line_per_record(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "scores.jsonl"
    code = main(["score", "--model", "tiny-gpt2", "--task", "obqa", "--data",
                 str(data_dir / "obqa" / "test.jsonl"), "--limit", "5", "--mc-passes", "2",
                 "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert {"id", "pe", "pe_per_token", "me", "me_per_token", "n_answer_tokens"} <= set(row)
        assert len(row["pe_passes"]) == 2 and row["pe"] > 0


def test_version_flag_prints_the_version_without_importing_torch() -> None:
    code = ("import sys\nfrom starlora.cli import main\ntry:\n    main(['--version'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from starlora import __version__

    assert proc.stdout == f"starlora {__version__}\n"


def test_every_subcommand_has_a_description_an_example_and_help_on_each_argument() -> None:
    import argparse

    from starlora.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert len(commands.choices) >= 10
    for name, sub in commands.choices.items():
        text = sub.format_help()
        assert sub.description and sub.description.endswith("."), name
        assert f"example:\n  starlora {name}" in text, name
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction) and action.dest in (
                    "run_dir", "run_dirs", "config", "file"):
                assert action.help, (name, action.dest)


def test_library_noise_is_silenced_at_the_command_line_only(monkeypatch, recwarn) -> None:
    import logging
    import warnings

    import starlora.cli as cli

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    deepspeed = logging.getLogger("DeepSpeed")
    deepspeed.addHandler(Keep())

    def noisy(args) -> int:
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                      FutureWarning, stacklevel=1)
        warnings.warn("a warning users can act on", UserWarning, stacklevel=1)
        deepspeed.warning("Setting accelerator to CPU. If you have GPU ...")
        deepspeed.warning("another DeepSpeed message")
        return 0

    monkeypatch.setattr(cli, "_cmd_version", noisy)
    monkeypatch.setattr(sys, "argv", ["starlora", "version"])
    try:
        assert cli.main() == 0  # the command line: sys.argv
        assert [str(w.message) for w in recwarn] == ["a warning users can act on"]
        assert seen == ["another DeepSpeed message"]
        recwarn.clear()
        seen.clear()
        warnings.simplefilter("always")
        assert cli.main(["version"]) == 0  # a call with arguments (tests) silences nothing
        assert len(recwarn) == 2 and len(seen) == 2
    finally:
        deepspeed.handlers.clear()


def test_output_into_a_closed_pipe_ends_quietly_with_141() -> None:
    """``starlora status RUN | head -1`` once head has gone: every write fails (EPIPE; Python
    ignores SIGPIPE), and the command ends with the shell's SIGPIPE code, no traceback."""
    import os

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        proc = subprocess.run([sys.executable, "-m", "starlora", "version"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


def test_a_run_directory_given_as_the_config_points_to_run_dir(tmp_path: Path, capsys) -> None:
    """`starlora run RUN` (a run directory where the config goes) says how a run resumes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\n")
    assert main(["run", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir}: cannot read config (" in err
    assert f"; a run directory resumes with --run-dir {run_dir}" in err


def test_run_check_says_what_the_run_will_do_and_writes_nothing(tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    """`starlora run CONFIG --check`: every input check a run makes before its work, the
    plan in a few lines, no model loaded and no run directory made; a plan the pool cannot
    serve is the error a run would give, exit 2."""
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(config), "--check", "--run-dir", "r"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "task:     arith: pool 48 (48 with answers), test 12",
        "strategy: pe-dynamic, oracle simulated, scoring generated answers",
        "labels:   8 labels, then 8 a round: 2 rounds, 16 labels",
        "model:    tiny-llama (not loaded by --check)",
        "run dir:  r"]
    assert main(["run", str(config), "--check", "--set", "active_learning.initial_size=60"]) == 2
    assert "initial_size: 60 is larger than the pool (48 examples)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_pool_emptied_by_the_test_overlap_says_so(tmp_path: Path, capsys) -> None:
    """One file as pool and test set: every pool record repeats a test record and is dropped,
    and the error says that, not only that the pool holds 0 examples."""
    data, config = tmp_path / "d.jsonl", tmp_path / "c.yaml"
    data.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(3)))
    config.write_text(f"task: {{name: jsonl, train: {data}, test: {data}}}\n"
                      "active_learning: {initial_size: 1, query_size: 1, rounds: 2}\n")
    assert main(["run", str(config), "--check"]) == 2
    assert ("initial_size: 1 is larger than the pool (0 examples; 3 records repeated a test "
            "record and were dropped: task.drop_test_overlap)") in capsys.readouterr().err
