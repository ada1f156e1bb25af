"""Real data for the training CLI: datasets, transforms and reproducible loaders (no downloads).

Datasets (items are ``(float CHW tensor in [0, 1], int label)``)::

    Digits(split="train", seed=0, test_fraction=0.25)   # sklearn's 1797 8x8 digits, embedded default
    MNIST(root, train=True)                             # idx files (plain or .gz)
    CIFAR10(root, train=True)                           # cifar-10-batches-py pickles
    ImageFolder(root, transform)                        # root/<class>/<image>, ImageNet layout
    Synthetic(num_samples, shape, num_classes, seed)    # random images for benchmarks

    build_dataset("cifar10", root, train=True)          # by name, with the standard transform
    dataset_info("cifar10")                             # ((3, 32, 32), 10)

Loading::

    loader = make_loader(ds, 128, train=True, workers=4, distributed=True, seed=0)
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)          # order = randperm(N, seed + epoch), sharded per rank
        for x, y in loader: ...

See :mod:`jsigr_fast.data.loader` for how the epoch order and augmentation derive from
``seed`` (exact resume) and :mod:`jsigr_fast.data.transforms` for the standard recipes.
"""
from .cifar import CIFAR10
from .digits import Digits
from .imagefolder import IMG_EXTENSIONS, ImageFolder
from .loader import (
    EpochSampler,
    Loader,
    UnpaddedDistributedSampler,
    epoch_permutation,
    make_loader,
    seed_worker,
)
from .mnist import MNIST, read_idx
from .registry import DATASETS, build_dataset, dataset_info
from .seeding import mix_seed
from .synthetic import Synthetic
from .transforms import (
    CenterCrop,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
    eval_transform,
    to_tensor,
    train_transform,
)

__all__ = [
    "Digits", "MNIST", "CIFAR10", "ImageFolder", "Synthetic", "IMG_EXTENSIONS", "read_idx",
    "build_dataset", "dataset_info", "DATASETS",
    "make_loader", "Loader", "EpochSampler", "UnpaddedDistributedSampler", "epoch_permutation",
    "seed_worker", "mix_seed",
    "Compose", "ToTensor", "to_tensor", "RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop",
    "Resize", "CenterCrop", "train_transform", "eval_transform",
]
