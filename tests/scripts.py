"""Repository scripts that are not part of the package (docs/hooks, results/*), imported by
the tests as modules from their paths."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str) -> ModuleType:
    """The module of the script at `path`, relative to the repository root (executed once per
    call, under the script's file name)."""
    file = ROOT / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
