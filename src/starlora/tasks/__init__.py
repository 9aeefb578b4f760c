"""Tasks: how a record becomes a prompt, what its gold answer is, and how a generation is graded.

A `Task` is a small object with no model inside. It knows

* how to turn an `Example` into prompt text (a plain template, or the tokenizer's chat template
  for instruct models) and into the answer text that training supervises;
* how to extract a final answer from generated text (`extract`), where in the text that answer
  is (`extract_span`, the characters evaluation takes the answer's confidence from), the final
  answer of a gold answer text (`gold`), and whether the two agree (`is_correct`);
* for tasks with a fixed answer set (boolq, obqa), the answer text of every choice, so that
  evaluation can score choices by log-likelihood.

Data files are read by `starlora.datafiles`.
"""

from starlora.tasks.arith import ArithTask  # noqa: E402 - registers itself
from starlora.tasks.base import AnswerSource, Example, PromptStyle, Task, parse_number
from starlora.tasks.builtin import GSM8K, OBQA, BoolQ, JSONLTask
from starlora.tasks.calendar import CalendarTask  # noqa: E402 - registers itself
from starlora.tasks.registry import TASKS, get_task, register_task

__all__ = [
    "GSM8K", "OBQA", "TASKS", "AnswerSource", "ArithTask", "BoolQ", "CalendarTask", "Example", "JSONLTask", "PromptStyle",
    "Task", "get_task", "parse_number", "register_task",
]
