"""Name -> constructor registry: ``get_model("resnet20", activation="gelu")``.

Every constructor takes ``num_classes, in_channels, mean, std, activation`` (in that order, after
the generic ones' ``depth``/``widen_factor``) plus keyword-only architecture options.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from .normalize import DATASET_STATS
from .resnet_cifar import (cifar_resnet, resnet20, resnet20_jsigr, resnet32, resnet44, resnet56,
                           resnet110)
from .resnet_imagenet import resnet18, resnet34
from .small_cnn import digits_cnn, mnist_cnn
from .wide_resnet import wide_resnet, wrn28_10, wrn34_10

__all__ = ["MODELS", "DATASET_NUM_CLASSES", "DEFAULT_MODELS", "list_models", "get_model",
           "default_model_for"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": mnist_cnn,
    "digits_cnn": digits_cnn,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet20_jsigr": resnet20_jsigr,
    "cifar_resnet": cifar_resnet,
    "wrn28_10": wrn28_10,
    "wrn34_10": wrn34_10,
    "wide_resnet": wide_resnet,
    "resnet18": resnet18,
    "resnet34": resnet34,
}

DATASET_NUM_CLASSES = {"mnist": 10, "digits": 10, "cifar10": 10, "cifar100": 100, "svhn": 10,
                       "imagenet": 1000}
# The architecture each paper uses on the dataset (J-SIGR §5.1.1: MNIST CNN, ResNet-20, ResNet-18).
DEFAULT_MODELS = {"mnist": "mnist_cnn", "digits": "digits_cnn", "cifar10": "resnet20",
                  "cifar100": "resnet20", "svhn": "resnet20", "imagenet": "resnet18"}


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def _lookup(name) -> Callable[..., nn.Module]:
    if not isinstance(name, str) or name.lower() not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return MODELS[name.lower()]


def get_model(name: str, *, dataset: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models` (case-insensitive).
        dataset: optional key of ``DATASET_STATS``; fills ``num_classes``, ``in_channels``, ``mean``
            and ``std`` unless given in ``kwargs``.
        kwargs: the constructor's arguments (see ``MODELS[name]``).

    Raises:
        ValueError: unknown name or dataset, or a bad argument value.
        TypeError: an argument the constructor does not take, or a missing required one (the
            message lists the accepted arguments).
    """
    factory = _lookup(name)
    if dataset is not None:
        if dataset not in DATASET_STATS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of "
                             f"{', '.join(sorted(DATASET_STATS))}")
        mean, std = DATASET_STATS[dataset]
        kwargs.setdefault("num_classes", DATASET_NUM_CLASSES[dataset])
        kwargs.setdefault("in_channels", len(mean))
        kwargs.setdefault("mean", mean)
        kwargs.setdefault("std", std)
    signature = inspect.signature(factory)
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        accepted = ", ".join(signature.parameters)
        raise TypeError(f"get_model({name!r}): {err}; accepted arguments: {accepted}") from None
    return factory(**kwargs)


def default_model_for(dataset: str, **kwargs) -> nn.Module:
    """The papers' architecture for ``dataset`` with its classes, channels and statistics."""
    if dataset not in DEFAULT_MODELS:
        raise ValueError(f"no default model for dataset {dataset!r}; choose one of "
                         f"{', '.join(sorted(DEFAULT_MODELS))}")
    return get_model(DEFAULT_MODELS[dataset], dataset=dataset, **kwargs)
