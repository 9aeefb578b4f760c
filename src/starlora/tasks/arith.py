"""`arith`: generated arithmetic word problems, so that the demo needs no data file."""

from __future__ import annotations

import hashlib
import random
import re

from starlora.errors import ConfigError
from starlora.tasks.base import Example, _number_answer
from starlora.tasks.builtin import GSM8K
from starlora.tasks.registry import register_task

#: gsm8k's number pattern and answer cues as they were before its extraction fixes (a minus
#: after a number read as a sign, any commas inside a number, no stated-answer or run-on rule)
_STUDY2_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")
_STUDY2_CUES = (re.compile(r"####\s*(.+)"),
                re.compile(r"final answer is[:\s]*(.+)", re.IGNORECASE))


@register_task
class ArithTask(GSM8K):
    """Synthetic arithmetic word problems (1 to 3 steps of + - x on small integers), made
    from a seed so that the demo needs no data files.

    Worked answers are deliberately regular, e.g. ``"12 + 5 = 17. 17 - 3 = 14.\\n#### 14"``,
    so that a small model can learn the format quickly while 3-step items stay hard. Gold
    answers are read as gsm8k's, generations as gsm8k's were before its fixes (`_answer`).
    ``meta["expression"]`` holds the problem as a Python expression and ``meta["steps"]`` its
    number of operations.

    A problem belongs to the test split iff a hash of its *expression* falls in the first fifth
    of the hash range, so train and test never share a calculation (not only a wording)
    whatever the seeds.
    """

    name = "arith"
    _names = (("Tom", "he", "his"), ("Anna", "she", "her"), ("Sam", "he", "his"),
              ("Mia", "she", "her"), ("Ben", "he", "his"), ("Lily", "she", "her"),
              ("Max", "he", "his"), ("Emma", "she", "her"))
    _items = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells")
    _add = ("{P} buys {b} more.", "{P} finds {b} more.", "A friend gives {o} {b} more.")
    _sub = ("{P} gives away {b}.", "{P} loses {b}.", "{P} uses {b}.")
    _mul = ((2, "{P} then doubles {g} {items}."), (3, "{P} then triples {g} {items}."))
    cap = 60  #: every number in a problem, intermediate results included, is at most this

    def _problem(self, rng: random.Random) -> tuple[str, str, str, int]:
        """One random problem: (question, worked answer, expression, number of steps)."""
        name, he, his = rng.choice(self._names)
        items = rng.choice(self._items)
        n_steps = rng.choices((1, 2, 3), weights=(4, 4, 2))[0]
        if rng.random() < 0.25:  # the first step is a product: a bags of b
            a = rng.randint(2, 9)
            b = rng.randint(2, min(9, self.cap // a))
            value, expr = a * b, f"{a} * {b}"
            sentences = [f"{name} has {a} bags with {b} {items} in each bag."]
            steps = [f"{a} x {b} = {value}."]
        else:
            value, expr, steps = rng.randint(2, 30), None, []
            sentences = [f"{name} has {value} {items}."]
        while len(steps) < n_steps:  # every value stays within 1..self.cap
            ops = [op for op, ok in (("+", value <= self.cap - 2), ("-", value > 1),
                                     ("x", 2 * value <= self.cap)) if ok]
            op = rng.choice(ops)
            if op == "+":
                b = rng.randint(2, min(20, self.cap - value))
                new, sentence = value + b, rng.choice(self._add)
            elif op == "-":
                b = rng.randint(1, value - 1)
                new, sentence = value - b, rng.choice(self._sub)
            else:
                b, sentence = rng.choice([m for m in self._mul if m[0] * value <= self.cap])
                new = value * b
            sentences.append(sentence.format(P=he.capitalize(), o="him" if he == "he" else "her",
                                             g=his, b=b, items=items))
            steps.append(f"{value} {op} {b} = {new}.")
            expr = f"{value if expr is None else f'({expr})'} {'*' if op == 'x' else op} {b}"
            value = new
        sentences.append(f"How many {items} does {he} have now?")
        return " ".join(sentences), f"{' '.join(steps)}\n#### {value}", expr, n_steps

    @staticmethod
    def _split_of(expression: str) -> str:
        return "test" if hashlib.sha1(expression.encode()).digest()[0] < 52 else "train"

    def generate(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` distinct problems of `split` (``"train"`` or ``"test"``), the same for the same
        (split, seed); ids read ``arith-train-000012``."""
        if split not in ("train", "test"):
            raise ConfigError(f"task: arith split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"arith/{split}/{seed}")
        examples: list[Example] = []
        seen: set[str] = set()
        for _ in range(200 * n + 1000):
            if len(examples) == n:
                return examples
            question, answer, expr, n_steps = self._problem(rng)
            if question in seen or self._split_of(expr) != split:
                continue
            seen.add(question)
            meta = {"expression": expr, "steps": n_steps}
            examples.append(Example(f"arith-{split}-{len(examples):06d}", question, answer, meta))
        if len(examples) < n:
            raise ConfigError(f"task: cannot generate {n} distinct arith problems")
        return examples

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        """gsm8k's extraction as it was before its fixes, kept on purpose: the study-2 runs
        (issue 35, confirmatory) were graded with it, and 299 of their 336,000 committed arith
        generations read otherwise under the fixed one (a truncated ``... 19 - 1`` reads -1
        here, 1 there). To be revisited after the study's analysis; until then arith grades
        exactly as it did. The first number after the last "####", else after the last
        "final answer is", else the last number in the text."""
        for pattern in _STUDY2_CUES:
            found = list(pattern.finditer(text))
            if found:
                number = _STUDY2_NUMBER.search(text, found[-1].start(1), found[-1].end(1))
                if number:
                    return _number_answer(number)
        numbers = list(_STUDY2_NUMBER.finditer(text))
        return _number_answer(numbers[-1]) if numbers else None
