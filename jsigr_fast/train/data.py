"""Datasets and loaders for a training run, from :mod:`jsigr_fast.data`.

``--synthetic true`` keeps the dataset's name (so its model, normalisation statistics, attack
presets and epoch length stay those of the real data) but feeds :class:`jsigr_fast.data.Synthetic`
images of its shape: the ImageNet recipe's throughput can be measured without ImageNet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .config import EPOCH_IMAGES, TrainConfig
from .errors import DataError

__all__ = ["DataSpec", "build_data", "WithTargets"]


@dataclass
class DataSpec:
    train: Dataset
    test: Dataset
    input_shape: tuple
    num_classes: int
    augmented: bool  # the training transform is random (crops / flips)


class WithTargets(Dataset):
    """``(x, y, targets[i])``: a dataset with one precomputed tensor per item (IR's SmoothGrad maps)."""

    def __init__(self, dataset: Dataset, targets: torch.Tensor):
        if len(dataset) != targets.shape[0]:
            raise ValueError(f"{targets.shape[0]} targets for {len(dataset)} items")
        self.dataset, self.targets = dataset, targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, self.targets[i]


def build_data(cfg: TrainConfig) -> DataSpec:
    """Training and evaluation sets for ``cfg``; :class:`DataError` names the path when they cannot be read."""
    from jsigr_fast.data import build_dataset, dataset_info, train_transform

    name = cfg.dataset
    size_kw = {"size": cfg.image_size} if cfg.image_size and name in ("imagenet", "imagefolder") else {}
    if cfg.synthetic or name == "synthetic":
        if name in ("imagenet", "imagefolder", "synthetic"):
            shape, classes = dataset_info(name, **size_kw) if name != "synthetic" else ((3, 32, 32), 10)
        else:
            shape, classes = dataset_info(name)
        if cfg.image_size:
            shape = (shape[0], cfg.image_size, cfg.image_size)
        classes = cfg.num_classes or classes
        n = cfg.synthetic_samples or EPOCH_IMAGES[name]
        kw = dict(shape=shape, num_classes=classes, seed=cfg.seed)
        # transform=None: random pixels need no crops; the eval split is 1/10 of the train length.
        train = build_dataset("synthetic", train=True, transform=None, num_samples=n, **kw)
        test = build_dataset("synthetic", train=False, transform=None, num_samples=max(n // 10, 1), **kw)
        return DataSpec(train, test, tuple(shape), int(classes), augmented=False)
    try:
        shape, classes = dataset_info(name, cfg.data_root, **size_kw)
        train = build_dataset(name, cfg.data_root, train=True, **size_kw)
        test = build_dataset(name, cfg.data_root, train=False, **size_kw)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        raise DataError(f"cannot read dataset {name!r} at {cfg.data_root}: {exc}") from None
    except ValueError as exc:  # the data package's own checks (bad layout, no images, bad files)
        raise DataError(f"dataset {name!r} at {cfg.data_root}: {exc}") from None
    classes = cfg.num_classes or classes
    if classes is None:
        raise DataError(f"cannot tell the number of classes of {name!r}; pass --num-classes")
    if len(train) == 0:
        raise DataError(f"dataset {name!r} at {cfg.data_root} has no training images")
    return DataSpec(train, test, tuple(shape), int(classes), augmented=train_transform(name) is not None)
