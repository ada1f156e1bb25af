"""CIFAR ResNets of He et al. 2016 (§4.2): ResNet-20/32/44/56/110, width multipliers, and the
J-SIGR variant (9x9 kernels, 9-18-36 channels; J-SIGR §5.1.1).

Layout: 3x3 conv (16) -> 3 stages of n basic blocks (16, 32, 64 channels; strides 1, 2, 2) ->
global average pool -> linear; depth = 6n + 2.

Shortcuts: option B (1x1 conv + norm where the shape changes, identity elsewhere). He et al. used
option A (zero-padded identity) on CIFAR; option B adds a few parameters (2,752 at width 1: the
16->32 and 32->64 projections with their BatchNorms) but is the common choice in robustness code
and keeps every layer an ordinary conv/norm, which the fused double-backward paths handle. Hence
ResNet-20 has 272,474 parameters here against the published 0.27M (269,722 with option A).

``norm="none"`` gives convs biases and (by default) zero-initialises the last conv of each
residual branch, so the deep un-normalised network starts as its shortcuts and trains (Fixup).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .. import _checks
from .basic_block import BasicBlock, zero_init_last_layer
from .layers import check_common, init_conv_linear, make_activation, make_norm
from .normalize import Normalize, Stats, resolve_stats

__all__ = ["CifarResNet", "cifar_resnet", "resnet20", "resnet32", "resnet44", "resnet56",
           "resnet110", "resnet20_jsigr", "scale_widths"]

HE_WIDTHS = (16, 32, 64)
JSIGR_WIDTHS = (9, 18, 36)


def scale_widths(widths: Sequence[int], width: float) -> tuple[int, ...]:
    """``widths`` times ``width``, rounded half up (16-32-64 x1.5 = 24-48-96, x2 = 32-64-128)."""
    width = _checks.check_number("width", width, low=0, low_open=True)
    return tuple(max(1, int(w * width + 0.5)) for w in widths)


class CifarResNet(nn.Module):
    """``Normalize -> conv -> norm -> act -> layer1..3 (BasicBlocks) -> avgpool -> fc``.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        widths: channels of the three stages (the stem has ``widths[0]``).
        kernel_size: of every 3x3-position conv (stem and blocks); shortcuts stay 1x1.
        norm: ``"batch"`` (default), ``"group"`` (``norm_groups`` groups or the largest divisor
            below it) or ``"none"``.
        zero_init_residual: zero the last norm weight (or conv, without norm) of every residual
            branch; ``None`` means "only when ``norm == 'none'``".
    """

    def __init__(self, depth: int = 20, widths: Sequence[int] = HE_WIDTHS, *, num_classes: int = 10,
                 in_channels: int = 3, mean: Stats = None, std: Stats = None,
                 activation: str = "relu", kernel_size: int = 3, norm: str = "batch",
                 norm_groups: int = 8, zero_init_residual: bool | None = None,
                 default_stats: str = "cifar10"):
        super().__init__()
        check_common(num_classes=num_classes, in_channels=in_channels, activation=activation,
                     norm=norm, norm_groups=norm_groups)
        _checks.check_int("depth", depth, low=8)
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        _checks.check_int("kernel_size", kernel_size, low=1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size padding), got {kernel_size}")
        widths = tuple(widths)
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stage widths, got {widths}")
        for w in widths:
            _checks.check_int("widths[i]", w, low=1)
        n = (depth - 2) // 6
        self.depth, self.widths = depth, widths

        mean_t, std_t = resolve_stats(mean, std, in_channels, default_stats)
        self.normalize = Normalize(mean_t, std_t)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size, padding=kernel_size // 2,
                               bias=(norm == "none"))
        self.bn1 = make_norm(norm, widths[0], norm_groups)
        self.act = make_activation(activation)
        block_args = dict(kernel_size=kernel_size, norm=norm, norm_groups=norm_groups,
                          activation=activation)
        stages, prev = [], widths[0]
        for i, (w, stride) in enumerate(zip(widths, (1, 2, 2))):
            blocks = [BasicBlock(prev, w, stride, **block_args)]
            blocks += [BasicBlock(w, w, 1, **block_args) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = w
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        self.input_shape = (in_channels, 32, 32)

        init_conv_linear(self)
        if zero_init_residual is None:
            zero_init_residual = norm == "none"
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    zero_init_last_layer(m, m.bn2, m.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, mean: Stats = None,
                 std: Stats = None, activation: str = "relu", *, width: float = 1,
                 widths: Sequence[int] | None = None, kernel_size: int = 3, norm: str = "batch",
                 norm_groups: int = 8, zero_init_residual: bool | None = None) -> CifarResNet:
    """A He et al. CIFAR ResNet of any depth 6n+2; ``widths`` (default 16-32-64) times ``width``."""
    widths = scale_widths(HE_WIDTHS if widths is None else widths, width)
    return CifarResNet(depth, widths, num_classes=num_classes, in_channels=in_channels, mean=mean,
                       std=std, activation=activation, kernel_size=kernel_size, norm=norm,
                       norm_groups=norm_groups, zero_init_residual=zero_init_residual)


def _fixed_depth(depth: int, params: int):
    def factory(num_classes: int = 10, in_channels: int = 3, mean: Stats = None, std: Stats = None,
                activation: str = "relu", *, width: float = 1, norm: str = "batch",
                norm_groups: int = 8, zero_init_residual: bool | None = None) -> CifarResNet:
        return cifar_resnet(depth, num_classes, in_channels, mean, std, activation, width=width,
                            norm=norm, norm_groups=norm_groups,
                            zero_init_residual=zero_init_residual)
    factory.__name__ = factory.__qualname__ = f"resnet{depth}"
    factory.__doc__ = (f"ResNet-{depth} for CIFAR (He et al. 2016), option-B shortcuts, 16-32-64 "
                       f"channels times ``width``: {params:,} parameters at width 1, 10 classes.")
    return factory


# Parameter counts at width 1 with BatchNorm, 10 classes: 97,216·n − 19,174 for depth 6n+2
# (derivation in tests/test_models.py).
resnet20 = _fixed_depth(20, 272_474)
resnet32 = _fixed_depth(32, 466_906)
resnet44 = _fixed_depth(44, 661_338)
resnet56 = _fixed_depth(56, 855_770)
resnet110 = _fixed_depth(110, 1_730_714)


def resnet20_jsigr(num_classes: int = 10, in_channels: int = 3, mean: Stats = None,
                   std: Stats = None, activation: str = "relu", *, width: float = 1,
                   norm: str = "batch", norm_groups: int = 8,
                   zero_init_residual: bool | None = None) -> CifarResNet:
    """J-SIGR's ResNet-20 (§5.1.1): 9x9 kernels in every conv (1x1 projection shortcuts stay 1x1),
    9-18-36 channels times ``width``: 765,325 parameters at width 1, 10 classes."""
    return CifarResNet(20, scale_widths(JSIGR_WIDTHS, width), num_classes=num_classes,
                       in_channels=in_channels, mean=mean, std=std, activation=activation,
                       kernel_size=9, norm=norm, norm_groups=norm_groups,
                       zero_init_residual=zero_init_residual)
