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

#: where a generation runs on into a question of its own, in the prompt's form: what follows
#: answers that question, not this one
_RUN_ON = re.compile(r"\n[ \t]*Question:")
#: a number that starts an expression (``10 - 3 = 7``): the answer is its result, after "="
_OPERATOR = re.compile(r"[ \t]*[-+*/x\u00d7\u00f7][ \t]*\$?\.?\d")


def _first_number(text: str, start: int, end: int) -> re.Match[str] | None:
    """The first number in ``text[start:end]``; when it starts an expression, the number
    after its last "=" (``Answer: 10 - 3 = 7`` is 7; ``5 + 3 = 8, doubled: 8 * 2 = 16`` is
    16), if there is one."""
    number = _NUMBER.search(text, start, end)
    if number is not None and _OPERATOR.match(text, number.end(), end):
        equals = text.rfind("=", number.end(), end)
        result = _NUMBER.search(text, equals + 1, end) if equals >= 0 else None
        number = result or number
    return number


class GSM8K(Task):
    """Grade-school maths; gold answers end with ``#### N``."""

    name = "gsm8k"
    default_template = "Question: {question}\nAnswer:"
    _final = re.compile(r"####\s*(.+)")
    #: a stated answer: "The answer is 18", "Answer: 18", "The final answer is: $18"; a
    #: number must come first ("Answer: Janet's ducks lay 16 eggs ..." states none)
    _stated = re.compile(r"\banswer(?:\s+is\b|\s*:)[:\s*]*(?=\$?-?\$?\.?\d)(.+)",
                         re.IGNORECASE)

    def gold(self, answer: str) -> str | None:
        # strict: one "####", and all that follows it one number
        if answer.count("####") != 1:
            return None
        final = answer.split("####", 1)[1].strip()
        return parse_number(final) if _NUMBER.fullmatch(final) else None

    def check_answer(self, answer: str) -> str | None:
        if self.gold(answer) is not None:
            return None
        count = answer.count("####")
        return "cannot extract a final answer: " + (
            "no '#### N' line" if count == 0 else f"{count} '####' lines, not one" if count > 1
            else "what follows '####' is not one number")

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        # within what answers this question (up to a run-on "Question:"): the first number
        # after the last "####", else after the last stated answer ("the answer is"), else
        # the last number; a first number that starts an expression gives its result
        run_on = _RUN_ON.search(text)
        if run_on is not None:
            text = text[: run_on.start()]  # a prefix: offsets into it are offsets into text
        for pattern in (self._final, self._stated):
            found = list(pattern.finditer(text))
            if found:
                number = _first_number(text, found[-1].start(1), found[-1].end(1))
                if number:
                    return _number_answer(number)
        numbers = list(_NUMBER.finditer(text))
        return _number_answer(numbers[-1]) if numbers else None

    def is_correct(self, prediction: str | None, gold: str | None) -> bool:
        if prediction is None or gold is None:
            return False
        return prediction == gold or abs(float(prediction) - float(gold)) < 1e-6


_VERDICT = {"true": "true", "yes": "true", "false": "false", "no": "false"}


class BoolQ(Task):
    """Closed-book yes/no questions; gold answers read ``the correct answer is true``."""

    name = "boolq"
    choices = ("true", "false")
    _word = re.compile(r"\b(true|false|yes|no)\b", re.IGNORECASE)
    #: the answer format echoed, not a verdict: "true/false", "True or false", "yes/no"
    _echo = re.compile(r"\b(?:true|false|yes|no)\s*(?:/|\bor\b)\s*(?:true|false|yes|no)\b",
                       re.IGNORECASE)
    #: a verdict stated as the answer: "the correct answer is true", "Answer: no"
    _stated = re.compile(r"\banswer(?:\s+is\b|\s*:)[\s:*\"'(]*(true|false|yes|no)\b",
                         re.IGNORECASE)
    #: what may stand before a "no" that is a verdict: nothing, the end of a sentence or a
    #: comma ("Well, no.")
    _opening = re.compile(r"(?:^|[.!?;:,\n])[\s*_\"'(\[]*\Z")
    #: a gold answer: one verdict, bare or as "the correct answer is ..."
    _gold = re.compile(r"\s*(?:(?:the\s+)?(?:correct\s+)?answer(?:\s+is|\s*:)\s*)?"
                       r"(true|false|yes|no)\s*\.?\s*", re.IGNORECASE)

    def gold(self, answer: str) -> str | None:
        found = self._gold.fullmatch(answer)
        return _VERDICT[found.group(1).lower()] if found else None

    def check_answer(self, answer: str) -> str | None:
        return None if self.gold(answer) is not None else (
            "cannot extract a final answer: not one verdict (true, false, yes or no, bare or "
            "as 'the correct answer is true')")

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        # the last stated answer ("the answer is true"), else the first verdict: the first a
        # generation states is its answer, later words are often rambling. An echoed answer
        # format ("true/false") is no verdict, nor a "no" inside a sentence ("there is no").
        echoes = [m.span() for m in self._echo.finditer(text)]

        def usable(m: re.Match[str]) -> bool:
            return not any(a <= m.start(1) < b for a, b in echoes)

        stated = [m for m in self._stated.finditer(text) if usable(m)]
        found = stated[-1] if stated else next(
            (m for m in self._word.finditer(text) if usable(m) and (
                m.group(1).lower() != "no" or self._opening.search(text, 0, m.start(1)))),
            None)
        if found is None:
            return None
        return _VERDICT[found.group(1).lower()], found.start(1), found.end(1)

    def choice_answers(self, ex: Example) -> list[str]:
        return [f"the correct answer is {c}" for c in self.choices]


