"""Tasks: how a record becomes a prompt, what its gold answer is, and how a generation is graded.

A `Task` is a small object with no model inside. It knows

* how to turn an `Example` into prompt text (a plain template, or the tokenizer's chat template
  for instruct models) and into the answer text that training supervises;
* how to extract a final answer from generated text (`extract`) and from the gold answer text
  (`gold`), and whether the two agree (`is_correct`);
* for tasks with a fixed answer set (boolq, obqa), the answer text of every choice, so that
  evaluation can score choices by log-likelihood.

Data files are read by `starlora.datafiles`.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from starlora.errors import ConfigError

PromptStyle = Literal["plain", "chat"]


@dataclass(frozen=True)
class Example:
    """One record of a task.

    `id` is stable across runs: the record's own ``id`` field when it has one, otherwise
    derived from its line number and content (`starlora.datafiles.derive_id`). `answer` is the
    gold answer text exactly as in the data (for gsm8k the whole worked solution), or None in
    an unlabelled pool.
    """

    id: str
    question: str
    answer: str | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")


def _fold(text: str) -> str:
    """Case and white space folded: ``"  The  Sun\n" -> "the sun"``."""
    return " ".join(text.split()).casefold()


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


class Task:
    """Base class. Subclasses set `name` and override `gold`, `extract` and maybe the rest.

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

    def content_key(self, ex: Example) -> str:
        """What makes two records the same item whatever their ids: the question with case and
        white space folded. Choice tasks whose options sit in the question override it so that
        the option order does not count (see OBQA). Used to keep test items out of the pool."""
        return _fold(ex.question)

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

    def prompt_ids(self, tokenizer: Any, ex: Example) -> list[int]:
        """Token ids of `ex`'s prompt, as `encode` makes them (what generation continues)."""
        special = self.prompt_style == "plain"  # a chat template already holds its specials
        return list(tokenizer(self.prompt(ex, tokenizer), add_special_tokens=special)["input_ids"])

    def encode(
        self, tokenizer: Any, ex: Example, answer: str | None = None, add_eos: bool = True
    ) -> tuple[list[int], list[int]]:
        """Token ids of (prompt, answer) tokenised separately, answer = gold unless given.

        Training supervises exactly ``prompt_ids + answer_ids``; scoring measures the same
        sequence. The answer ends with EOS (when the tokenizer has one and `add_eos`) so that a
        trained model learns to stop.
        """
        answer = ex.answer if answer is None else answer
        if answer is None:
            raise ValueError(f"example {ex.id!r} has no answer to encode")
        prompt_ids = self.prompt_ids(tokenizer, ex)
        answer_ids = tokenizer(
            self.target(answer), add_special_tokens=False
        )["input_ids"]
        if add_eos and tokenizer.eos_token_id is not None:
            answer_ids = answer_ids + [tokenizer.eos_token_id]
        return prompt_ids, list(answer_ids)

    # -- grading ------------------------------------------------------------------------------
    def gold(self, answer: str) -> str | None:
        """Canonical final answer from a gold answer text."""
        raise NotImplementedError

    def extract(self, text: str) -> str | None:
        """Canonical final answer from generated text, or None if there is none."""
        raise NotImplementedError

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

    def extract(self, text: str) -> str | None:
        for pattern in (self._final, self._stated):
            found = pattern.findall(text)
            if found:
                numbers = _NUMBER.findall(found[-1])
                if numbers:
                    return parse_number(numbers[0])
        numbers = _NUMBER.findall(text)
        return parse_number(numbers[-1]) if numbers else None

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

    def extract(self, text: str) -> str | None:
        # the first verdict a generation states is its answer; later words are often rambling
        found = self._word.findall(text)
        if not found:
            return None
        return {"true": "true", "yes": "true", "false": "false", "no": "false"}[found[0].lower()]

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

    def extract(self, text: str) -> str | None:
        found = self._letter.search(text)
        return found.group(1) if found else None

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

    def _final(self, text: str) -> str | None:
        if self._regex is not None:
            found = self._regex.search(text)
            return self._norm(found.group(1)) if found else None
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return self._norm(lines[0]) if lines else None

    def gold(self, answer: str) -> str | None:
        return self._final(answer)

    def extract(self, text: str) -> str | None:
        return self._final(text)

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


@register_task
class ArithTask(GSM8K):
    """Synthetic arithmetic word problems (1 to 3 steps of + - x on small integers), made
    from a seed so that the demo needs no data files.

    Worked answers are deliberately regular, e.g. ``"12 + 5 = 17. 17 - 3 = 14.\\n#### 14"``,
    so that a small model can learn the format quickly while 3-step items stay hard. Grading
    is gsm8k's. ``meta["expression"]`` holds the problem as a Python expression and
    ``meta["steps"]`` its number of operations.

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
