"""Tasks by name: the built-in ones and any registered with `register_task`."""

from __future__ import annotations

from typing import Any

from starlora.errors import ConfigError
from starlora.tasks.base import Task
from starlora.tasks.builtin import GSM8K, OBQA, BoolQ, JSONLTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (GSM8K, BoolQ, OBQA, JSONLTask)}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator that makes a task available by its `name` in configs and the CLI."""
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name (``gsm8k``, ``boolq``, ``obqa``, ``jsonl``, ``arith``, ``calendar``...)."""
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](**options)
