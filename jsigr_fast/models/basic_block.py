"""He et al.'s post-activation basic residual block, shared by the CIFAR and ImageNet ResNets.

Attribute names follow torchvision's ``BasicBlock`` (``conv1, bn1, conv2, bn2, downsample``) so the
ImageNet ResNet-18 loads torchvision checkpoints. The shortcut is the identity when the shape is
kept, otherwise a projection, 1x1 conv (stride s) + norm ("option B" of He et al. 2016).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import make_activation, make_norm

__all__ = ["BasicBlock", "zero_init_last_layer"]


class BasicBlock(nn.Module):
    """``act(norm(conv(act(norm(conv(x))))) + shortcut(x))``; no inplace ops (double backprop)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, kernel_size: int = 3,
                 norm: str = "batch", norm_groups: int = 8, activation: str = "relu"):
        super().__init__()
        bias = norm == "none"  # with no norm layer after it, a conv keeps its bias
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size, stride=stride, padding=pad, bias=bias)
        self.bn1 = make_norm(norm, planes, norm_groups)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size, stride=1, padding=pad, bias=bias)
        self.bn2 = make_norm(norm, planes, norm_groups)
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=bias),
                make_norm(norm, planes, norm_groups),
            )
        else:
            self.downsample = None
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act2(out + shortcut)


def zero_init_last_layer(block: nn.Module, norm: nn.Module, conv: nn.Conv2d) -> None:
    """Make a residual branch output zero at init (Goyal et al.; Fixup when there is no norm).

    Zeroes the affine weight of the branch's last norm layer, or, with no norm layer, the last
    conv's weight and bias, so that each block starts as its shortcut.
    """
    if getattr(norm, "weight", None) is not None:
        nn.init.zeros_(norm.weight)
    else:
        nn.init.zeros_(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
