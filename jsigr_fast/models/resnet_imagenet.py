"""ImageNet ResNet-18/34 (He et al. 2016), layer-compatible with torchvision.

Same modules, names and shapes as ``torchvision.models.resnet18`` (``conv1, bn1, layer1..4, fc``;
7x7/2 stem + 3x3/2 max-pool; ``downsample`` projections), so a torchvision ``state_dict`` loads with
``strict=True``: the ``Normalize`` buffers are non-persistent (left out of ``state_dict``) and the
activations hold no state. ResNet-18 has 11,689,512 parameters with 1000 classes, as torchvision's.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .. import _checks
from .basic_block import BasicBlock, zero_init_last_layer
from .layers import check_common, init_conv_linear, make_activation, make_norm
from .normalize import Normalize, Stats, resolve_stats

__all__ = ["ImageNetResNet", "resnet18", "resnet34"]


class ImageNetResNet(nn.Module):
    """``Normalize -> conv1 7x7/2 -> bn1 -> act -> maxpool -> layer1..4 -> avgpool -> fc``.

    Args:
        layers: basic blocks per stage ((2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-34).
        norm: ``"batch"`` (default), ``"group"`` (``norm_groups``, default 32) or ``"none"``
            (torchvision layer names are then kept but shapes differ: convs gain biases).
        zero_init_residual: torchvision's option (zero ``bn2.weight`` of each block); ``None``
            means only for ``norm="none"``.
    """

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), *, num_classes: int = 1000,
                 in_channels: int = 3, mean: Stats = None, std: Stats = None,
                 activation: str = "relu", norm: str = "batch", norm_groups: int = 32,
                 zero_init_residual: bool | None = None, default_stats: str = "imagenet"):
        super().__init__()
        check_common(num_classes=num_classes, in_channels=in_channels, activation=activation,
                     norm=norm, norm_groups=norm_groups)
        layers = tuple(layers)
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {layers}")
        for n in layers:
            _checks.check_int("layers[i]", n, low=1)
        # persistent=False: state_dict keys stay exactly torchvision's.
        mean_t, std_t = resolve_stats(mean, std, in_channels, default_stats)
        self.normalize = Normalize(mean_t, std_t, persistent=False)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=(norm == "none"))
        self.bn1 = make_norm(norm, 64, norm_groups)
        self.act = make_activation(activation)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block_args = dict(kernel_size=3, norm=norm, norm_groups=norm_groups, activation=activation)
        stages, prev = [], 64
        for w, n, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
            blocks = [BasicBlock(prev, w, stride, **block_args)]
            blocks += [BasicBlock(w, w, 1, **block_args) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        self.input_shape = (in_channels, 224, 224)

        init_conv_linear(self)
        if zero_init_residual is None:
            zero_init_residual = norm == "none"
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    zero_init_last_layer(m, m.bn2, m.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.act(self.bn1(self.conv1(self.normalize(x)))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def resnet18(num_classes: int = 1000, in_channels: int = 3, mean: Stats = None, std: Stats = None,
             activation: str = "relu", *, norm: str = "batch", norm_groups: int = 32,
             zero_init_residual: bool | None = None) -> ImageNetResNet:
    """ImageNet ResNet-18, torchvision-compatible: 11,689,512 parameters (1000 classes)."""
    return ImageNetResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, mean=mean,
                          std=std, activation=activation, norm=norm, norm_groups=norm_groups,
                          zero_init_residual=zero_init_residual)


def resnet34(num_classes: int = 1000, in_channels: int = 3, mean: Stats = None, std: Stats = None,
             activation: str = "relu", *, norm: str = "batch", norm_groups: int = 32,
             zero_init_residual: bool | None = None) -> ImageNetResNet:
    """ImageNet ResNet-34, torchvision-compatible: 21,797,672 parameters (1000 classes)."""
    return ImageNetResNet((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, mean=mean,
                          std=std, activation=activation, norm=norm, norm_groups=norm_groups,
                          zero_init_residual=zero_init_residual)
