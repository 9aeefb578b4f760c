"""Library warnings a user of the command line can do nothing about, and the block that
silences them (`starlora.cli` runs every command inside it)."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

#: library warnings a user of the command line can do nothing about: (logger or warning
#: category, start of the message). DeepSpeed logs the first on every CPU start; peft calls a
#: transformers property that transformers 5 deprecated.
LIBRARY_NOISE = (
    ("DeepSpeed", "Setting accelerator to CPU"),
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
)


def _not_noise(record: logging.LogRecord) -> bool:
    """A logging filter: False (drop) for a `LIBRARY_NOISE` record."""
    return not any(record.name == who and record.getMessage().startswith(text)
               for who, text in LIBRARY_NOISE if isinstance(who, str))


@contextlib.contextmanager
def library_noise_silenced() -> Iterator[None]:
    """Within the block, drop the `LIBRARY_NOISE` warnings and log records; everything else,
    and everything after the block, is untouched."""
    loggers = {logging.getLogger(who) for who, _ in LIBRARY_NOISE if isinstance(who, str)}
    with warnings.catch_warnings():
        for who, text in LIBRARY_NOISE:
            if not isinstance(who, str):
                warnings.filterwarnings("ignore", message=re.escape(text), category=who)
        for logger in loggers:
            logger.addFilter(_not_noise)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(_not_noise)
