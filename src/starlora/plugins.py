"""Strategies and tasks of your own for the command line: the modules that register them.

A strategy (`starlora.acquisition.register_strategy`) or task (`starlora.tasks.register_task`)
is known once the module that registers it is imported. Python code imports it itself; the
``starlora`` command imports, before it reads any config:

* every module named by an entry point of the group ``starlora.plugins`` of an installed
  package (its pyproject.toml: ``[project.entry-points."starlora.plugins"]`` ``mine =
  "mypackage.strategies"``);
* every module named in ``$STARLORA_PLUGINS`` (comma-separated import names, found on
  ``sys.path``/``PYTHONPATH``), for code that is not a package.

So ``starlora run``, ``status``, ``report`` and the rest read and resume runs made with them.
A module that cannot be imported is a `StarloraError` naming it.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from starlora.errors import StarloraError

#: the entry-point group of installed packages' plugin modules
GROUP = "starlora.plugins"
#: the environment variable naming plugin modules
ENV = "STARLORA_PLUGINS"


def load_plugins() -> list[str]:
    """Import the plugin modules (see the module docstring), in that order; their names."""
    names = [ep.value.split(":")[0] for ep in entry_points(group=GROUP)]
    names += [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # a plugin's own error, or not found: say which plugin
            raise StarloraError(f"plugin {name!r} ({GROUP} entry point or ${ENV}) cannot be "
                                f"imported: {type(e).__name__}: {e}") from None
    return names
