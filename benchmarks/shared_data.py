"""Where the benchmarks read the benchmark data: ``../shared/data`` beside the checkout (gsm8k,
boolq, obqa; read there, never copied into the repository)."""

from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
