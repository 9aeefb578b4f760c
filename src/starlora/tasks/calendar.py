"""`calendar`: generated date arithmetic ("What date is 12 days after March 25?"), a second
synthetic task that is unlike `arith` in structure: its answer is a date, not a number, and
getting it right takes knowing month lengths and carrying across month ends."""

from __future__ import annotations

import hashlib
import random
import re

from starlora.errors import ConfigError
from starlora.tasks.base import Example, Task, _fold
from starlora.tasks.registry import register_task

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
#: days per month in a common (not leap) year, the calendar every problem uses
DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MONTH = {m.casefold(): i for i, m in enumerate(MONTHS)} | {
    m[:3].casefold(): i for i, m in enumerate(MONTHS)}
_MONTH_WORD = r"(?i:\b(" + "|".join(sorted(_MONTH, key=len, reverse=True)) + r")\b\.?)"
#: a date written "April 6", "Apr. 6th", "6 April" or "2023-04-06" (the year is ignored);
#: groups 1+2, 3+4 or 5+6 hold it
_DATE = re.compile(_MONTH_WORD + r"\s*(\d{1,2})(?!\d)(?:st|nd|rd|th)?"
                   + r"|\b(\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH_WORD
                   + r"|\b\d{4}-(0?[1-9]|1[0-2])-(\d{1,2})\b")
_FINAL = re.compile(r"####(.*)")
_STATED = re.compile(r"final answer is[:\s]*(.+)", re.IGNORECASE)
_OFFSET = re.compile(r"(\d+)\s+days?\b")
#: how a problem is worded: (after, before) templates; the content key ignores the wording
_WORDINGS = (
    ("What date is {k} days after {date}?", "What date was {k} days before {date}?"),
    ("What is the date {k} days after {date}?", "What is the date {k} days before {date}?"),
    ("If today is {date}, what is the date in {k} days?",
     "If today is {date}, what was the date {k} days ago?"),
)
#: level -> share of the pool: the number of month ends a problem crosses is level - 1
LEVEL_WEIGHTS = {1: 4, 2: 4, 3: 2}
MAX_OFFSET = 75  #: offsets are 2..MAX_OFFSET days


def _date(month: int, day: int) -> str:
    return f"{MONTHS[month]} {day}"


def _walk(month: int, day: int, offset: int, after: bool) -> tuple[int, int, list[str]]:
    """(month, day, worked steps) of the date `offset` days after (or before) month/day,
    carrying month by month as the worked answer writes it."""
    value = day + offset if after else day - offset
    steps = [f"{day} + {offset} = {value}." if after else f"{day} - {offset} = {value}."]
    while after and value > DAYS[month]:
        steps.append(f"{MONTHS[month]} has {DAYS[month]} days. "
                     f"{value} - {DAYS[month]} = {value - DAYS[month]}.")
        value, month = value - DAYS[month], (month + 1) % 12
    while not after and value < 1:
        month = (month - 1) % 12
        steps.append(f"{MONTHS[month]} has {DAYS[month]} days. "
                     f"{value} + {DAYS[month]} = {value + DAYS[month]}.")
        value += DAYS[month]
    return month, value, steps


