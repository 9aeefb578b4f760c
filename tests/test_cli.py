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
