"""Every seed starlora draws, in one place: the random streams of a run and the streams derived
from them. `starlora.run.protocol` re-exports `STREAMS`, `stream` and `phase_seed` as part of
a run's identity; this module sits in the bottom layer so that training (layer 3) draws from
the same owner.

* A run's streams (`STREAMS`, `stream`, `phase_seed`): one independent stream per (seed,
  round, phase), from NumPy's `SeedSequence`, so that no phase's draws depend on how much
  another phase drew, and a phase redone after a kill draws exactly what it drew the first
  time.
* Streams derived within a phase from its seed: the batches of each training epoch
  (`epoch_stream`) and each process's dropout seed (`process_seed`).
* The data subsets (`SUBSETS`, `subset_stream`): seeded by ``task.subset_seed``, not by the
  run's seed, so every run of a comparison has the same pool and test split.

The derived and subset streams reproduce the numbers drawn before this module owned them
(``default_rng([seed, epoch])``, ``seed + 1_000_003 * rank``, ``default_rng(subset_seed)`` for
the pool and ``default_rng(subset_seed + 1)`` for the test split), so committed runs are
unchanged.
"""

from __future__ import annotations

import numpy as np

#: the random streams of a run; the number is part of the stream's entropy (never reuse one)
STREAMS = {
    "initial": 1,  # the initial labelled set (round 0)
    "train": 2,  # torch seed of training: LoRA init, batch order, dropout
    "score": 3,  # base seed of the MC-dropout masks when scoring the pool
    "subsample": 4,  # which unlabelled examples are scored (active_learning.pool_subsample)
    "select": 5,  # the strategy's draws: tie-breaking, and `random`'s utility
    "evaluate": 6,  # the self-consistency samples of the test items (evaluation.samples)
    "stop_set": 7,  # the stop set: pool items never selected (active_learning.stop_set)
}
#: the data subsets (``task.pool_size``, ``task.test_size``): offsets added to subset_seed
SUBSETS = {"pool": 0, "test": 1}
#: the step between the dropout seeds of two processes training one adapter
PROCESS_SEED_STEP = 1_000_003


def stream(seed: int, round_: int, phase: str) -> np.random.Generator:
    """The NumPy generator of `phase` in `round_` of a run with `seed` (phases: `STREAMS`)."""
    return np.random.default_rng(_entropy(seed, round_, phase))


def phase_seed(seed: int, round_: int, phase: str) -> int:
    """An integer seed in [0, 2^32) for `phase` in `round_` (torch, NumPy's legacy global
    seed that accelerate's ``set_seed`` also sets, and the MC masks)."""
    return int(np.random.SeedSequence(_entropy(seed, round_, phase)).generate_state(1)[0])


def epoch_stream(seed: int, epoch: int) -> np.random.Generator:
    """The generator of training epoch `epoch`'s batches, from the training `seed`."""
    return np.random.default_rng([seed, epoch])


def process_seed(seed: int, rank: int) -> int:
    """The torch seed of process `rank`'s dropout masks when several processes train one
    adapter from the training `seed` (rank 0: `seed` itself)."""
    return seed + PROCESS_SEED_STEP * rank


def subset_stream(subset_seed: int, split: str) -> np.random.Generator:
    """The generator that picks the ``task.pool_size``/``test_size`` subset of `split`
    (``"pool"`` or ``"test"``, `SUBSETS`)."""
    if split not in SUBSETS:
        raise KeyError(f"unknown subset {split!r}; known: {', '.join(SUBSETS)}")
    return np.random.default_rng(subset_seed + SUBSETS[split])


def _entropy(seed: int, round_: int, phase: str) -> list[int]:
    if phase not in STREAMS:
        raise KeyError(f"unknown random stream {phase!r}; known: {', '.join(STREAMS)}")
    if seed < 0 or round_ < 0:
        raise ValueError(f"seed and round must be >= 0, got {seed}, {round_}")
    return [seed, round_, STREAMS[phase]]
