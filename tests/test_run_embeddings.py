"""Strategies on embeddings in the loop: the embedding work resumes exactly after SIGKILL, and
the selections are the strategies' own on the stored embeddings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_run_loop import TINY, outputs

from starlora.acquisition import make_strategy
from starlora.config import load_config
from starlora.io import read_jsonl
from starlora.run.loop import run_experiment
from starlora.run.protocol import stream
from starlora.run.store import RunStore

#: a run whose embedding cache writes chunks of 16 prompts (the pool has 48: 3 chunks), and
#: that dies by SIGKILL (KILL_AT) right after the second chunk is on disk ("embedding"), or
#: the moment the strategy starts selecting ("select")
CHILD = (
    "import os, signal, sys\n"
    "from starlora import acquisition\n"
    "from starlora.scoring import embeddings\n"
    "kill = os.environ.get('KILL_AT')\n"
    "init, write = embeddings.EmbeddingCache.__init__, embeddings.EmbeddingCache._write\n"
    "def small(self, directory, key, chunk_size=0): init(self, directory, key, 16)\n"
    "def write_then_die(self, keys, values):\n"
    "    write(self, keys, values)\n"
    "    if kill == 'embedding' and len(list(self.folder.glob('*.safetensors'))) == 2:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "def die(*args, **kwargs): os.kill(os.getpid(), signal.SIGKILL)\n"
    "embeddings.EmbeddingCache.__init__ = small\n"
    "embeddings.EmbeddingCache._write = write_then_die\n"
    "if kill == 'select': acquisition.QueryStrategy.select_rows = die\n"
    "from starlora.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def child(run_dir: Path, cache: Path, kill: str | None, overrides: list[str]) -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1", STARLORA_CACHE=str(cache))
    env.pop("KILL_AT", None)
    if kill:
        env["KILL_AT"] = kill
    args = ["run", str(TINY), "--run-dir", str(run_dir)] + [f"--set={o}" for o in overrides]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True)
    assert kill or proc.returncode == 0, proc.stderr.decode()[-2000:]
    return proc.returncode


def in_this_process(monkeypatch: pytest.MonkeyPatch, run_dir: Path, cache: Path,
                    overrides: list[str]) -> None:
    """`child`'s run without a kill, in this process: the same cache and chunks of 16."""
    from starlora.cli import main
    from starlora.scoring import embeddings

    init = embeddings.EmbeddingCache.__init__
    with monkeypatch.context() as patch:
        patch.setenv("STARLORA_CACHE", str(cache))
        patch.setattr(embeddings.EmbeddingCache, "__init__",
                      lambda self, directory, key, chunk_size=0: init(self, directory, key, 16))
        args = ["run", str(TINY), "--run-dir", str(run_dir)] + [f"--set={o}" for o in overrides]
        assert main(args) == 0


@pytest.mark.slow
def test_sigkill_while_embedding_and_before_selecting_resumes_to_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kills happen in child processes; the reference and the last resume run in this
    one (two process starts fewer), with the children's cache chunks of 16. 4 test problems:
    what is checked is the pool's embeddings and what is selected from them."""
    typiclust = ["active_learning.strategy=typiclust", "task.test_size=4"]
    reference = tmp_path / "reference"
    in_this_process(monkeypatch, reference, tmp_path / "cache-ref", typiclust)
    assert len(list((tmp_path / "cache-ref" / "embeddings").rglob("*.safetensors"))) == 3
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    # killed with two of the three chunks embedded: no embeddings file yet, two chunks cached
    assert child(run_dir, cache, "embedding", typiclust) == -signal.SIGKILL
    assert json.loads((run_dir / "state.json").read_text())["phase"] == "evaluate"
    assert not (run_dir / "embeddings.safetensors").exists()
    assert len(list((cache / "embeddings").rglob("*.safetensors"))) == 2
    # killed again after the score phase: the embeddings are stored, nothing selected yet
    assert child(run_dir, cache, "select", typiclust) == -signal.SIGKILL
    assert json.loads((run_dir / "state.json").read_text())["phase"] == "score"
    assert (run_dir / "embeddings.safetensors").is_file()
    assert len(list((cache / "embeddings").rglob("*.safetensors"))) == 3
    in_this_process(monkeypatch, run_dir, cache, typiclust)
    assert outputs(run_dir) == outputs(reference)
    assert (run_dir / "embeddings.safetensors").read_bytes() == \
        (reference / "embeddings.safetensors").read_bytes()
    rows = read_jsonl(run_dir / "rounds/0/selected.jsonl")
    assert len(rows) == 8 and all(r["utility"] > 0 for r in rows)


@pytest.mark.slow
def test_a_strategy_made_diverse_selects_from_the_stored_scores_and_embeddings(
    tmp_path: Path,
) -> None:
    overrides = ["active_learning.strategy=pe-dynamic", "active_learning.diversity=kmeans",
                 "active_learning.diversity_pool=3", "task.test_size=4"]  # (not evaluated here)
    cfg = load_config(TINY, overrides)
    store = run_experiment(cfg, tmp_path / "run", progress=False)
    scores = store.read_round(0, "scores.jsonl")
    assert set(scores[0]) == {"id", "pe", "pe_passes", "pe_base", "answer"}
    ids, values = RunStore.open(tmp_path / "run").embeddings()
    assert values.dtype == np.float32 and values.shape == (48, 64) and len(ids) == 48
    row = {i: n for n, i in enumerate(ids)}
    table = {c: np.array([r[c] for r in scores]) for c in ("pe", "pe_base")}
    table["embedding"] = values[[row[r["id"]] for r in scores]]
    strategy = make_strategy("pe-dynamic", n_queries=1, diversity="kmeans", diversity_pool=3)
    selected = read_jsonl(tmp_path / "run/rounds/0/selected.jsonl")
    assert [r["id"] for r in selected] == strategy.select(
        [r["id"] for r in scores], table, 8, query_index=0, rng=stream(cfg.seed, 0, "select"))
    assert selected[0]["lambda"] == 0.9 and {"u_base", "u_full"} <= set(selected[0])
    assert [m["n_labelled"] for m in store.metrics()] == [8, 16]
