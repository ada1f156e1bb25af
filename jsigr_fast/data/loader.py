"""DataLoader construction with exactly reproducible epochs (for resume) and DDP sharding.

How epoch ``e`` is derived from ``seed`` (``N = len(dataset)``, ``R`` replicas, rank ``r``)
---------------------------------------------------------------------------------------------
* **Order, training** (``train=True``): ``perm = torch.randperm(N, generator=torch.Generator()
  .manual_seed(seed + e))`` — the same rule as ``torch.utils.data.DistributedSampler``, which is
  used when ``distributed=True``: there ``perm`` is padded with its own first elements to a
  multiple of ``R`` and rank ``r`` takes ``perm[r::R]``. Batches are consecutive chunks of
  ``batch_size`` of that sequence; ``drop_last`` (default True for training) drops the short tail.
  (Like DistributedSampler, ``seed + e`` means seed 0 / epoch 1 equals seed 1 / epoch 0.)
* **Order, evaluation** (``train=False``): ``0 .. N-1``; distributed: ``range(N)[r::R]`` *without*
  padding (:class:`UnpaddedDistributedSampler`), so every sample is counted exactly once — ranks
  differ by at most one sample, and at most one batch.
* **Augmentation**: each sample is fetched with torch's global CPU RNG seeded to
  ``mix_seed(seed, e, i)`` (``i`` = dataset index), and the caller's RNG state is restored
  afterwards. The transforms in :mod:`jsigr_fast.data.transforms` draw only from that RNG, so the
  augmented sample ``i`` of epoch ``e`` is the same for any ``workers``, ``persistent_workers``,
  world size or rank. (The seed travels with the index from the main-process sampler, which is
  why this holds even for persistent workers that never see ``set_epoch``.)
* **numpy / random** inside workers are seeded by ``seed_worker`` from torch's per-worker seed
  ``base + worker_id``, with ``base`` drawn from a generator reseeded by ``set_epoch`` to
  ``mix_seed(seed, e, r)``; reproducible per worker for non-persistent workers only. Use torch's RNG
  in transforms.

Resume: build the loader with the same arguments and call ``loader.set_epoch(e)`` before each
epoch (``for e in range(start, epochs): loader.set_epoch(e); for x, y in loader: ...``). To resume
in the middle of epoch ``e`` after ``k`` finished batches, call ``loader.set_epoch(e,
start_batch=k)``: the sampler skips the first ``k * batch_size`` indices without loading them
and the remaining batches are identical to the uninterrupted run (same world size and batch size).

Every path uses the caller-independent generators above: iterating the loader never consumes
the global torch RNG of the training loop.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .seeding import mix_seed

__all__ = ["make_loader", "Loader", "EpochSampler", "UnpaddedDistributedSampler", "SeededSampler",
           "SeededDataset", "seed_worker", "epoch_permutation"]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of epoch ``epoch`` (before any distributed sharding)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


class EpochSampler(Sampler[int]):
    """Single-process sampler: :func:`epoch_permutation` if ``shuffle`` else ``0..n-1``."""

    def __init__(self, data_source, shuffle: bool = True, seed: int = 0):
        self.data_source = data_source
        self.shuffle, self.seed, self.epoch = shuffle, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        if self.shuffle:
            return iter(epoch_permutation(n, self.seed, self.epoch).tolist())
        return iter(range(n))

    def __len__(self) -> int:
        return len(self.data_source)


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sharding: rank ``r`` gets ``range(N)[r::R]`` (shuffled first if ``shuffle``),
    with no padding — unlike DistributedSampler's default, no sample is counted twice."""

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        order = epoch_permutation(n, self.seed, self.epoch).tolist() if self.shuffle else range(n)
        return iter(list(order)[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class SeededSampler(Sampler):
    """Wraps an index sampler; yields ``(index, mix_seed(seed, epoch, index))`` pairs for
    :class:`SeededDataset`, and can skip the first ``skip`` indices of the epoch (mid-epoch resume)."""

    def __init__(self, sampler: Sampler, seed: int, seed_samples: bool = True):
        self.sampler, self.seed, self.seed_samples = sampler, int(seed), seed_samples
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            if next(it, None) is None:
                return
        if not self.seed_samples:
            yield from it
            return
        seed, epoch = self.seed, self.epoch
        for i in it:
            yield (i, mix_seed(seed, epoch, i))

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class SeededDataset(Dataset):
    """Wraps a map-style dataset; ``ds[(i, s)]`` returns ``dataset[i]`` computed with torch's
    global CPU generator seeded to ``s`` (its previous state is restored). Plain ``ds[i]`` passes
    through. Other attributes (``classes``, ``targets``, ...) are forwarded to ``dataset``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        i, s = key
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(s)
        try:
            return self.dataset[i]
        finally:
            gen.set_state(state)

    def __getattr__(self, name):
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"SeededDataset({self.dataset!r})"


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy and ``random`` from torch's per-worker seed."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


class Loader(DataLoader):
    """A DataLoader whose epoch is set explicitly; see the module docstring for the derivation.

    ``loader.dataset`` is a :class:`SeededDataset` (``loader.dataset.dataset`` is yours; with
    ``seed_samples=False`` it is your dataset itself);
    ``loader.sampler`` is a :class:`SeededSampler` whose ``.sampler`` is the
    :class:`EpochSampler` / ``DistributedSampler``.
    """

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch ``epoch``'s order and augmentation; skip its first ``start_batch`` batches."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.sampler.set_epoch(epoch, skip=start_batch * self.batch_size)
        self.generator.manual_seed(mix_seed(self.sampler.seed, epoch, self._rank))

    @property
    def epoch(self) -> int:
        return self.sampler.epoch


def _world(num_replicas: Optional[int], rank: Optional[int]):
    if num_replicas is None or rank is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("make_loader(distributed=True) needs an initialised torch.distributed "
                             "process group (torchrun + init_process_group) or explicit "
                             "num_replicas= and rank=")
        num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
        rank = dist.get_rank() if rank is None else rank
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
    return int(num_replicas), int(rank)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int = 0,
                distributed: bool = False, seed: int = 0, drop_last: Optional[bool] = None,
                pin_memory: Optional[bool] = None, num_replicas: Optional[int] = None,
                rank: Optional[int] = None, epoch: int = 0, prefetch_factor: Optional[int] = None,
                collate_fn: Optional[Callable] = None, seed_samples: bool = True) -> Loader:
    """A :class:`Loader` over ``dataset`` with deterministic, resumable epochs.

    train: shuffle (order of epoch e = ``randperm(N, seed + e)``) and ``drop_last=True`` by
        default; otherwise the dataset order and ``drop_last=False``.
    workers: worker processes (``persistent_workers=True`` when > 0; ``prefetch_factor`` passes
        through). Each worker runs :func:`seed_worker`.
    distributed: shard with ``DistributedSampler`` (train: shuffled, padded to equal length;
        eval: :class:`UnpaddedDistributedSampler`). ``num_replicas`` / ``rank`` default to
        ``torch.distributed``'s world size and rank; pass them explicitly to override (tests,
        or sharding without a process group). Passing them with ``distributed=False`` is an error.
    seed: the only source of randomness (order, per-sample augmentation, worker seeds).
    pin_memory: default ``torch.cuda.is_available()``.
    epoch: initial epoch, as if ``set_epoch(epoch)`` had been called.
    seed_samples: reseed torch's RNG per sample (see module docstring); ``False`` leaves the
        augmentation to the workers' own RNG streams (not reproducible across worker counts).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if not distributed and (num_replicas is not None or rank is not None):
        raise ValueError("num_replicas / rank only apply with distributed=True")
    if drop_last is None:
        drop_last = bool(train)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if distributed:
        num_replicas, rank = _world(num_replicas, rank)
        cls = DistributedSampler if train else UnpaddedDistributedSampler
        base = cls(dataset, num_replicas=num_replicas, rank=rank, shuffle=bool(train), seed=seed,
                   drop_last=False)
    else:
        rank = 0
        base = EpochSampler(dataset, shuffle=bool(train), seed=seed)
    sampler = SeededSampler(base, seed, seed_samples=seed_samples)
    extra = {}
    if workers > 0:
        extra["persistent_workers"] = True
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    loader = Loader(SeededDataset(dataset) if seed_samples else dataset, batch_size=batch_size,
                    sampler=sampler, num_workers=workers, drop_last=drop_last,
                    pin_memory=pin_memory, worker_init_fn=seed_worker if workers > 0 else None,
                    generator=torch.Generator(), collate_fn=collate_fn, **extra)
    loader._rank = rank
    loader.set_epoch(epoch)
    return loader
