"""The lm-evaluation-harness comparisons (`benchmarks/scoring.py --lm-eval`,
`benchmarks/generation.py --lm-eval`) run end to end on a tiny model and end with their ratio.

lm-eval is the optional ``bench`` extra: without it these tests skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, args: list[str], cwd: Path) -> list[str]:
    """Stdout lines of ``python benchmarks/<script> <args>`` with this checkout's starlora."""
    path = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                         capture_output=True, text=True, timeout=600, cwd=cwd,
                         env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


@pytest.mark.slow
def test_scoring_against_lm_eval_smoke(data_dir, tmp_path):
    """Both sides score the same tokens (lm-eval's context/continuation split), agree on the
    log-likelihoods in fp32, and the last line is the ratio and ours' roofline fraction."""
    pytest.importorskip("lm_eval")
    lines = run_benchmark("scoring.py", [
        "--model", "tiny-llama", "--data", str(data_dir / "gsm8k" / "test.jsonl"),
        "--lm-eval", "5", "--lm-eval-batch-size", "2", "--dtype", "float32", "--lora-r", "4",
        "--repeats", "2"], tmp_path)
    assert "same_token_pairs=5/5" in lines[0]
    agreement = next(line for line in lines if line.startswith("agreement (float32"))
    assert float(agreement.split("log-likelihoods ")[1].split()[0]) < 1e-4
    last = lines[-1].split()
    assert [kv.split("=")[0] for kv in last] == ["ours_vs_lm_eval", "roofline_fraction"]
    assert float(last[0].split("=")[1]) > 0


@pytest.mark.slow
def test_generation_against_lm_eval_smoke(data_dir, tmp_path):
    """Same prompt ids on both sides; greedy outputs compared; ratio and fraction last."""
    pytest.importorskip("lm_eval")
    lines = run_benchmark("generation.py", [
        "--model", "tiny-llama", "--data", str(data_dir / "gsm8k" / "test.jsonl"),
        "--lm-eval", "4", "--batch-size", "2", "--max-new-tokens", "6", "--repeats", "2"],
        tmp_path)
    assert "same_prompt_ids=4/4" in lines[0]
    last = lines[-1].split()
    assert [kv.split("=")[0] for kv in last] == ["ours_vs_lm_eval", "same_outputs"]
    assert 0 <= float(last[1].split("=")[1]) <= 1
