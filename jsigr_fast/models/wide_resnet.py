"""Wide residual networks (Zagoruyko & Komodakis 2016), the CIFAR model of JARN (via Madry et al.).

WRN-d-k: 3x3 conv (16) -> 3 stages of n = (d - 4) / 6 pre-activation blocks with 16k, 32k, 64k
channels (strides 1, 2, 2) -> norm -> act -> global average pool -> linear. Each block is
``norm -> act -> conv3x3 -> norm -> act -> dropout -> conv3x3`` plus a shortcut: identity, or a
1x1 conv applied to the *activated* input where the shape changes (as in the authors' code).
WRN-28-10 has 36,479,194 parameters (10 classes), the published 36.5M.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import _checks
from .basic_block import zero_init_last_layer
from .layers import check_common, init_conv_linear, make_activation, make_norm
from .normalize import Normalize, Stats, resolve_stats

__all__ = ["WideBasicBlock", "WideResNet", "wide_resnet", "wrn28_10", "wrn34_10"]


class WideBasicBlock(nn.Module):
    """Pre-activation block with dropout between the convs; no inplace ops."""

    def __init__(self, in_planes: int, planes: int, stride: int, *, dropout: float, norm: str,
                 norm_groups: int, activation: str):
        super().__init__()
        bias = norm == "none"
        self.bn1 = make_norm(norm, in_planes, norm_groups)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.bn2 = make_norm(norm, planes, norm_groups)
        self.act2 = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=bias)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """``Normalize -> conv1 -> layer1..3 (WideBasicBlocks) -> bn -> act -> avgpool -> fc``.

    Args:
        depth: 6n + 4 (16, 22, 28, 34, 40, ...); widen_factor: k.
        dropout: between the two convs of each block (Zagoruyko & Komodakis use 0.3 on CIFAR).
        norm: ``"batch"`` (default), ``"group"`` or ``"none"``.
        zero_init_residual: zero each block's last conv; ``None`` means only for ``norm="none"``.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, *, num_classes: int = 10,
                 in_channels: int = 3, mean: Stats = None, std: Stats = None,
                 activation: str = "relu", dropout: float = 0.0, norm: str = "batch",
                 norm_groups: int = 8, zero_init_residual: bool | None = None,
                 default_stats: str = "cifar10"):
        super().__init__()
        check_common(num_classes=num_classes, in_channels=in_channels, activation=activation,
                     norm=norm, norm_groups=norm_groups)
        _checks.check_int("depth", depth, low=10)
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 (16, 22, 28, 34, 40, ...), got {depth}")
        _checks.check_int("widen_factor", widen_factor, low=1)
        dropout = _checks.check_number("dropout", dropout, low=0.0, high=1.0)
        if dropout == 1.0:
            raise ValueError("dropout must be < 1")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor = depth, widen_factor

        mean_t, std_t = resolve_stats(mean, std, in_channels, default_stats)
        self.normalize = Normalize(mean_t, std_t)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=(norm == "none"))
        block_args = dict(dropout=dropout, norm=norm, norm_groups=norm_groups, activation=activation)
        stages, prev = [], widths[0]
        for w, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [WideBasicBlock(prev, w, stride, **block_args)]
            blocks += [WideBasicBlock(w, w, 1, **block_args) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = w
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = make_norm(norm, prev, norm_groups)
        self.act = make_activation(activation)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        self.input_shape = (in_channels, 32, 32)

        init_conv_linear(self)
        nn.init.zeros_(self.fc.bias)
        if zero_init_residual is None:
            zero_init_residual = norm == "none"
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, WideBasicBlock):
                    # pre-activation: the branch ends in conv2, no norm after it
                    zero_init_last_layer(m, nn.Identity(), m.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.act(self.bn(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def wide_resnet(depth: int, widen_factor: int, num_classes: int = 10, in_channels: int = 3,
                mean: Stats = None, std: Stats = None, activation: str = "relu", *,
                dropout: float = 0.0, norm: str = "batch", norm_groups: int = 8,
                zero_init_residual: bool | None = None) -> WideResNet:
    """WRN-``depth``-``widen_factor`` for 32x32 inputs; ``mean``/``std`` default to CIFAR-10's."""
    return WideResNet(depth, widen_factor, num_classes=num_classes, in_channels=in_channels,
                      mean=mean, std=std, activation=activation, dropout=dropout, norm=norm,
                      norm_groups=norm_groups, zero_init_residual=zero_init_residual)


def wrn28_10(num_classes: int = 10, in_channels: int = 3, mean: Stats = None, std: Stats = None,
             activation: str = "relu", *, dropout: float = 0.0, norm: str = "batch",
             norm_groups: int = 8, zero_init_residual: bool | None = None) -> WideResNet:
    """WRN-28-10 (Zagoruyko & Komodakis): 36,479,194 parameters, 10 classes."""
    return wide_resnet(28, 10, num_classes, in_channels, mean, std, activation, dropout=dropout,
                       norm=norm, norm_groups=norm_groups, zero_init_residual=zero_init_residual)


def wrn34_10(num_classes: int = 10, in_channels: int = 3, mean: Stats = None, std: Stats = None,
             activation: str = "relu", *, dropout: float = 0.0, norm: str = "batch",
             norm_groups: int = 8, zero_init_residual: bool | None = None) -> WideResNet:
    """WRN-34-10, the usual reading of Madry et al.'s CIFAR-10 model: 46,160,474 parameters."""
    return wide_resnet(34, 10, num_classes, in_channels, mean, std, activation, dropout=dropout,
                       norm=norm, norm_groups=norm_groups, zero_init_residual=zero_init_residual)
