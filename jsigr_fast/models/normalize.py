"""The fixed input normalisation every zoo model starts with, and the dataset statistics it uses.

Models take images in [0, 1]; normalisation is their first layer, not a data-loader transform, so
attacks and input-gradient penalties live in pixel space (J-SIGR §5.1.2: "a non-trainable data
normalization layer preceding the network"). ``mean``/``std`` are buffers, never parameters: an
optimiser cannot move them and ``model.parameters()`` does not list them.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn as nn

__all__ = ["Normalize", "DATASET_STATS", "resolve_stats"]

Stats = Union[float, Sequence[float], None]

# Per-channel (mean, std) of the training images scaled to [0, 1].
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # scikit-learn's 8x8 digits (load_digits().data / 16), over all 1797 images.
    "digits": ((0.3053,), (0.3760,)),
}


def _as_tuple(name: str, value) -> tuple[float, ...]:
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got bool")
    if isinstance(value, (int, float)):
        value = (value,)
    try:
        value = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {value!r}") from None
    if not value or not all(math.isfinite(v) for v in value):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers, got {value}")
    return value


def _as_channels(name: str, value, channels: int) -> tuple[float, ...]:
    value = _as_tuple(name, value)
    if len(value) == 1:
        value = value * channels
    if len(value) != channels:
        raise ValueError(f"{name} has {len(value)} entries but the model has {channels} input channels")
    return value


def resolve_stats(mean: Stats, std: Stats, in_channels: int, default: str
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean``/``std`` as per-channel tuples; ``None`` takes ``DATASET_STATS[default]``.

    A scalar or one-entry sequence is broadcast to every channel (``mean=0, std=1`` is the identity).
    """
    if mean is None or std is None:
        d_mean, d_std = DATASET_STATS[default]
        if len(d_mean) != in_channels:
            raise ValueError(
                f"mean/std default to the {len(d_mean)}-channel {default!r} statistics, but "
                f"in_channels={in_channels}: pass mean and std explicitly (mean=0, std=1 for none)")
        mean = d_mean if mean is None else mean
        std = d_std if std is None else std
    mean_t = _as_channels("mean", mean, in_channels)
    std_t = _as_channels("std", std, in_channels)
    if any(s <= 0 for s in std_t):
        raise ValueError(f"std must be positive, got {std_t}")
    return mean_t, std_t


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with ``mean``/``std`` fixed buffers and no parameters.

    Args:
        mean, std: one value per channel (or one value for all channels).
        persistent: whether the buffers go into ``state_dict`` (the ImageNet ResNet turns it off so
            its ``state_dict`` keys are exactly torchvision's).
    """

    def __init__(self, mean: Stats, std: Stats, *, persistent: bool = True):
        super().__init__()
        if mean is None or std is None:
            raise ValueError("Normalize needs explicit mean and std (use resolve_stats for defaults)")
        mean_t, std_t = _as_tuple("mean", mean), _as_tuple("std", std)
        channels = max(len(mean_t), len(std_t))
        mean_t, std_t = _as_channels("mean", mean_t, channels), _as_channels("std", std_t, channels)
        if any(s <= 0 for s in std_t):
            raise ValueError(f"std must be positive, got {std_t}")
        self.channels = channels
        self.register_buffer("mean", torch.tensor(mean_t).view(1, channels, 1, 1), persistent=persistent)
        self.register_buffer("std", torch.tensor(std_t).view(1, channels, 1, 1), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Subtract then divide (not multiply by 1/std): exactly (x - mean) / std. No shape checks,
        # so torch.fx can trace the model; a wrong channel count fails in broadcasting or conv1.
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + ")"
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"
