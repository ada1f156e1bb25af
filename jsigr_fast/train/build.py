"""Model, optimizer and learning-rate schedule of a run.

The architecture is recorded as ``arch = {"model": name, "kwargs": {...}}`` (plain values) in every
checkpoint, so a teacher or an ``--init-from`` source is rebuilt from its own checkpoint.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TrainConfig
from .errors import ConfigError

__all__ = ["model_arch", "build_model", "build_optimizer", "lr_factor", "build_scheduler"]


def model_arch(cfg: TrainConfig, input_shape, num_classes: int) -> dict:
    """``{"model": name, "kwargs": constructor arguments}`` for the run's classifier."""
    from jsigr_fast.models import DATASET_STATS, DEFAULT_MODELS

    stats = {"imagefolder": "imagenet"}.get(cfg.dataset, cfg.dataset)
    name = cfg.model or DEFAULT_MODELS.get(stats, "resnet20")
    kwargs = {"num_classes": int(num_classes), "in_channels": int(input_shape[0])}
    if stats in DATASET_STATS and len(DATASET_STATS[stats][0]) == input_shape[0]:
        mean, std = DATASET_STATS[stats]
        kwargs.update(mean=list(mean), std=list(std))
    if name.lower() in ("mnist_cnn", "digits_cnn") and "input_size" not in cfg.model_args:
        kwargs["input_size"] = int(input_shape[-1])
    kwargs.update(cfg.model_args)
    return {"model": name.lower(), "kwargs": kwargs}


def build_model(arch: dict) -> nn.Module:
    from jsigr_fast.models import get_model

    try:
        return get_model(arch["model"], **arch["kwargs"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build model {arch['model']!r} with {arch['kwargs']}: {exc}") from None


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over every trainable parameter, weight decay on all of them (Madry et al.'s
    and the papers' recipe; the same for every method, so comparisons are fair)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    opt = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, milestones, gamma: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total - warmup, 1)
        t = min(max(step - warmup, 0), span) / span
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return gamma ** sum(step >= round(m * total) for m in milestones)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR (stepped once per training step, skipped steps included); its state is
    plain numbers, and the lambda is rebuilt from the config on resume."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    fn = lambda step: lr_factor(step, total=total, warmup=warmup, schedule=cfg.schedule,  # noqa: E731
                                milestones=cfg.milestones, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
