"""The `Task` contract and what every task shares: `Example`, number parsing, prompts and
token ids. Concrete tasks live in `starlora.tasks.builtin` and `starlora.tasks.arith`."""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from starlora.errors import ConfigError

PromptStyle = Literal["plain", "chat"]
#: which answer of a record is scored: the model's own generation (label-free) or the gold one
AnswerSource = Literal["generated", "gold"]


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


#: a minus sign: right before the number, and not after a number (``10-5``, ``10 - 5``, where
#: it is an operator; ``5 miles - 2``, a minus followed by a space, is never a sign)
_SIGN = r"(?:(?<!\d)(?<!\d[ \t])-)?"
#: a number as a generation writes it: ``-3``, ``$1,000.50``, ``.5``; commas only as thousands
#: separators, in groups of three (``12,5`` and ``3,4`` are two numbers each)
_NUMBER = re.compile(_SIGN + r"\$?(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)(?:\.\d+)?"
                     r"|" + _SIGN + r"\$?\.\d+")


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


def _number_answer(number: re.Match[str]) -> tuple[str, int, int] | None:
    """(canonical number, start, end) of a `_NUMBER` match, the whitespace the match
    may start with left out of the span; None if it does not parse."""
    value = parse_number(number.group(0))
    if value is None:
        return None
    written = number.group(0)
    return value, number.start() + len(written) - len(written.lstrip()), number.end()


#: the assistant content `turn_end_ids` renders, to find what the chat template puts after it
_MARKER = "STARLORA_ANSWER_MARKER"
#: tokenizer -> (its chat template, `turn_end_ids`), computed once per template
_TURN_ENDS: weakref.WeakKeyDictionary[Any, tuple[str, list[int] | None]] = \
    weakref.WeakKeyDictionary()


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (EOS, BOS, the added ones marked special)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return set(getattr(tokenizer, "all_special_ids", [])) | {
        i for i, token in added.items() if getattr(token, "special", False)}


def turn_end_ids(tokenizer: Any) -> list[int] | None:
    """The token ids the tokenizer's chat template closes an assistant turn with (SmolLM2's
    ``<|im_end|>``, Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``): a user turn and an
    assistant turn are rendered, and the text after the assistant's content is tokenised up to
    and including its first special token. None when that cannot be determined (no template,
    a template that fails or drops the content, no special token after it)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    cached = _TURN_ENDS.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    found: list[int] | None = None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}],
            tokenize=False)
    except Exception:  # noqa: BLE001 - any template error: fall back to EOS
        text = ""
    if isinstance(text, str) and _MARKER in text:
        after = list(tokenizer(text[text.rindex(_MARKER) + len(_MARKER):],
                               add_special_tokens=False)["input_ids"])
        special = _special_ids(tokenizer)
        end = next((i + 1 for i, t in enumerate(after) if t in special), None)
        found = after[:end] if end is not None else None
    _TURN_ENDS[tokenizer] = (template, found)
    return found


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
        if prompt_style not in get_args(PromptStyle):
            raise ConfigError(f"task.prompt_style: must be one of {get_args(PromptStyle)}, "
                              f"got {prompt_style!r}")
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

    def check_question(self, question: str) -> str | None:
        """Problem with a question text as `normalize_question` leaves it (used while loading),
        or None if it is fine. Choice tasks whose options sit in the question check them."""
        return None

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

    def raw_prompt_note(self, tokenizer: Any) -> str | None:
        """A note for a run whose open-answer prompts go in as their bare text (plain style,
        the ``{question}`` template) to a model with a chat template, such as an instruct
        model, which then tends to continue the text rather than answer it; else None."""
        if (self.choices is None and self.prompt_style == "plain"
                and self.template == Task.default_template  # the bare question
                and getattr(tokenizer, "chat_template", None)):
            return ("the prompts go in as their bare text, and this model has a chat template "
                    "(an instruct model?): set task.prompt_style: chat for its turn format, "
                    "or task.template for a plain cue such as 'Q: {question}\\nA:'")
        return None

    def target(self, answer: str) -> str:
        """The text that training supervises after the prompt, for a gold or choice answer."""
        return (self.answer_prefix if self.prompt_style == "plain" else "") + answer.strip()

    def choice_answers(self, ex: Example) -> list[str] | None:
        """Answer texts for each of `choices`, in the same order (None for open tasks)."""
        return None

    def prompt_ids(self, tokenizer: Any, ex: Example, max_length: int | None = None) -> list[int]:
        """Token ids of `ex`'s prompt, as `encode` makes them (what generation continues), cut
        on the left to its last `max_length` tokens when given."""
        special = self.prompt_style == "plain"  # a chat template already holds its specials
        ids = list(tokenizer(self.prompt(ex, tokenizer), add_special_tokens=special)["input_ids"])
        return ids[-max_length:] if max_length else ids

    def encode(
        self, tokenizer: Any, ex: Example, answer: str | None = None, add_eos: bool = True
    ) -> tuple[list[int], list[int]]:
        """Token ids of (prompt, answer) tokenised separately, answer = gold unless given.

        Training supervises exactly ``prompt_ids + answer_ids``; scoring measures the same
        sequence. With `add_eos` the answer is closed (`answer_end_ids`) so that a trained
        model learns to stop.
        """
        answer = ex.answer if answer is None else answer
        if answer is None:
            raise ValueError(f"example {ex.id!r} has no answer to encode")
        prompt_ids = self.prompt_ids(tokenizer, ex)
        answer_ids = tokenizer(
            self.target(answer), add_special_tokens=False
        )["input_ids"]
        if add_eos:
            answer_ids = list(answer_ids) + self.answer_end_ids(tokenizer)
        return prompt_ids, list(answer_ids)

    def answer_end_ids(self, tokenizer: Any) -> list[int]:
        """The tokens that close an answer: in chat style those the chat template closes an
        assistant turn with (`turn_end_ids`: the end-of-turn token an instruct model stops
        at), else, and in plain style, the tokenizer's EOS ([] when it has none)."""
        if self.prompt_style == "chat" and (ends := turn_end_ids(tokenizer)) is not None:
            return ends
        return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

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
        """Whether an extracted final answer equals the gold one (both canonical forms)."""
        return prediction is not None and prediction == gold
