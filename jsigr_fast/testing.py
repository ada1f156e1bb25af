"""Tiny models and dtype lists shared by the tests and the benchmarks.

Each factory builds a small classifier exercising one feature a user's model may have (BatchNorm
in train or eval mode, GroupNorm, LayerNorm, smooth activations, max-pooling, a residual block,
dropout, vector inputs), so every regularizer can be checked on all of them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["TINY_MODELS", "tiny_model", "tiny_input", "FLOAT_DTYPES", "LOWP_DTYPES", "Residual"]

FLOAT_DTYPES = (torch.float32, torch.float64)
LOWP_DTYPES = (torch.bfloat16, torch.float16)


class Residual(nn.Module):
    """``x + body(x)``: a residual block with a conv body."""

    def __init__(self, channels: int, act: type[nn.Module] = nn.ReLU, norm: str = "batch"):
        super().__init__()
        norm_layer = {"batch": lambda: nn.BatchNorm2d(channels), "group": lambda: nn.GroupNorm(2, channels),
                      "none": nn.Identity}[norm]
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), norm_layer(), act(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


def _conv_head(features: nn.Module, channels: int, hw: int, k: int) -> nn.Sequential:
    return nn.Sequential(features, nn.Flatten(), nn.Linear(channels * hw * hw, k))


def tiny_model(name: str, *, in_channels: int = 2, num_classes: int = 4, dtype=torch.float64, seed: int = 0) -> nn.Module:
    """A small classifier for ``(N, in_channels, 6, 6)`` inputs (``(N, 12)`` for "mlp")."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        c, k = in_channels, num_classes
        if name == "mlp":
            m = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, k))
        elif name == "conv_tanh":
            m = _conv_head(nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.Tanh()), 3, 6, k)
        elif name == "conv_bn_train":
            m = _conv_head(nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh()), 3, 6, k)
        elif name == "conv_bn_eval":
            m = _conv_head(nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh()), 3, 6, k)
            with torch.no_grad():  # non-trivial running statistics, then eval mode
                m[0][1].running_mean.uniform_(-0.5, 0.5)
                m[0][1].running_var.uniform_(0.5, 2.0)
            m.eval()
        elif name == "groupnorm_gelu":
            m = _conv_head(nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.GELU()), 4, 6, k)
        elif name == "layernorm_silu":
            m = _conv_head(nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.LayerNorm([3, 6, 6]), nn.SiLU()), 3, 6, k)
        elif name == "instancenorm_elu":
            m = _conv_head(nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True), nn.ELU()),
                           3, 6, k)
        elif name == "maxpool_relu":
            m = _conv_head(nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), 4, 3, k)
        elif name == "residual_bn":
            m = _conv_head(nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), Residual(4, nn.GELU, "batch"), nn.SiLU()), 4, 6, k)
        elif name == "residual_bn_relu":  # relu(batch_norm(h)) read by convs: what fused.RECOMPUTE_CONV_INPUT is for
            m = _conv_head(nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                         Residual(4, nn.ReLU, "batch"), nn.ReLU()), 4, 6, k)
        elif name == "dropout":
            m = _conv_head(nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.Tanh(), nn.Dropout(0.25)), 3, 6, k)
        else:
            raise ValueError(f"unknown tiny model {name!r}; choose from {TINY_MODELS}")
    return m.to(dtype)


def tiny_input(name: str, n: int = 5, *, in_channels: int = 2, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 12) if name == "mlp" else (n, in_channels, 6, 6)
    return torch.rand(shape, generator=g, dtype=dtype)


TINY_MODELS = ("mlp", "conv_tanh", "conv_bn_train", "conv_bn_eval", "groupnorm_gelu", "layernorm_silu",
               "instancenorm_elu", "maxpool_relu", "residual_bn", "residual_bn_relu", "dropout")
# Models whose samples do not interact (the batch Jacobian is block diagonal).
INDEPENDENT_MODELS = tuple(m for m in TINY_MODELS if m not in ("conv_bn_train", "residual_bn", "residual_bn_relu"))
# Deterministic ones (no dropout), for finite-difference checks.
DETERMINISTIC_MODELS = tuple(m for m in TINY_MODELS if m != "dropout")
