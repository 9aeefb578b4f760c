"""The built-in synthetic `arith` task: deterministic, disjoint splits, correct answers."""

from __future__ import annotations

import re

import pytest

from starlora.errors import ConfigError
from starlora.tasks import TASKS, ArithTask, Example, get_task

STEP = re.compile(r"(\d+) ([+\-x]) (\d+) = (\d+)\.")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}


@pytest.fixture(scope="module")
def task() -> ArithTask:
    return get_task("arith")


def test_registered_with_gsm8k_style_template(task):
    assert TASKS["arith"] is ArithTask and isinstance(task, ArithTask)
    assert task.prompt(Example("x", "Q?", "1\n#### 1")) == "Question: Q?\nAnswer:"


def test_generation_is_deterministic_per_seed_and_split(task):
    a, b = task.generate("train", 200, seed=3), task.generate("train", 200, seed=3)
    assert [(e.id, e.question, e.answer, e.meta) for e in a] == [
        (e.id, e.question, e.answer, e.meta) for e in b
    ]
    other = task.generate("train", 200, seed=4)
    assert len({e.question for e in a} & {e.question for e in other}) < 20
    assert a[0].id == "arith-train-000000" and a[12].id == "arith-train-000012"
    assert len({e.question for e in a}) == 200  # no duplicates within a split


def test_train_and_test_are_disjoint(task):
    test = {e.question for seed in (0, 1) for e in task.generate("test", 300, seed)}
    train = {e.question for seed in (0, 1) for e in task.generate("train", 1500, seed)}
    assert len(test) > 300 and len(train) > 1500
    assert not test & train
    assert task.generate("test", 5, 0)[0].id == "arith-test-000000"


def test_answers_are_correct_and_steps_add_up(task):
    examples = task.generate("train", 1000, seed=0) + task.generate("test", 300, seed=0)
    counts = {1: 0, 2: 0, 3: 0}
    for ex in examples:
        final = task.gold(ex.answer)
        assert final is not None and ex.answer.endswith(f"\n#### {final}")
        assert eval(ex.meta["expression"], {"__builtins__": {}}) == int(final)
        steps = STEP.findall(ex.answer)
        assert len(steps) == ex.meta["steps"]
        assert ex.answer.split("\n")[0] == " ".join(f"{a} {o} {b} = {c}." for a, o, b, c in steps)
        for i, (a, op, b, c) in enumerate(steps):
            assert OPS[op](int(a), int(b)) == int(c)
            if i:  # each step continues from the previous result
                assert a == steps[i - 1][3]
            assert 0 <= int(c) <= task.cap
        assert steps[-1][3] == final
        counts[ex.meta["steps"]] += 1
    # mixed difficulty: about 40% / 40% / 20%
    assert counts[1] > 400 and counts[2] > 400 and 150 < counts[3] < 400


def test_gold_extraction_round_trips(task):
    for ex in task.generate("test", 50, seed=0):
        gold = task.gold(ex.answer)
        assert task.check_answer(ex.answer) is None
        assert task.extract(ex.answer) == gold
        assert task.is_correct(task.extract(ex.answer.split("\n")[0]), gold)  # steps alone
        assert not task.is_correct(task.extract(f"#### {int(gold) + 1}"), gold)


@pytest.mark.slow
def test_encode_supervises_the_worked_answer(task, smol):
    ex = task.generate("train", 1, seed=0)[0]
    prompt_ids, answer_ids = task.encode(smol.tokenizer, ex)
    assert smol.tokenizer.decode(prompt_ids).endswith("Answer:")
    assert smol.tokenizer.decode(answer_ids[:-1]) == " " + ex.answer
    assert answer_ids[-1] == smol.tokenizer.eos_token_id


def test_bad_split_is_a_config_error(task):
    with pytest.raises(ConfigError, match="split"):
        task.generate("validation", 3, seed=0)


def test_train_and_test_share_no_expression() -> None:
    """The split is by expression: a test problem is never a pool problem reworded."""
    task = get_task("arith")
    pool = task.generate("train", 1000, 0)
    test = task.generate("test", 300, 0)
    assert not {ex.meta["expression"] for ex in pool} & {ex.meta["expression"] for ex in test}


@pytest.mark.parametrize("text,expected", [
    (" 19 - 1. 19 - 1. 19 - 1", "-1"),  # gsm8k now: 1 (a minus after a number is no sign)
    ("The answer is 18. She sold 9 eggs at $2 each.", "2"),  # gsm8k now: 18 (stated answer)
    ("#### 18\n\nQuestion: Tom has 3 apples.\nAnswer: 3+4=7\n#### 7", "7"),  # gsm8k: 18
    ("The answers are 3,4.", "34"),  # gsm8k now: 4 (commas only as thousands separators)
])
def test_arith_reads_generations_as_the_study_2_runs_were_graded(task, text, expected):
    """The study-2 runs (issue 35, confirmatory) were graded with gsm8k's extraction as it was
    before its fixes; arith keeps it until the study's analysis is done (the fixed extraction
    reads 299 of their 336,000 committed generations otherwise)."""
    assert task.extract(text) == expected
    assert get_task("gsm8k").extract(text) != expected
