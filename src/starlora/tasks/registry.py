"""Tasks by name: the built-in ones and any registered with `register_task`."""

from __future__ import annotations

from typing import Any

from starlora.errors import ConfigError
from starlora.tasks.base import Task
from starlora.tasks.builtin import GSM8K, OBQA, BoolQ, JSONLTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (GSM8K, BoolQ, OBQA, JSONLTask)}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator that makes a task available by its `name` in configs and the CLI.

    The class is a `Task` with a `name` of its own that implements ``gold`` (the canonical
    final answer of a gold answer) and ``_answer`` (that answer and its span in generated
    text); a class that is not is a TypeError saying what is missing. A name taken by
    another class is a ValueError (a built-in would otherwise be replaced without a word);
    the same class, or one of the same module and name (code run again), registers again."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task: {cls!r} is not a Task subclass")
    if "name" not in vars(cls):
        raise TypeError(f"register_task: {cls.__name__} has no name of its own "
                        "(name = \"...\": what configs call it)")
    missing = [m for m in ("gold", "_answer") if getattr(cls, m) is getattr(Task, m)]
    if missing:
        raise TypeError(f"register_task: {cls.__name__} does not implement "
                        f"{', '.join(missing)} (see Task.gold and Task._answer)")
    taken = TASKS.get(cls.name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (
            cls.__module__, cls.__qualname__):
        raise ValueError(f"register_task: task {cls.name!r} is taken by "
                         f"{taken.__module__}.{taken.__qualname__}")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name (``gsm8k``, ``boolq``, ``obqa``, ``jsonl``, ``arith``, ``calendar``...)."""
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](**options)
