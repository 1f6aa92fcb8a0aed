"""Seeds for reproducible training: one ``seed`` determines the model's initialisation, the data
order, the augmentation and the denoising noise of every epoch.

Everything random in epoch ``e`` (0-based here, as ``set_epoch`` takes it) is drawn from seeds
derived from ``(seed, e)`` and, where the processes must differ, the rank and the data-loader
worker id, never from what earlier epochs consumed. So epoch ``e`` of a resumed run draws exactly
what epoch ``e`` of the uninterrupted run drew.
"""
from __future__ import annotations

import math
import os
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

# what each derived seed is for, so the streams never coincide
_MAIN, _ORDER, _WORKER = 0, 1, 2


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``seed`` and integer keys (epoch, rank, worker id, ...), well mixed:
    (1, 0) and (0, 1) give unrelated seeds."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(k) for k in keys)])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @
               np.array([1 << 31, 1], dtype=np.uint64)) & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Python's ``random``, NumPy's global generator and torch's (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)  # seeds the CUDA generators too (lazily, if CUDA is not up yet)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """The main process's generators for epoch ``epoch`` of rank ``rank``: what the
    augmentation (with ``--workers 0``), multi-scale sizes, dropout and denoising noise draw."""
    seed_everything(derive_seed(seed, _MAIN, epoch, rank))


def set_deterministic(enabled: bool = True) -> None:
    """``torch.use_deterministic_algorithms`` plus what CUDA needs for it (cuBLAS workspace,
    cuDNN without benchmarking). The deformable-attention backward then takes its deterministic
    path (native CPU and CUDA); the Triton backward has none and raises a one-line error."""
    if enabled:
        # cuBLAS reads this when its handle is created; harmless on CPUs
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


class SeededSampler(Sampler):
    """Indices of a data set of ``length`` items for rank ``rank`` of ``world``: a permutation
    drawn from ``derive_seed(seed, epoch)`` (the same on every rank; set by ``set_epoch``),
    padded with its own start to a multiple of ``world`` and dealt out round-robin, as
    ``DistributedSampler`` does. Epoch ``e``'s order depends on ``(seed, e)`` only."""

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world: int = 1):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of world size {world}")
        self.length, self.seed, self.shuffle = int(length), int(seed), shuffle
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.length / self.world)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, _ORDER, self.epoch))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = len(self) * self.world
        if order and len(order) < total:
            order = (order * math.ceil(total / len(order)))[:total]
        return iter(order[self.rank:total:self.world])


class WorkerSeeder:
    """A DataLoader ``worker_init_fn``: seeds a worker's Python, NumPy and torch generators from
    ``(seed, epoch, rank, worker id)``. ``set_epoch`` before each epoch's iterator is made
    (workers are started per epoch, so they see the new epoch)."""

    def __init__(self, seed: int = 0, rank: int = 0):
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, worker_id: int) -> None:
        seed_everything(derive_seed(self.seed, _WORKER, self.epoch, self.rank, worker_id))
