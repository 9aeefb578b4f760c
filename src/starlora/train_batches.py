"""Length-grouped training batches: little padding, still a random order.

Right-padding a batch to its longest sequence wastes ``1 - sum(lengths) / (batch * longest)``
of its tokens; with random batches of GSM8K-like data that is a third or more. Sorting all
examples by length would remove it but make every epoch the same short-to-long curriculum.
`LengthGroupedBatches` does what transformers' ``group_by_length`` does: shuffle, cut the
permutation into mega-batches of `mega_batches` batches, sort each mega-batch by length, cut it
into batches, and shuffle the order of the batches. Batches hold examples of similar length,
yet which examples meet, and when, is random. Everything is drawn from ``(seed, epoch)``, so the
same seed gives the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from starlora.seeds import epoch_stream

#: batches per mega-batch (the groups sorted by length): large enough that neighbours in a
#: sorted group differ by a few tokens, small enough that a group is a random slice of the data
MEGA_BATCHES = 50


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0,
    mega_batches: int = MEGA_BATCHES,
) -> list[list[int]]:
    """The batches of one epoch: lists of indices into `lengths` (tokens per example).

    Every index appears once; all batches hold `batch_size` examples except one smaller batch
    when ``batch_size`` does not divide the number of examples. The batch holding the longest
    example comes first (an out-of-memory error shows up at the first step, not late in a run);
    the others follow in random order. Deterministic in ``(seed, epoch)``.
    """
    if batch_size < 1 or mega_batches < 1:
        raise ValueError(f"batch_size and mega_batches must be >= 1, got {batch_size}, {mega_batches}")
    n = len(lengths)
    if n == 0:
        return []
    rng = epoch_stream(seed, epoch)
    lens = np.asarray(lengths, dtype=np.int64)
    perm = rng.permutation(n)
    group = batch_size * mega_batches
    batches: list[list[int]] = []
    for g0 in range(0, n, group):
        chunk = perm[g0 : g0 + group]
        chunk = chunk[np.argsort(-lens[chunk], kind="stable")]  # longest first
        batches += [chunk[b : b + batch_size].tolist() for b in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(batches))
    batches = [batches[i] for i in order]
    first = max(range(len(batches)), key=lambda i: max(lens[batches[i]]))
    batches.insert(0, batches.pop(first))
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of the tokens of right-padded `batches` that are padding:
    ``1 - sum(lengths) / sum(len(batch) * longest in batch)``."""
    real = padded = 0
    for batch in batches:
        lens = [int(lengths[i]) for i in batch]
        real += sum(lens)
        padded += len(lens) * max(lens, default=0)
    return 1.0 - real / padded if padded else 0.0


class LengthGroupedBatches(Sampler[list[int]]):
    """A batch sampler (``DataLoader(batch_sampler=...)``) of `length_grouped_batches`.

    Each pass over it is one epoch and the next pass draws the next epoch's batches;
    ``set_epoch`` (which accelerate's data loader calls before each pass) sets the epoch
    explicitly, so both ways give the same sequence. Under several processes accelerate
    hands batch ``i`` to process ``i % num_processes``; every process builds the same batches
    because they share the seed.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int,
        mega_batches: int = MEGA_BATCHES,
    ) -> None:
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.drop_last = False
        self.seed = seed
        self.mega_batches = mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch` (does not advance the sampler)."""
        return length_grouped_batches(
            self.lengths, self.batch_size, self.seed, epoch, self.mega_batches
        )

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        self.epoch += 1
        yield from batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


class ShareOfEachBatch(Sampler[list[int]]):
    """Process `rank`'s share of each batch of `batches`, for data-parallel training with the
    batches one process would train on: every process builds the same batches (same seed)
    and takes items ``rank, rank + world, ...`` of each (a batch holds examples of similar
    length, so the shares cost about the same).

    A batch with fewer than `world` examples leaves some processes without a share; each of
    those gets ``[stand_in + batch[0]]``, the index of a copy of an example that has no answer
    tokens (the dataset holds such copies after its examples), whose loss is zero: every
    process then runs one forward and backward pass per batch, as the gradient all-reduce
    needs. As many batches per epoch as `batches`, so the optimizer steps as often.
    """

    def __init__(self, batches: LengthGroupedBatches, rank: int, world: int, stand_in: int) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} processes")
        self.inner, self.rank, self.world, self.stand_in = batches, rank, world, stand_in
        self.batch_size = batches.batch_size
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            share = batch[self.rank :: self.world]
            yield share if share else [self.stand_in + batch[0]]

    def __len__(self) -> int:
        return len(self.inner)