class OBQA(Task):
    """OpenBookQA, four options; gold answers are one letter.

    The train split writes options as ``AnswerA text`` and the test split as ``AnswerA: text``;
    questions are normalised to the test form so that train and test prompts agree. A record
    must have options AnswerA to AnswerD, each once and none empty.
    """

    name = "obqa"
    choices = ("A", "B", "C", "D")
    _option = re.compile(r"^Answer([A-D])(?!:)[ \t]*:?[ \t]*", re.MULTILINE)
    _options = re.compile(r"^Answer[A-D]:[ \t]*(.*)$", re.MULTILINE)
    _lettered = re.compile(r"^Answer([A-D]):[ \t]*(.*)$", re.MULTILINE)
    #: every option label of a question, whatever its letter
    _labels = re.compile(r"^Answer([A-Z])(?![A-Za-z0-9])", re.MULTILINE)
    #: a letter stated as the answer: "the answer is C", "answer: (c)", "answer is: AnswerC"
    _stated = re.compile(r"\b[Aa]nswer(?:\s+is\b|\s*:)[\s:*\"'(\[]*(?:Answer)?([A-Da-d])\b")
    #: a letter the text opens with: "B", "(b)", "**C**", "AnswerD: ...", "Option B"
    _opening = re.compile(r"[\s*_\"'(\[]*(?:(?:Answer|Option)[ \t]*)?([A-Da-d])\b")
    _letter = re.compile(r"(?:\bAnswer|\bOption[ \t]*|\b)([A-D])\b")
    _word = re.compile(r"[ \t]+([a-z]+)")  #: a lower-case word next
    #: words after a capital "A" that make it a letter, not the article ("A is correct")
    _verbs = frozenset("is was would seems should must fits matches because since as".split())
    _label = re.compile(r"(?:Answer|Option)[ \t]*\Z")  #: "AnswerA", "Option A"
    #: a line that lists an option ("A: lions", "AnswerB) ...", "C. bunnies")
    _listed = re.compile(r"^[ \t]*(?:Answer)?([A-D])[ \t]*[:.)]", re.MULTILINE)

    def normalize_question(self, question: str) -> str:
        return self._option.sub(r"Answer\1: ", question)

    def check_question(self, question: str) -> str | None:
        labels = self._labels.findall(question)
        options = self._lettered.findall(question)
        if sorted(labels) != list(self.choices) or len(options) != len(labels):
            return ("options must be lines AnswerA to AnswerD, each once; found "
                    + (", ".join(f"Answer{x}" for x in labels) or "none"))
        empty = [f"Answer{x}" for x, text in options if not text.strip()]
        return f"empty option {', '.join(empty)}" if empty else None

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

    def _article(self, text: str, letter: re.Match[str], stated: bool = False) -> bool:
        """Whether a letter "a"/"A" is the article, not an answer: followed by a lower-case
        word ("A plant", "the answer is a plant"), unless it is a capital "A" stated as the
        answer, labelled ("AnswerA the ...", "Option A") or followed by a verb or conjunction
        ("A is correct", "A because ...")."""
        word = self._word.match(text, letter.end(1))
        if letter.group(1) not in "Aa" or word is None:
            return False
        if letter.group(1) == "a":
            return True
        labelled = self._label.search(text, letter.start(), letter.start(1)) is not None
        return not (stated or labelled or word.group(1) in self._verbs)

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        # the last stated answer ("the answer is C"), else a letter the text opens with, else
        # the first capital A-D standing alone; never the article "A", nor a letter on a line
        # of a listing of the options (a text that lists them all answers nothing)
        lines = {m.start(): m.group(1) for m in self._listed.finditer(text)}  # at line starts
        listing = len(set(lines.values())) > 1

        def listed(m: re.Match[str]) -> bool:
            return listing and text.rfind("\n", 0, m.start(1)) + 1 in lines

        stated = [m for m in self._stated.finditer(text) if not self._article(text, m, True)]
        opening = self._opening.match(text)
        if stated:
            found = stated[-1]
        elif opening and not self._article(text, opening) and not listed(opening):
            found = opening
        else:
            found = next((m for m in self._letter.finditer(text)
                          if not self._article(text, m) and not listed(m)), None)
        if found is None:
            return None
        return found.group(1).upper(), found.start(1), found.end(1)

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
