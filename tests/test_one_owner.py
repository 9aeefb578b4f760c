"""One owner per fact (issue 36): each fact is written in one module and read from there."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src" / "starlora"


def sources() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in SRC.rglob("*.py")}


def where(pattern: str) -> list[str]:
    return sorted(name for name, text in sources().items() if re.search(pattern, text, re.M))


def test_measures_are_named_once() -> None:
    assert where(r"^MEASURES\s*=") == ["scoring/results.py"]


def test_one_jsonl_reader_and_one_csv_reader() -> None:
    """Data files, answer files and run directories are read by `io.jsonl_records` and
    `io.csv_records` (the annotate page parses one JSON body, not lines)."""
    assert where(r"csv\.(Dict)?Reader\(|csv\.reader\(") == ["io.py"]
    assert where(r"json_lines\(") == ["io.py"]
    assert set(where(r"parse_json\(")) <= {"io.py", "annotate/app.py"}


def test_the_label_row_is_written_in_one_place() -> None:
    assert where(r'\{"id": [^}\n]*"round": [^}\n]*"answer"') == ["run/label_rows.py"]


def test_lambda_defaults_are_written_once() -> None:
    from starlora.acquisition import LambdaSchedule, StrategyOptions
    from starlora.acquisition.base import LAMBDA_END, LAMBDA_SCHEDULE, LAMBDA_START
    from starlora.config import ActiveLearningConfig

    al, options, schedule = ActiveLearningConfig(), StrategyOptions(), LambdaSchedule()
    assert (al.lambda_schedule, al.lambda_start, al.lambda_end) == (LAMBDA_SCHEDULE,
                                                                    LAMBDA_START, LAMBDA_END)
    assert (options.lambda_schedule, options.lambda_start, options.lambda_end) == (
        schedule.kind, schedule.start, schedule.end) == (LAMBDA_SCHEDULE, LAMBDA_START,
                                                         LAMBDA_END)
    assert where(r"\b0\.9\b") == ["acquisition/base.py"]


def test_cli_choices_come_from_their_owners() -> None:
    from starlora.cli import build_parser
    from starlora.run.formats import FORMATS

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("export", "import"):  # auto: from the file name
        fmt = next(a for a in commands.choices[name]._actions if "--format" in a.option_strings)
        assert list(fmt.choices) == ["auto", *FORMATS]
    cli = sources()["cli.py"]
    assert "gsm8k, boolq" not in cli and '"label-studio"' not in cli


def test_seeds_are_drawn_only_through_the_seeds_module() -> None:
    """run/, training and train_batches draw no seed of their own (`starlora.seeds` owns
    every stream), and the streams routed there draw exactly the numbers drawn before, so
    committed runs are unchanged."""
    from starlora import seeds
    from starlora.run import protocol

    for name, text in sources().items():
        if name.startswith("run/") or name in ("training.py", "train_setup.py", "train_batches.py"):
            assert not re.search(r"default_rng\(|SeedSequence\(|1_000_003|seed \+ 1", text), name
    assert protocol.STREAMS is seeds.STREAMS and protocol.stream is seeds.stream
    for s in (0, 7, 123):
        assert seeds.phase_seed(s, 2, "train") == int(
            np.random.SeedSequence([s, 2, 2]).generate_state(1)[0])
        for split, offset in (("pool", 0), ("test", 1)):
            assert np.array_equal(seeds.subset_stream(s, split).permutation(50),
                                  np.random.default_rng(s + offset).permutation(50))
        assert np.array_equal(seeds.epoch_stream(s, 3).permutation(50),
                              np.random.default_rng([s, 3]).permutation(50))
        assert seeds.process_seed(s, 0) == s and seeds.process_seed(s, 2) == s + 2_000_006


def test_the_model_positions_are_read_in_one_place() -> None:
    """Every length a sequence may have goes through `models.token_limit`, `prompt_room` and
    `prompt_window`, which read the model's positions (issue: runs past a GPT-2's 1024)."""
    assert where(r"max_positions\(") == ["models.py"]
    assert where(r"\bdef token_limit\(|\bdef prompt_room\(") == ["models.py"]
