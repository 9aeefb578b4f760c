"""Typed errors. Every error a user can cause is a `StarloraError`: the CLI prints its message
on one line and exits with status 2, without a traceback."""

from __future__ import annotations


class StarloraError(Exception):
    """Base class for errors caused by user input (bad data, bad config, missing model...)."""

    exit_code = 2


#: what a data file is to a run, as a data error names it
ROLES = {"pool": "the pool, task.train", "test": "the test set, task.test",
         "labelled": "the labelled set, task.labelled"}


class DataError(StarloraError):
    """A data file is malformed. The message reads ``file:line: field: what is wrong``, and,
    for a file of a run, the file's role (`ROLES`): ``test.jsonl:3: answer: missing (the test
    set, task.test)``."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str,
                 role: str | None = None):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        self.role = role
        where = self.path if line is None else f"{self.path}:{line}"
        text = f"{where}: {field}: {problem}" if field else f"{where}: {problem}"
        super().__init__(text + (f" ({ROLES.get(role, role)})" if role else ""))

    def in_role(self, role: str | None) -> DataError:
        """The same problem, naming the file's role in the run."""
        return DataError(self.path, self.line, self.field, self.problem, role)


class DataErrors(DataError):
    """Several problems found in one check, each a `DataError` (`errors`, at most `SHOWN`;
    `more` were found beyond them). Its attributes are the first problem's; the message reads
    ``file: N problems:``, then one problem per line, then how many more."""

    SHOWN = 20

    def __init__(self, errors: list[DataError], more: int = 0):
        first = errors[0]
        self.errors, self.more = errors, more
        self.path, self.line, self.field, self.problem, self.role = (
            first.path, first.line, first.field, first.problem, first.role)
        total = len(errors) + more
        lines = [f"{first.path}: {total} problems:", *(str(e) for e in errors)]
        if more:
            lines.append(f"... and {more} more")
        StarloraError.__init__(self, "\n".join(lines))


class Problems:
    """Collects the `DataError`s of a check so that it reports all of them at once: `add`
    each, then `raise_if_any` raises the one, or `DataErrors` listing the first
    `DataErrors.SHOWN` by file and line and counting the rest."""

    def __init__(self, role: str | None = None):
        self.role = role
        self.errors: list[DataError] = []

    def add(self, error: DataError) -> None:
        self.errors.append(error.in_role(self.role) if self.role else error)

    @property
    def count(self) -> int:
        return len(self.errors)

    def __bool__(self) -> bool:
        return bool(self.errors)

    def raise_if_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            ordered = sorted(self.errors, key=lambda e: (e.path, e.line or 0))
            shown = ordered[:DataErrors.SHOWN]
            raise DataErrors(shown, len(ordered) - len(shown))


class ConfigError(StarloraError):
    """A config file or a ``--set`` override is invalid; the message names the key."""


class DiskFullError(StarloraError):
    """A write ran out of space (ENOSPC, or a disk quota: EDQUOT). The file it was writing is
    left as it was (`starlora.io.atomic_write`), so the command can be run again once there
    is space."""


class LockTimeoutError(StarloraError):
    """Another process held a run directory's lock for longer than the caller would wait."""


class RunInUseError(LockTimeoutError):
    """Another `starlora run` (its pid and host in the message) is working in the run
    directory."""


class QueryClosedError(StarloraError):
    """An answer came for a query that the run has already closed (it went on without it)."""


class LabelConflictError(StarloraError):
    """An answer was sent as a change of a saved answer the sender saw (or of none), but
    another answer, `current` (None: none), is saved to that id now; nothing was saved."""

    def __init__(self, id_: str, current: str | None):
        self.id, self.current = id_, current
        super().__init__(f"someone saved another answer to {id_!r} meanwhile, so yours was not "
                         "saved: save it again to replace theirs")


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


class LossFallbackWarning(RuntimeWarning):
    """Training's answer-only loss (`starlora.answer_loss.AnswerLoss`) disagreed with the
    model's own ``forward(labels=...).loss`` on the first batch, so the round trained through
    the model's own forward (full logits: correct, more memory). The message names the model
    class and both values."""
