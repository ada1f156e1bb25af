"""Building blocks shared by the zoo: activation and normalisation factories, argument checks.

Activations are always separate, non-inplace modules. Double backprop differentiates the
activation's backward again; an inplace ReLU overwrites the tensor that backward (and the next
layer's saved input) needs, which either raises "modified by an inplace operation" or forces
autograd to keep extra copies. Residual sums are written ``out = out + shortcut`` for the same
reason.
"""
from __future__ import annotations

import torch.nn as nn

from .. import _checks

__all__ = ["ACTIVATIONS", "NORMS", "make_activation", "make_norm", "group_count", "check_common",
           "init_conv_linear"]

# GELU/SiLU are here because gradient-norm penalties fit poorly on ReLU ResNets
# (Rodríguez-Muñoz et al. 2024): ReLU's input gradient is piecewise constant in the input.
ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=False),
    "gelu": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(inplace=False),
}
NORMS = ("batch", "group", "none")


def make_activation(name: str) -> nn.Module:
    _checks.check_choice("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()


def group_count(channels: int, target: int) -> int:
    """The largest divisor of ``channels`` that is at most ``target`` (GroupNorm needs a divisor).

    E.g. target 8: 16 -> 8, 24 -> 8, 9 -> 3, 18 -> 6, 36 -> 6, 640 -> 8.
    """
    for g in range(min(target, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def make_norm(norm: str, channels: int, groups: int = 8) -> nn.Module:
    """BatchNorm2d, GroupNorm (``group_count(channels, groups)`` groups) or Identity."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels, groups), channels)
    return nn.Identity()


def check_common(*, num_classes, in_channels, activation, norm=None, norm_groups=None) -> None:
    """Validate the arguments every zoo constructor shares (clear TypeError/ValueError)."""
    _checks.check_int("num_classes", num_classes, low=1)
    _checks.check_int("in_channels", in_channels, low=1)
    _checks.check_choice("activation", activation, ACTIVATIONS)
    if norm is not None:
        _checks.check_choice("norm", norm, NORMS)
    if norm_groups is not None:
        _checks.check_int("norm_groups", norm_groups, low=1)


def init_conv_linear(module: nn.Module) -> None:
    """He (fan_out) init for convolutions, unit/zero affine for norms, as torchvision's ResNet."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
