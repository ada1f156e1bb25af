"""Random images for throughput benchmarks and smoke tests (no files)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .seeding import mix_seed as _mix

__all__ = ["Synthetic"]


class Synthetic(Dataset):
    """``num_samples`` uniform-random float images of ``shape`` in [0, 1) with random labels.

    Item ``i`` is a pure function of ``(seed, i)`` (numpy's PCG64 ``default_rng(mix_seed(seed,
    i))``), so it is identical across workers, ranks and runs; labels are drawn once from
    ``seed`` with a torch generator. One 3x224x224 image takes ~0.5 ms on one CPU core (torch's
    Mersenne-Twister ``rand`` takes ~3 ms), far less than decoding a JPEG, so a loader over this
    dataset measures the training step rather than the input pipeline.
    """

    def __init__(self, num_samples: int = 10_000, shape: Sequence[int] = (3, 32, 32),
                 num_classes: int = 10, seed: int = 0, transform: Optional[Callable] = None):
        if num_samples < 0 or num_classes < 1:
            raise ValueError(f"need num_samples >= 0 and num_classes >= 1, got {num_samples}, {num_classes}")
        self.num_samples, self.shape = int(num_samples), tuple(int(s) for s in shape)
        self.num_classes, self.seed, self.transform = int(num_classes), int(seed), transform
        g = torch.Generator().manual_seed(_mix(self.seed, -1))
        self.targets = torch.randint(0, self.num_classes, (self.num_samples,), generator=g)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for Synthetic of length {self.num_samples}")
        i = i % self.num_samples
        rng = np.random.default_rng(_mix(self.seed, i))
        x = torch.from_numpy(rng.random(self.shape, dtype=np.float32))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])

    def __repr__(self) -> str:
        return f"Synthetic(n={self.num_samples}, shape={self.shape}, classes={self.num_classes}, seed={self.seed})"

