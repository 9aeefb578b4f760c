"""Strategies of your own at the command line (`starlora.plugins`): a module named in
$STARLORA_PLUGINS or by a ``starlora.plugins`` entry point is imported before any config is
read, so the CLI reads runs made with its strategy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from starlora.config import dump_config, load_config

PLUGIN = '''
import numpy as np
from starlora.acquisition import QueryStrategy, register_strategy


class ShortFirst(QueryStrategy):
    needs = ("answer_tokens",)

    def __init__(self, name):
        self.name = name

    def utility(self, scores, *, n, query_index, rng):
        return -np.asarray(scores["answer_tokens"], float)


@register_strategy("short-first")
def make(name, options):
    return ShortFirst(name)
'''


def starlora(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "starlora", *args], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_a_run_of_your_own_strategy_opens_with_its_plugin_named(tmp_path: Path) -> None:
    """A run directory whose config names a strategy of your own: `starlora status` refuses
    it as unknown without the plugin, and reads it with the module named in $STARLORA_PLUGINS
    or by an installed package's entry point; a plugin that cannot be imported is named."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_strategies.py").write_text(PLUGIN)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = f"import sys; sys.path.insert(0, {str(tmp_path / 'mine')!r}); import my_strategies"
    subprocess.run([sys.executable, "-c", code + "; from starlora.config import load_config; "
                    "load_config(None, ['active_learning.strategy=short-first'])"], check=True)
    config = load_config(None)  # written as a run of that strategy would be (not validated)
    mine = config.active_learning.model_copy(update={"strategy": "short-first"})
    (run_dir / "config.yaml").write_text(
        dump_config(config.model_copy(update={"active_learning": mine})))
    bare = starlora("status", str(run_dir))
    assert bare.returncode == 2 and "unknown strategy 'short-first'" in bare.stderr
    by_env = starlora("status", str(run_dir), STARLORA_PLUGINS="my_strategies",
                      PYTHONPATH=str(tmp_path / "mine"))
    assert by_env.returncode == 0, by_env.stderr
    assert "strategy:   short-first" in by_env.stdout
    site = tmp_path / "site"  # an installed package's metadata, with its entry point
    (site / "mine-0.1.dist-info").mkdir(parents=True)
    (site / "mine-0.1.dist-info" / "METADATA").write_text("Name: mine\nVersion: 0.1\n")
    (site / "mine-0.1.dist-info" / "entry_points.txt").write_text(
        "[starlora.plugins]\nmine = my_strategies\n")
    by_entry_point = starlora("status", str(run_dir),
                              PYTHONPATH=os.pathsep.join([str(site), str(tmp_path / "mine")]))
    assert by_entry_point.returncode == 0, by_entry_point.stderr
    broken = starlora("status", str(run_dir), STARLORA_PLUGINS="no_such_module")
    assert broken.returncode == 2
    assert ("plugin 'no_such_module' (starlora.plugins entry point or $STARLORA_PLUGINS) "
            "cannot be imported: ModuleNotFoundError") in broken.stderr
