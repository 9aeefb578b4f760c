"""The benchmark tasks of the STAR paper (gsm8k, boolq, obqa) and `jsonl`, any file."""

from __future__ import annotations

import re
from collections.abc import Sequence

from starlora.errors import ConfigError
from starlora.tasks.base import (
    _NUMBER,
    Example,
    PromptStyle,
    Task,
    _fold,
    _number_answer,
    parse_number,
)


class GSM8K(Task):
    """Grade-school maths; gold answers end with ``#### N``."""

    name = "gsm8k"
    default_template = "Question: {question}\nAnswer:"
    _final = re.compile(r"####\s*(.+)")
    _stated = re.compile(r"final answer is[:\s]*(.+)", re.IGNORECASE)

    def gold(self, answer: str) -> str | None:
        found = self._final.findall(answer)
        if not found:
            return None
        numbers = _NUMBER.findall(found[-1])
        return parse_number(numbers[0]) if numbers else None

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        # the first number after the last "####", else after the last "final answer is",
        # else the last number in the text
        for pattern in (self._final, self._stated):
            found = list(pattern.finditer(text))
            if found:
                number = _NUMBER.search(text, found[-1].start(1), found[-1].end(1))
                if number:
                    return _number_answer(number)
        numbers = list(_NUMBER.finditer(text))
        return _number_answer(numbers[-1]) if numbers else None

    def is_correct(self, prediction: str | None, gold: str | None) -> bool:
        if prediction is None or gold is None:
            return False
        return prediction == gold or abs(float(prediction) - float(gold)) < 1e-6


class BoolQ(Task):
    """Closed-book yes/no questions; gold answers read ``the correct answer is true``."""

    name = "boolq"
    choices = ("true", "false")
    _word = re.compile(r"\b(true|false|yes|no)\b", re.IGNORECASE)

    def gold(self, answer: str) -> str | None:
        found = self._word.findall(answer)
        if not found:
            return None
        return {"true": "true", "yes": "true", "false": "false", "no": "false"}[found[-1].lower()]

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        # the first verdict a generation states is its answer; later words are often rambling
        found = self._word.search(text)
        if not found:
            return None
        verdict = {"true": "true", "yes": "true", "false": "false", "no": "false"}
        return verdict[found.group(1).lower()], found.start(1), found.end(1)

    def choice_answers(self, ex: Example) -> list[str]:
        return [f"the correct answer is {c}" for c in self.choices]


class OBQA(Task):
    """OpenBookQA, four options; gold answers are one letter.

    The train split writes options as ``AnswerA text`` and the test split as ``AnswerA: text``;
    questions are normalised to the test form so that train and test prompts agree.
    """

    name = "obqa"
    choices = ("A", "B", "C", "D")
    _option = re.compile(r"^Answer([A-D])(?!:)\s*", re.MULTILINE)
    _letter = re.compile(r"(?:\bAnswer|\b)([A-D])\b")

    _options = re.compile(r"^Answer[A-D]:\s*(.*)$", re.MULTILINE)

    def normalize_question(self, question: str) -> str:
        return self._option.sub(r"Answer\1: ", question)

    def content_key(self, ex: Example) -> str:
        """The stem plus the set of option texts: the same question with its options shuffled
        is the same item."""
        question = self.normalize_question(ex.question)
        first = re.search(r"^Answer[A-D]:", question, re.MULTILINE)
        stem = question[: first.start()] if first else question
        options = sorted(_fold(o) for o in self._options.findall(question))
        return "\x1f".join([_fold(stem), *options])

    def gold(self, answer: str) -> str | None:
        answer = answer.strip()
        return answer if answer in self.choices else None

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        found = self._letter.search(text)
        return (found.group(1), found.start(1), found.end(1)) if found else None

    def choice_answers(self, ex: Example) -> list[str]:
        return list(self.choices)


class JSONLTask(Task):
    """Any JSONL file: free-text answers graded by normalised exact match.

    Args:
        choices: optional fixed answer set; enables choice scoring in evaluation.
        answer_regex: optional pattern whose first group is the final answer, applied to both
            gold and generated text (for example ``r"answer: (\\w+)"``).
    """

    name = "jsonl"

    def __init__(
        self,
        prompt_style: PromptStyle = "plain",
        template: str | None = None,
        answer_prefix: str = " ",
        choices: Sequence[str] | None = None,
        answer_regex: str | None = None,
    ):
        super().__init__(prompt_style, template, answer_prefix)
        self.choices = tuple(choices) if choices else None
        try:
            self._regex = re.compile(answer_regex) if answer_regex else None
        except re.error as e:
            raise ConfigError(f"task.answer_regex: not a valid regular expression: {e}") from e

    @staticmethod
    def _norm(text: str) -> str:
        return re.sub(r"[\s.,;:!?\"']+", " ", text).strip().casefold()

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        # the regex's first group, else the first non-empty line (without its trailing blanks)
        if self._regex is not None:
            found = self._regex.search(text)
            if not found or found.start(1) < 0:  # no match, or the group did not take part
                return None
            return self._norm(found.group(1)), found.start(1), found.end(1)
        stripped = text.strip()
        if not stripped:
            return None
        start = len(text) - len(text.lstrip())
        line = stripped.splitlines()[0].rstrip()
        return self._norm(line), start, start + len(line)

    def gold(self, answer: str) -> str | None:
        return self.extract(answer)

    def choice_answers(self, ex: Example) -> list[str] | None:
        return list(self.choices) if self.choices else None
