"""scikit-learn's bundled handwritten digits: the embedded default dataset (no download).

1797 real 8x8 grey-scale digits (UCI "optdigits" test set) with integer values 0..16, 10
classes, shipped inside scikit-learn. Items are ``(x, y)`` with ``x`` a float ``(1, 8, 8)``
tensor ``= value / 16`` in [0, 1] and ``y`` an ``int``.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["Digits"]


class Digits(Dataset):
    """A fixed, stratified train/test split of ``sklearn.datasets.load_digits``.

    The split is ``sklearn.model_selection.train_test_split(stratify=y, random_state=seed,
    test_size=test_fraction)``: the same ``(seed, test_fraction)`` gives the same split on every
    machine; ``train`` and ``test`` of one seed are disjoint and together cover all 1797 images.
    With the default 0.25: 1347 train / 450 test.

    Attributes: ``data`` (uint8 tensor ``(N, 8, 8)``, values 0..16), ``targets`` (int64 ``(N,)``),
    ``indices`` (positions in the full 1797-image set), ``classes``.
    """

    classes = [str(i) for i in range(10)]
    max_value = 16

    def __init__(self, split: str = "train", seed: int = 0, test_fraction: float = 0.25,
                 transform: Optional[Callable] = None):
        if split not in ("train", "test"):
            raise ValueError(f"Digits split must be 'train' or 'test', got {split!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = np.asarray(bunch.images)
        labels = np.asarray(bunch.target, dtype=np.int64)
        all_idx = np.arange(len(labels))
        train_idx, test_idx = train_test_split(all_idx, test_size=test_fraction, random_state=seed,
                                               stratify=labels)
        idx = np.sort(train_idx if split == "train" else test_idx)
        self.split, self.seed, self.test_fraction = split, seed, test_fraction
        self.indices = torch.from_numpy(idx)
        self.data = torch.from_numpy(images[idx].astype(np.uint8))  # values are integers 0..16
        self.targets = torch.from_numpy(labels[idx])
        self.transform = transform

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int):
        x = self.data[i].unsqueeze(0).to(torch.float32).div_(self.max_value)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])

    def __repr__(self) -> str:
        return f"Digits(split={self.split!r}, seed={self.seed}, n={len(self)})"
