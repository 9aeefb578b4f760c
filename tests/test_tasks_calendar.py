"""The built-in synthetic `calendar` task: deterministic, disjoint splits by calculation,
correct dates (checked against `datetime`), graded difficulty, and extraction."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter

import pytest

from starlora.errors import ConfigError
from starlora.tasks import TASKS, CalendarTask, Example, get_task
from starlora.tasks.calendar import MONTHS

YEAR = 2023  # a common year: the calendar the task uses
STEP = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)\.")
START = re.compile("(" + "|".join(MONTHS) + r") (\d+)")


@pytest.fixture(scope="module")
def task() -> CalendarTask:
    return get_task("calendar")


def parse(text: str) -> dt.date:
    month, day = text.split()
    return dt.date(YEAR, MONTHS.index(month) + 1, int(day))


def test_registered_with_a_plain_question_answer_template(task) -> None:
    assert TASKS["calendar"] is CalendarTask and isinstance(task, CalendarTask)
    assert task.prompt(Example("x", "Q?", "#### May 1")) == "Question: Q?\nAnswer:"


def test_generation_is_deterministic_per_seed_and_split(task) -> None:
    a, b = task.generate("train", 300, seed=3), task.generate("train", 300, seed=3)
    assert [(e.id, e.question, e.answer, e.meta) for e in a] == [
        (e.id, e.question, e.answer, e.meta) for e in b]
    other = task.generate("train", 300, seed=4)
    assert len({e.meta["key"] for e in a} & {e.meta["key"] for e in other}) < 30
    assert a[0].id == "calendar-train-000000" and a[12].id == "calendar-train-000012"
    assert len({task.content_key(e) for e in a}) == 300  # no calculation twice in a split


def test_dates_are_right_and_the_worked_steps_add_up(task) -> None:
    """Every answer against `datetime`, in a common year, wrapping at the year's end."""
    examples = task.generate("train", 1000, seed=0) + task.generate("test", 200, seed=0)
    for ex in examples:
        begin = parse(START.search(ex.question).group(0))
        sign = 1 if ex.meta["direction"] == "after" else -1
        want = begin + sign * dt.timedelta(days=ex.meta["offset"])
        gold = task.gold(ex.answer)
        assert (gold is not None and gold == f"{MONTHS[want.month - 1]} {want.day}"
                and ex.answer.endswith(f"\n#### {gold}")), ex
        assert parse(gold).replace(year=want.year) == want
        steps = STEP.findall(ex.answer)
        assert len(steps) == ex.meta["steps"]  # one line per month end carried, plus the first
        for a, op, b, c in steps:
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
        assert int(steps[-1][3]) == want.day
        crossed = (want.year - begin.year) * 12 + want.month - begin.month
        assert abs(crossed) == ex.meta["steps"] - 1 and 2 <= ex.meta["offset"] <= 75


def test_difficulty_is_graded_and_both_directions_occur(task) -> None:
    pool = task.generate("train", 1000, seed=0)
    levels = Counter(e.meta["steps"] for e in pool)
    assert set(levels) == {1, 2, 3}
    assert 300 < levels[1] < 450 and 350 < levels[2] < 500 and 150 < levels[3] < 250
    directions = Counter(e.meta["direction"] for e in pool)
    assert 400 < directions["after"] < 600
    assert len({e.question.split(str(e.meta["offset"]))[0] for e in pool}) >= 3  # wordings


def test_train_and_test_never_share_a_calculation(task) -> None:
    test = [e for seed in (0, 1) for e in task.generate("test", 300, seed)]
    train = [e for seed in (0, 1) for e in task.generate("train", 1500, seed)]
    assert not {task.content_key(e) for e in test} & {task.content_key(e) for e in train}
    assert all(task.content_key(e) == e.meta["key"] for e in test + train)


def test_content_key_ignores_the_wording() -> None:
    task = get_task("calendar")
    same = ["What date is 12 days after March 25?", "What is the date 12 days after March 25?",
            "If today is March 25, what is the date in 12 days?"]
    before = ["What date was 12 days before March 25?",
              "If today is March 25, what was the date 12 days ago?"]
    keys = {task.content_key(Example(str(i), q, None)) for i, q in enumerate(same)}
    assert keys == {"March 25|after|12"}
    assert {task.content_key(Example("b", q, None)) for q in before} == {"March 25|before|12"}
    assert task.content_key(Example("c", "  Not  a Date?", None)) == "not a date?"


@pytest.mark.parametrize("text,answer,span", [
    ("25 + 12 = 37. March has 31 days. 37 - 31 = 6.\n#### April 6", "April 6", "April 6"),
    ("#### Apr. 6th, I think", "April 6", "Apr. 6th"),
    ("So it is the 6th of April.", "April 6", "6th of April"),
    ("March 3 then March 9.\n#### March 9\n#### 4 may", "May 4", "4 may"),
    ("The final answer is Dec. 31", "December 31", "Dec. 31"),
    ("no date here, 31 days", None, None),
    ("#### 17", None, None),
    ("The answer is: 2023-04-27, or 2023-13-01", "April 27", "2023-04-27"),
])
def test_extract_and_span(text: str, answer: str | None, span: str | None) -> None:
    task = get_task("calendar")
    assert task.extract(text) == answer
    found = task.extract_span(text)
    if span is None:
        assert found is None
    else:
        start, end = found
        assert text[start:end] == span and task.extract(text[start:end]) == answer


def test_gold_round_trips_and_grading_is_exact(task) -> None:
    for ex in task.generate("test", 50, seed=0):
        gold = task.gold(ex.answer)
        assert task.check_answer(ex.answer) is None and task.extract(ex.answer) == gold
        month, day = gold.split()
        assert task.is_correct(task.extract(f"#### {month[:3]} {day}"), gold)
        assert not task.is_correct(task.extract(f"#### {month} {int(day) % 28 + 1}"), gold)
    assert task.check_answer("#### 17") is not None


def test_bad_split_is_a_config_error(task) -> None:
    with pytest.raises(ConfigError, match="split"):
        task.generate("validation", 3, seed=0)
