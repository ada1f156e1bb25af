"""Datasets by name: ``build_dataset`` and ``dataset_info`` for the training CLI."""
from __future__ import annotations

import os
from typing import Optional, Tuple

from torch.utils.data import Dataset

from .transforms import eval_transform, train_transform

__all__ = ["build_dataset", "dataset_info", "DATASETS"]

DATASETS = ("digits", "mnist", "cifar10", "imagefolder", "imagenet", "synthetic")

_DEFAULT = object()  # "use the standard recipe" sentinel for transform=

_INFO = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "imagenet": ((3, 224, 224), 1000),
    "imagefolder": ((3, 224, 224), None),
}

_SYNTHETIC_DEFAULTS = {"shape": (3, 32, 32), "num_classes": 10}


def _check(name: str) -> str:
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choices: {', '.join(DATASETS)}")
    return key


def build_dataset(name: str, root: Optional[str] = None, train: bool = True, *,
                  transform=_DEFAULT, **kw) -> Dataset:
    """Build a dataset by name; items are ``(float CHW tensor in [0, 1], int label)``.

    ============  ===========================================================================
    digits        :class:`Digits` (bundled with scikit-learn, no ``root``); ``split`` follows
                  ``train``; ``seed=``, ``test_fraction=`` pass through
    mnist         :class:`MNIST` idx files in ``root`` or ``root/MNIST/raw``
    cifar10       :class:`CIFAR10` pickle batches in ``root`` or ``root/cifar-10-batches-py``
    imagefolder   :class:`ImageFolder` on ``root`` itself (``root/<class>/<image>``)
    imagenet      :class:`ImageFolder` on ``root/train`` (train) or ``root/val`` (eval); ``val``
                  must already be sorted into class folders and is labelled with ``train``'s
                  class list (a class folder only ``val`` has is an error)
    synthetic     :class:`Synthetic`; ``num_samples=`` (default 10000 train / 1000 eval),
                  ``shape=`` (3, 32, 32), ``num_classes=`` 10, ``seed=`` 0 (eval uses seed + 1)
    ============  ===========================================================================

    ``transform`` defaults to the standard recipe :func:`train_transform` / :func:`eval_transform`
    (CIFAR crop + flip when training; ImageNet random-resized crop / resize + centre crop);
    pass ``transform=None`` for the raw images or any callable to replace it.
    """
    key = _check(name)
    recipe = _recipe_kw(key, kw)
    if transform is _DEFAULT:
        if train:
            recipe.pop("resize", None)
        transform = (train_transform if train else eval_transform)(key, **recipe)
    if key == "digits":
        from .digits import Digits
        return Digits(split="train" if train else "test", transform=transform, **kw)
    if key == "synthetic":
        from .synthetic import Synthetic
        kw.setdefault("num_samples", 10_000 if train else 1_000)
        for k, v in _SYNTHETIC_DEFAULTS.items():
            kw.setdefault(k, v)
        kw["seed"] = kw.get("seed", 0) + (0 if train else 1)
        return Synthetic(transform=transform, **kw)
    if root is None:
        raise ValueError(f"dataset {name!r} needs root=<data directory>")
    root = os.fspath(root)
    if key == "mnist":
        from .mnist import MNIST
        return MNIST(root, train=train, transform=transform, **kw)
    if key == "cifar10":
        from .cifar import CIFAR10
        return CIFAR10(root, train=train, transform=transform, **kw)
    from .imagefolder import ImageFolder, class_folders
    if key == "imagenet":
        split = "train" if train else "val"
        sub = os.path.join(root, split)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"imagenet: {sub} is not a directory; expected {root}/train/<wnid>/*.JPEG "
                                    f"and {root}/val/<wnid>/*.JPEG (validation images sorted into class folders)")
        train_dir = os.path.join(root, "train")
        if not train and "classes" not in kw and os.path.isdir(train_dir):
            # val's own folder list would shift every label after a class val lacks
            kw["classes"] = class_folders(train_dir)
            try:
                return ImageFolder(sub, transform=transform, **kw)
            except ValueError as e:
                raise ValueError(f"imagenet: {sub} is labelled with the class folders of {train_dir}: {e}") from None
        root = sub
    return ImageFolder(root, transform=transform, **kw)


def _recipe_kw(key: str, kw: dict) -> dict:
    """Pop the recipe options (``size``, ``resize``) meant for the ImageNet transforms."""
    out = {}
    for k in ("size", "resize"):
        if k in kw and key in ("imagenet", "imagefolder"):
            out[k] = kw.pop(k)
    return out


def dataset_info(name: str, root: Optional[str] = None, **kw) -> Tuple[Tuple[int, int, int], Optional[int]]:
    """``(input_shape, num_classes)`` of the images the standard recipe produces, without loading data.

    ``imagefolder``'s class count is ``None`` unless ``root`` is given (then its class folders are
    counted); ``synthetic`` honours ``shape=`` / ``num_classes=``; ImageNet-style ``size=`` sets
    the crop size.
    """
    key = _check(name)
    if key == "synthetic":
        shape = tuple(int(s) for s in kw.get("shape", _SYNTHETIC_DEFAULTS["shape"]))
        return shape, int(kw.get("num_classes", _SYNTHETIC_DEFAULTS["num_classes"]))
    shape, classes = _INFO[key]
    if key in ("imagenet", "imagefolder"):
        size = int(kw.get("size", 224))
        shape = (3, size, size)
        if key == "imagefolder" and root is not None:
            with os.scandir(os.fspath(root)) as it:
                classes = sum(1 for e in it if e.is_dir() and not e.name.startswith("."))
    return shape, classes
