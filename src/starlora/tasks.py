"""Tasks: how a record becomes a prompt, what its gold answer is, and how a generation is graded.

A `Task` is a small object with no model inside. It knows

* how to turn an `Example` into prompt text (a plain template, or the tokenizer's chat template
  for instruct models) and into the answer text that training supervises;
* how to extract a final answer from generated text (`extract`), where in the text that answer
  is (`extract_span`, the characters evaluation takes the answer's confidence from), the final
  answer of a gold answer text (`gold`), and whether the two agree (`is_correct`);
* for tasks with a fixed answer set (boolq, obqa), the answer text of every choice, so that
  evaluation can score choices by log-likelihood.

Data comes from local JSONL files, one object per line. Bad lines raise `DataError` with
``file:line: field: what is wrong``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from starlora.errors import ConfigError, DataError

PromptStyle = Literal["plain", "chat"]


@dataclass(frozen=True)
class Example:
    """One record of a task.

    `id` is stable across runs: the record's own ``id`` field when it has one, otherwise
    derived from its line number and content (see `derive_id`). `answer` is the gold answer
    text exactly as in the data (for gsm8k the whole worked solution).
    """

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def derive_id(line: int, question: str, answer: str) -> str:
    """Id for a record without one: position plus a content hash, e.g. ``L000012-3f9a0c1d``.

    The position keeps genuinely duplicated records apart; the hash makes a changed file
    show up as changed ids rather than silently relabelling other records.
    """
    digest = hashlib.sha1(f"{question}\x1f{answer}".encode()).hexdigest()[:8]
    return f"L{line:06d}-{digest}"


_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")


def parse_number(text: str) -> str | None:
    """Canonical form of a number written as ``$1,000``, ``-3``, ``2.50``, ``.5``; None if none.

    The canonical form drops ``$``, thousands separators, trailing zeros of decimals and a
    trailing ``.``: ``"1,000.50" -> "1000.5"``, ``"-0.0" -> "0"``.
    """
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value).rstrip("0").rstrip(".")


def _number_answer(number: re.Match[str]) -> tuple[str, int, int] | None:
    """(canonical number, start, end) of a `_NUMBER` match, the whitespace the match
    may start with left out of the span; None if it does not parse."""
    value = parse_number(number.group(0))
    if value is None:
        return None
    written = number.group(0)
    return value, number.start() + len(written) - len(written.lstrip()), number.end()


class Task:
    """Base class. Subclasses set `name` and override `gold`, `_answer` and maybe the rest.

    `_answer` is the one place that reads a generation: `extract` and `extract_span` both
    return parts of its result, so the answer graded and the characters it was read from
    cannot disagree.

    Args:
        prompt_style: ``"plain"`` renders `template`; ``"chat"`` puts the rendered template in
            a user turn of the tokenizer's chat template (for instruct models).
        template: a ``str.format`` template with a ``{question}`` field.
        answer_prefix: text put before the answer in plain style (the prompt's trailing
            whitespace is moved here, so a word is tokenised as it would be mid-sentence).
    """

    name: str = "task"
    default_template: str = "{question}"
    #: canonical labels of a fixed answer set, or None for open answers
    choices: tuple[str, ...] | None = None

    def __init__(
        self,
        prompt_style: PromptStyle = "plain",
        template: str | None = None,
        answer_prefix: str = " ",
    ):
        if prompt_style not in ("plain", "chat"):
            raise ConfigError(f"task.prompt_style: must be 'plain' or 'chat', got {prompt_style!r}")
        self.prompt_style = prompt_style
        self.template = template if template is not None else self.default_template
        if "{question}" not in self.template:
            raise ConfigError("task.template: must contain '{question}'")
        self.answer_prefix = answer_prefix

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prompt_style={self.prompt_style!r})"

    # -- data ---------------------------------------------------------------------------------
    def normalize_question(self, question: str) -> str:
        """Hook for tasks whose splits write the same thing differently (see obqa)."""
        return question

    def check_answer(self, answer: str) -> str | None:
        """Problem with a gold answer text (used while loading), or None if it is fine."""
        return None if self.gold(answer) is not None else "cannot extract a final answer"

    def generate(self, split: str, n: int, seed: int) -> list[Example] | None:
        """Synthetic tasks make their own data (``split`` is ``"train"`` or ``"test"``);
        file-backed tasks return None and are read with `load_examples`."""
        return None

    # -- prompts ------------------------------------------------------------------------------
    def prompt(self, ex: Example, tokenizer: Any = None) -> str:
        """Prompt text for `ex`; chat style needs the tokenizer for its chat template."""
        text = self.template.format(question=ex.question)
        if self.prompt_style == "plain":
            return text.rstrip()
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "task.prompt_style: 'chat' needs a tokenizer with a chat template; "
                "this model has none (use prompt_style: plain)"
            )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def target(self, answer: str) -> str:
        """The text that training supervises after the prompt, for a gold or choice answer."""
        return (self.answer_prefix if self.prompt_style == "plain" else "") + answer.strip()

    def choice_answers(self, ex: Example) -> list[str] | None:
        """Answer texts for each of `choices`, in the same order (None for open tasks)."""
        return None

    def encode(
        self, tokenizer: Any, ex: Example, answer: str | None = None, add_eos: bool = True
    ) -> tuple[list[int], list[int]]:
        """Token ids of (prompt, answer) tokenised separately, answer = gold unless given.

        Training supervises exactly ``prompt_ids + answer_ids``; scoring measures the same
        sequence. The answer ends with EOS (when the tokenizer has one and `add_eos`) so that a
        trained model learns to stop.
        """
        prompt_text = self.prompt(ex, tokenizer)
        special = self.prompt_style == "plain"  # a chat template already holds its specials
        prompt_ids = tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
        answer_ids = tokenizer(
            self.target(ex.answer if answer is None else answer), add_special_tokens=False
        )["input_ids"]
        if add_eos and tokenizer.eos_token_id is not None:
            answer_ids = answer_ids + [tokenizer.eos_token_id]
        return list(prompt_ids), list(answer_ids)

    # -- grading ------------------------------------------------------------------------------
    def gold(self, answer: str) -> str | None:
        """Canonical final answer from a gold answer text."""
        raise NotImplementedError

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        """(canonical final answer, start, end) read from generated `text`, or None if there is
        none; ``text[start:end]`` are the characters the answer was read from."""
        raise NotImplementedError(f"task {self.name!r}: _answer is not implemented")

    def extract(self, text: str) -> str | None:
        """Canonical final answer from generated text, or None if there is none."""
        found = self._answer(text)
        return found[0] if found is not None else None

    def extract_span(self, text: str) -> tuple[int, int] | None:
        """Character offsets ``(start, end)`` into `text` of the final answer that `extract`
        reads (``extract(text)`` is the canonical form of ``text[start:end]``), or None
        exactly when `extract` gives None."""
        found = self._answer(text)
        return (found[1], found[2]) if found is not None else None

    def is_correct(self, prediction: str | None, gold: str | None) -> bool:
        return prediction is not None and prediction == gold


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

    def normalize_question(self, question: str) -> str:
        return self._option.sub(r"Answer\1: ", question)

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


TASKS: dict[str, type[Task]] = {t.name: t for t in (GSM8K, BoolQ, OBQA, JSONLTask)}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator that makes a task available by its `name` in configs and the CLI."""
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name (``gsm8k``, ``boolq``, ``obqa``, ``jsonl``, ``arith``...)."""
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](**options)


def load_examples(
    path: str | Path,
    task: Task,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str = "id",
    limit: int | None = None,
    dedupe: bool = False,
) -> list[Example]:
    """Read a JSONL file into validated `Example`s.

    Every line must be a JSON object whose question and answer fields are non-empty strings
    (an ``id`` may be a string or an integer). Any problem raises `DataError` naming the file,
    line and field; so do two records with the same id. With `dedupe`, a record whose
    question and answer repeat an earlier one's is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "no such file")
    examples: list[Example] = []
    seen_ids: dict[str, int] = {}
    seen_content: set[tuple[str, str]] = set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    str(path), lineno, None, f"not valid UTF-8 (byte {e.start})"
                ) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(str(path), lineno, None, f"not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(str(path), lineno, None, "not a JSON object")
            values = {}
            for name in (question_field, answer_field):
                if name not in record:
                    raise DataError(str(path), lineno, name, "missing")
                value = record[name]
                if not isinstance(value, str):
                    raise DataError(
                        str(path), lineno, name, f"must be a string, got {type(value).__name__}"
                    )
                if not value.strip():
                    raise DataError(str(path), lineno, name, "empty")
                values[name] = value
            question = task.normalize_question(values[question_field])
            answer = values[answer_field]
            problem = task.check_answer(answer)
            if problem:
                raise DataError(str(path), lineno, answer_field, f"{problem}: {answer[:60]!r}")
            if id_field in record:
                rid = record[id_field]
                if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
                    raise DataError(str(path), lineno, id_field, "must be a non-empty string or int")
                rid = str(rid)
            else:
                rid = derive_id(lineno, question, answer)
            if rid in seen_ids:
                raise DataError(
                    str(path), lineno, id_field, f"duplicate id {rid!r} (first on line {seen_ids[rid]})"
                )
            if dedupe:
                key = (" ".join(question.split()), answer.strip())
                if key in seen_content:
                    continue
                seen_content.add(key)
            seen_ids[rid] = lineno
            examples.append(Example(rid, question, answer, {"source": f"{path}:{lineno}"}))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise DataError(str(path), None, None, "no records")
    return examples


@register_task
class ArithTask(GSM8K):
    """Synthetic arithmetic word problems (1 to 3 steps of + - x on small integers), made
    from a seed so that the demo needs no data files.

    Worked answers are deliberately regular, e.g. ``"12 + 5 = 17. 17 - 3 = 14.\\n#### 14"``,
    so that a small model can learn the format quickly while 3-step items stay hard. Grading
    is gsm8k's. ``meta["expression"]`` holds the problem as a Python expression and
    ``meta["steps"]`` its number of operations.

    A question belongs to the test split iff a hash of its text falls in the first fifth of
    the hash range, so train and test never share a question whatever the seeds.
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
    def _split_of(question: str) -> str:
        return "test" if hashlib.sha1(question.encode()).digest()[0] < 52 else "train"

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
            if question in seen or self._split_of(question) != split:
                continue
            seen.add(question)
            meta = {"expression": expr, "steps": n_steps}
            examples.append(Example(f"arith-{split}-{len(examples):06d}", question, answer, meta))
        if len(examples) < n:
            raise ConfigError(f"task: cannot generate {n} distinct arith problems")
        return examples