@register_task
class CalendarTask(Task):
    """Synthetic date arithmetic in a common (not leap) year: the date a number of days after
    or before a given date, made from a seed so that it needs no data file.

    Pool composition (each split): the start date is uniform over the 365 days of the year,
    the direction is "after" or "before" with equal odds, the offset is 2 to `MAX_OFFSET`
    days, and the wording is one of three per direction, uniform. The difficulty
    ``meta["steps"]`` is 1 + the number of month ends the problem crosses: 1 (the same
    month), 2 (one month end) or 3 (two), drawn 40% / 40% / 20% (`LEVEL_WEIGHTS`), with the
    offset drawn uniformly among those that give the level; repeated calculations are drawn
    again, and same-month ones repeat most, so a 1000-item pool (seeds 0 and 1) holds 37% /
    43% / 20%. Crossing into another year wraps (December 28 + 10 days is January 7).

    Worked answers are regular, e.g. ``"25 + 12 = 37. March has 31 days. 37 - 31 = 6.\\n####
    April 6"``, one step per month end carried: at most 57 tokens with EOS for SmolLM2 and
    Gemma 3 (34-35 on average), so ``evaluation.max_new_tokens`` should be 64 or more (the
    arith study's 48 would cut the longest). The final answer is the date after the last
    ``####`` (else after "final answer is", else the last date in the text), written
    "April 6", "Apr 6", "6th of April", "2023-04-06"...; its canonical form is ``"April 6"``.

    ``meta`` holds ``steps``, ``direction`` (``after``/``before``), ``offset`` and ``key``,
    the content key: start date, direction and offset, whatever the wording. A problem belongs
    to the test split iff a hash of its key falls in the first fifth of the hash range, so
    train and test never share a calculation whatever the seeds.
    """

    name = "calendar"
    default_template = "Question: {question}\nAnswer:"

    # -- data ---------------------------------------------------------------------------------
    @staticmethod
    def _key(month: int, day: int, after: bool, offset: int) -> str:
        return f"{_date(month, day)}|{'after' if after else 'before'}|{offset}"

    def content_key(self, ex: Example) -> str:
        """Start date, direction and offset read from the question (so two wordings of one
        calculation are one item); the folded question if it is not a calendar problem."""
        dates = list(_DATE.finditer(ex.question))
        offset = _OFFSET.search(ex.question)
        if len(dates) != 1 or offset is None:
            return _fold(ex.question)
        month, day = _parse_date(dates[0])
        after = not re.search(r"\b(before|ago)\b", ex.question, re.IGNORECASE)
        return self._key(month, day, after, int(offset.group(1)))

    def _problem(self, rng: random.Random) -> tuple[str, str, dict]:
        """One random problem: (question, worked answer, meta)."""
        level = rng.choices(list(LEVEL_WEIGHTS), weights=list(LEVEL_WEIGHTS.values()))[0]
        after = rng.random() < 0.5
        day_of_year = rng.randrange(365)
        month = next(m for m in range(12) if day_of_year < sum(DAYS[: m + 1]))
        day = day_of_year - sum(DAYS[:month]) + 1
        offsets = [k for k in range(2, MAX_OFFSET + 1)
                   if len(_walk(month, day, k, after)[2]) == level]
        if not offsets:  # e.g. level 1 from the last day of a month, going on
            return self._problem(rng)
        offset = rng.choice(offsets)
        wording = rng.choice(_WORDINGS)[0 if after else 1]
        end_month, end_day, steps = _walk(month, day, offset, after)
        question = wording.format(k=offset, date=_date(month, day))
        answer = f"{' '.join(steps)}\n#### {_date(end_month, end_day)}"
        meta = {"steps": level, "direction": "after" if after else "before", "offset": offset,
                "key": self._key(month, day, after, offset)}
        return question, answer, meta

    @staticmethod
    def _split_of(key: str) -> str:
        return "test" if hashlib.sha1(key.encode()).digest()[0] < 52 else "train"

    def generate(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` problems of `split` (``"train"`` or ``"test"``) with distinct content keys, the
        same for the same (split, seed); ids read ``calendar-train-000012``."""
        if split not in ("train", "test"):
            raise ConfigError(f"task: calendar split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"calendar/{split}/{seed}")
        examples: list[Example] = []
        seen: set[str] = set()
        for _ in range(200 * n + 1000):
            if len(examples) == n:
                return examples
            question, answer, meta = self._problem(rng)
            if meta["key"] in seen or self._split_of(meta["key"]) != split:
                continue
            seen.add(meta["key"])
            examples.append(Example(f"calendar-{split}-{len(examples):06d}", question, answer,
                                    meta))
        if len(examples) < n:
            raise ConfigError(f"task: cannot generate {n} distinct calendar problems")
        return examples

    # -- grading ------------------------------------------------------------------------------
    def gold(self, answer: str) -> str | None:
        found = _FINAL.findall(answer)
        date = _DATE.search(found[-1]) if found else None
        return _canonical(date) if date else None

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        # the first date after the last "####", else after the last "final answer is",
        # else the last date in the text
        for pattern in (_FINAL, _STATED):
            found = list(pattern.finditer(text))
            if found:
                date = _DATE.search(text, found[-1].start(1), found[-1].end(1))
                if date:
                    return _canonical(date), date.start(), _date_end(date)
        dates = list(_DATE.finditer(text))
        return (_canonical(dates[-1]), dates[-1].start(), _date_end(dates[-1])) if dates else None


def _parse_date(match: re.Match[str]) -> tuple[int, int]:
    """(month index, day) of a `_DATE` match."""
    if match.group(1) is not None:
        return _MONTH[match.group(1).casefold()], int(match.group(2))
    if match.group(4) is not None:
        return _MONTH[match.group(4).casefold()], int(match.group(3))
    return int(match.group(5)) - 1, int(match.group(6))


def _canonical(match: re.Match[str]) -> str:
    """``"April 6"`` for "Apr. 6th", "6 April", "april 6"."""
    return _date(*_parse_date(match))


def _date_end(match: re.Match[str]) -> int:
    """End of a date's characters: a trailing "." after the month is not part of it."""
    text = match.group(0)
    return match.start() + len(text.rstrip("."))
