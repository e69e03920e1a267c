"""Data order: which samples iteration ``i`` of a step reads, with which augmentation seed.

Iteration ``i`` of step ``t`` reads the samples at positions ``i * B .. (i + 1) * B - 1`` of a
stream of seeded permutations, and every sample's augmentation is seeded by its position, so the
data never depends on worker processes, the order of ranks or restarts (exact resume).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cisslib.engine.runtime import mix_seed


class StreamSampler(Sampler):
    """This rank's ``(item, seed)`` pairs for iterations ``start..total-1`` of a step.

    The global stream concatenates permutations of the ``n`` items (epoch ``e`` shuffled by
    ``(seed, e)``); iteration ``i`` takes global positions ``i*B .. i*B+B-1`` and rank ``r`` the
    ``B / world`` of them starting at ``i*B + r*B/world``. Each pair's augmentation seed is derived
    from its global position, so data never depends on workers, ranks order or restarts.
    """

    def __init__(
        self, n: int, batch: int, seed: int, start: int, total: int, rank: int, world: int
    ):
        if n == 0:
            raise ValueError("no training images for this step: check the scenario and data")
        self.n, self.batch, self.seed = n, batch, seed
        self.start, self.total, self.rank, self.world = start, total, rank, world
        self.per_rank = batch // world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng(mix_seed(self.seed, epoch))
            self._perms = {epoch: rng.permutation(self.n)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return (self.total - self.start) * self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for it in range(self.start, self.total):
            first = it * self.batch + self.rank * self.per_rank
            for pos in range(first, first + self.per_rank):
                epoch, k = divmod(pos, self.n)
                yield int(self._perm(epoch)[k]), mix_seed(self.seed, 7919, pos)


class SeededItems(Dataset):
    """Wraps a dataset so that item ``(k, seed)`` runs its random transform under ``seed``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        k, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[k]


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    start: int,
    total: int,
    rank: int,
    world: int,
    num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    """The loader of iterations ``start..total-1`` of one step (this rank's share of each batch)."""
    sampler = StreamSampler(len(dataset), batch_size, seed, start, total, rank, world)
    return DataLoader(
        SeededItems(dataset),
        batch_size=batch_size // world,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        # own generator: creating the iterator must not draw from the global RNG (resume)
        generator=torch.Generator().manual_seed(0),
        # one pass per loader (the sampler spans the whole step): nothing for workers to persist
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def val_loader(dataset: Dataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batch-1 loader of evaluation items, in order.

    Its workers persist between passes (an evaluation reads the val set two or three times:
    metrics, probe, prototypes); ``pin_memory`` for CUDA (page-locked batches, async copies).
    """
    return DataLoader(
        dataset,
        batch_size=1,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def rank_indices(n: int, rank: int, world: int) -> Sequence[int]:
    """The evaluation items of ``rank``: every ``world``-th of ``0..n-1``."""
    return list(range(rank, n, world))
