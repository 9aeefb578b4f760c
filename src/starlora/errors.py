"""Typed errors. Every error a user can cause is a `StarloraError`: the CLI prints its message
on one line and exits with status 2, without a traceback."""

from __future__ import annotations


class StarloraError(Exception):
    """Base class for errors caused by user input (bad data, bad config, missing model...)."""

    exit_code = 2


class DataError(StarloraError):
    """A data file is malformed. The message reads ``file:line: field: what is wrong``."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


class ConfigError(StarloraError):
    """A config file or a ``--set`` override is invalid; the message names the key."""


class DiskFullError(StarloraError):
    """A write ran out of space (ENOSPC, or a disk quota: EDQUOT). The file it was writing is
    left as it was (`starlora.io.atomic_write`), so the command can be run again once there
    is space."""


class LockTimeoutError(StarloraError):
    """Another process held a run directory's lock for longer than the caller would wait."""


class QueryClosedError(StarloraError):
    """An answer came for a query that the run has already closed (it went on without it)."""


class ModelNotFoundError(StarloraError):
    """A model name is neither a built-in, a local folder, nor reachable on the Hub."""


class PoolExhaustedError(StarloraError):
    """The unlabelled pool has fewer examples left than a query asks for (or none at all)."""


class QuerySizeError(ConfigError):
    """A strategy was asked for k <= 0 examples (a query size, or a budget already spent)."""


class EmptyPoolError(PoolExhaustedError):
    """A strategy was asked to rank an empty pool."""


class ScorerFallbackWarning(RuntimeWarning):
    """The fast scorer disagreed with the model's own ``forward(...).logits`` on a check
    example, so `starlora.scoring.score_examples` computed the call with the plain forward
    path (correct, slower). The message names the model class and both values."""
