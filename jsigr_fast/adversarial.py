"""JARN's adaptor/discriminator pair (Chan et al. 2020), shared by :class:`JARN` and :class:`JSIGR`.

The adversarial loss (JARN Eq. 9), with ``D`` the discriminator's probability that its input is a
real image and ``J' = f_apt(J)`` the adapted input gradient:

    L_adv = E_x[log D(x)] + E[log(1 - D(J'))]

The classifier and the adaptor minimise it (they are the "generator"), the discriminator maximises
it, updated once every ``disc_every`` generator steps (JARN: 10 on MNIST, 20 on CIFAR-10).
We work with the discriminator's logit ``a``: ``log D = logsigmoid(a)``, ``log(1 - D) = logsigmoid(-a)``.
"""
from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks
from .saliency import SaliencyAdaptor

__all__ = ["Discriminator", "SaliencyGAN", "GANCriterion", "DISCRIMINATOR_PRESETS", "adversarial_loss"]

# Channel widths of the discriminators in the JARN paper (and J-SIGR, which reuses the CIFAR one).
DISCRIMINATOR_PRESETS = {
    "cifar": (32, 64, 128, 256, 512),  # 5 conv layers, JARN CIFAR-10 and J-SIGR
    "mnist": (64, 128),                # 2 conv layers, JARN MNIST
    "svhn": (16, 32, 64, 128, 256),    # 5 conv layers, JARN SVHN
}
DISC_EVERY_PRESETS = {"cifar": 20, "mnist": 10, "svhn": 20}


class Discriminator(nn.Module):
    """A small image discriminator returning one logit per sample.

    Images ``(C, H, W)``: 3x3 convolutions with stride 2 and LeakyReLU(0.2) at the given widths,
    then global average pooling and a linear layer (stride-2 3x3 convs never shrink a 1x1 map to
    nothing, so any image size works). Vectors ``(D,)``: an MLP with the same widths.
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] | str = "cifar"):
        super().__init__()
        if isinstance(channels, str):
            _checks.check_choice("channels", channels, DISCRIMINATOR_PRESETS)
            channels = DISCRIMINATOR_PRESETS[channels]
        channels = tuple(int(c) for c in channels)
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive widths, got {channels}")
        self.input_shape = _checks.check_input_shape("input_shape", input_shape)
        layers: list[nn.Module] = []
        if len(self.input_shape) == 3:
            prev = self.input_shape[0]
            for c in channels:
                layers += [nn.Conv2d(prev, c, kernel_size=3, stride=2, padding=1), nn.LeakyReLU(0.2)]
                prev = c
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif len(self.input_shape) == 1:
            prev = self.input_shape[0]
            for c in channels:
                layers += [nn.Linear(prev, c), nn.LeakyReLU(0.2)]
                prev = c
        else:
            raise ValueError(f"input_shape must be (C, H, W) or (D,), got {self.input_shape}")
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def adversarial_loss(real_logits: torch.Tensor | None, fake_logits: torch.Tensor) -> torch.Tensor:
    """JARN Eq. 9 from discriminator logits: ``mean log D(real) + mean log(1 - D(fake))``."""
    fake_term = F.logsigmoid(-fake_logits).mean()
    if real_logits is None:
        return fake_term
    return F.logsigmoid(real_logits).mean() + fake_term


class SaliencyGAN(nn.Module):
    """Adaptor + discriminator with their own Adam optimizers and JARN's update schedule.

    Args:
        input_shape: one sample's shape, ``(C, H, W)`` or ``(D,)``.
        discriminator: a preset name (``"cifar"``, ``"mnist"``, ``"svhn"``) or a list of widths.
        disc_every: update the discriminator once every this many generator steps
            (default: the preset's, 20 for CIFAR, 10 for MNIST).
        adaptor_lr, disc_lr: Adam learning rates (ours; the papers do not give them).
        generator_loss: ``"minimax"`` (JARN's ``log(1 - D(J'))``, minimised) or ``"nonsaturating"``
            (``-log D(J')``, the usual GAN fix when D wins early).

        sync_grads: average the adaptor's and discriminator's gradients over the ranks of the default
            process group before each step (data-parallel training: every rank sees a different shard,
            and without this the pairs drift apart). ``None`` (default): whenever torch.distributed is
            initialised with more than one rank.

    Its optimizer states, step counter and skipped-step counter travel with ``state_dict()`` (as
    extra state), so a checkpoint restores training exactly. A step whose (averaged) gradient is not
    finite is skipped entirely (no Adam moment update) and counted in ``skipped_steps``.
    """

    def __init__(self, input_shape: Sequence[int], *, discriminator: Sequence[int] | str = "cifar",
                 disc_every: int | None = None, adaptor_lr: float = 1e-3, disc_lr: float = 2e-4,
                 generator_loss: str = "minimax", sync_grads: bool | None = None):
        super().__init__()
        input_shape = _checks.check_input_shape("input_shape", input_shape)
        adaptor_lr = _checks.check_number("adaptor_lr", adaptor_lr, low=0, low_open=True)
        disc_lr = _checks.check_number("disc_lr", disc_lr, low=0, low_open=True)
        channels = input_shape[0] if len(input_shape) == 3 else 1
        self.adaptor = SaliencyAdaptor(channels)
        self.discriminator = Discriminator(input_shape, discriminator)
        if disc_every is None:
            disc_every = DISC_EVERY_PRESETS.get(discriminator, 20) if isinstance(discriminator, str) else 20
        self.disc_every = _checks.check_int("disc_every", disc_every)
        self.generator_loss_kind = _checks.check_choice("generator_loss", generator_loss, ("minimax", "nonsaturating"))
        self.adaptor_opt = torch.optim.Adam(self.adaptor.parameters(), lr=adaptor_lr, betas=(0.5, 0.999))
        self.disc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=disc_lr, betas=(0.5, 0.999))
        self.sync_grads = sync_grads
        self.steps = 0
        self.skipped_steps = 0

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype / device), .double(), .cuda(): the Adam moments follow their parameters. PyTorch
        # optimizers keep state tensors as they were created, so after a step in float32 a .double()
        # criterion failed in its next step ("expected dtype float for 'end'"), and check_input's own
        # advice (convert the criterion with .to(dtype)) led there. The step count stays as Adam keeps it.
        out = super()._apply(fn, *args, **kwargs)
        for opt in (self.adaptor_opt, self.disc_opt):
            for group in opt.param_groups:
                for p in group["params"]:
                    state = opt.state.get(p, {})
                    for key, value in state.items():
                        if key != "step" and isinstance(value, torch.Tensor):
                            state[key] = value.to(device=p.device, dtype=p.dtype)
        return out

    def check_input(self, x: torch.Tensor) -> None:
        """Raise unless x is a batch of this pair's input shape and dtype (a clear error up front
        instead of a shape or dtype mismatch inside the adaptor or the discriminator)."""
        shape = self.discriminator.input_shape
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"x has per-sample shape {tuple(x.shape[1:])} but this criterion was built for "
                             f"input_shape={shape}")
        dtype = self.adaptor.conv.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x is {x.dtype} but the criterion's adaptor and discriminator are {dtype}; "
                            f"convert the criterion with .to({x.dtype})")

    # -- losses -------------------------------------------------------------------------------
    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """What the generator side (classifier, adaptor) minimises."""
        if self.generator_loss_kind == "minimax":
            return F.logsigmoid(-fake_logits).mean()
        return -F.logsigmoid(fake_logits).mean()

    def frozen_discriminator(self, x: torch.Tensor) -> torch.Tensor:
        """Discriminator logits computed with a detached copy of its weights, so the returned graph
        reaches the input only, and updating the real weights later cannot invalidate it."""
        # clone: a detach() alias shares the parameter's version counter, so an optimizer step
        # on the real weights would still invalidate the graph.
        params = {k: v.detach().clone() for k, v in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (x,))

    # -- updates ------------------------------------------------------------------------------
    def _should_sync(self) -> bool:
        if self.sync_grads is False:
            return False
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
               grads: Sequence[torch.Tensor]) -> bool:
        """Average over ranks if needed, then one optimizer step, unless a gradient is not finite."""
        grads = [g.detach() if isinstance(g, torch.Tensor) else g for g in grads]
        if len(grads) != len(params) or any(not isinstance(g, torch.Tensor) or g.shape != p.shape
                                            for g, p in zip(grads, params)):
            # zip would step a subset silently
            got = [tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__ for g in grads]
            raise ValueError(f"grads: expected {len(params)} tensors shaped like the parameters "
                             f"{[tuple(p.shape) for p in params]}, got {len(grads)}: {got}")
        if self._should_sync():
            import torch.distributed as dist

            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            grads = list(torch.split(flat, [g.numel() for g in grads]))
            grads = [g.view_as(p) for g, p in zip(grads, params)]
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self.skipped_steps += 1
            return False
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def step_adaptor(self, grads: Sequence[torch.Tensor]) -> bool:
        """One adaptor step with the given gradients of the generator loss. Returns False if skipped."""
        return self._optimizer_step(self.adaptor_opt, list(self.adaptor.parameters()), grads)

    def maybe_step_discriminator(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor | None:
        """Advance the step counter; on every ``disc_every``-th step take one discriminator step
        maximising L_adv on (real, fake). Returns the discriminator's L_adv (detached) when it stepped."""
        self.steps += 1
        if (self.steps - 1) % self.disc_every != 0:
            return None
        with torch.enable_grad():
            l_adv = adversarial_loss(self.discriminator(real.detach()), self.discriminator(fake.detach()))
            grads = torch.autograd.grad(-l_adv, list(self.discriminator.parameters()))
        self._optimizer_step(self.disc_opt, list(self.discriminator.parameters()), grads)
        return l_adv.detach()

    def commit(self, adaptor_grads: Sequence[torch.Tensor], real: torch.Tensor, fake: torch.Tensor) -> dict:
        """The generator-side updates of one training step: the adaptor's step, then (on schedule)
        the discriminator's. Returns the detached terms it produced (``disc`` when D stepped)."""
        self.step_adaptor(adaptor_grads)
        d = self.maybe_step_discriminator(real, fake)
        return {} if d is None else {"disc": d}

    # -- checkpointing ------------------------------------------------------------------------
    def get_extra_state(self):
        return {"steps": self.steps, "skipped_steps": self.skipped_steps, "adaptor_opt": self.adaptor_opt.state_dict(),
                "disc_opt": self.disc_opt.state_dict()}

    def set_extra_state(self, state):
        self.steps = int(state["steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        # deep copies: Optimizer.load_state_dict keeps same-device tensors by reference, so loading a live
        # criterion's state_dict() would make the two share (and both advance) Adam's moments and steps
        self.adaptor_opt.load_state_dict(copy.deepcopy(state["adaptor_opt"]))
        self.disc_opt.load_state_dict(copy.deepcopy(state["disc_opt"]))


class GANCriterion(nn.Module):
    """Shared plumbing of the criteria that own a :class:`SaliencyGAN` (:class:`JSIGR`, :class:`JARN`):
    the adaptor/discriminator accessors and the (optionally deferred) commit of their updates."""

    def _init_gan(self, input_shape, *, auto_step: bool, **gan_kwargs) -> None:
        self.gan = SaliencyGAN(input_shape, **gan_kwargs)
        self.auto_step = bool(auto_step)
        self._pending = None

    @property
    def adaptor(self) -> nn.Module:
        return self.gan.adaptor

    @property
    def discriminator(self) -> nn.Module:
        return self.gan.discriminator

    def _stage(self, adaptor_grads, real: torch.Tensor, fake: torch.Tensor) -> dict:
        """Record one training call's updates; commit them now unless ``auto_step`` is off. The
        discriminator's inputs are kept in its own dtype: under autocast the adaptor's map is bf16/fp16,
        and a deferred commit (the trainer's) runs outside autocast, where they would not match."""
        dtype = next(self.gan.discriminator.parameters()).dtype
        self._pending = (adaptor_grads, real.detach().to(dtype), fake.detach().to(dtype))
        return self.step() if self.auto_step else {}

    def state_dict(self, *args, **kwargs):
        if self._pending is not None:
            warnings.warn(f"{type(self).__name__}.state_dict() between a training call (auto_step=False) and step(): "
                          "the pending adaptor/discriminator update is not saved; call step() first to keep it "
                          "(or discard() to drop it)",
                          RuntimeWarning, stacklevel=2)
        return super().state_dict(*args, **kwargs)

    def discard(self) -> None:
        """Drop the updates the last training call staged (``auto_step=False``): the step was rejected."""
        self._pending = None

    def step(self) -> dict:
        """Commit the adaptor/discriminator updates computed by the last training-mode call (a no-op
        when there are none). Returns the terms produced (``disc`` when the discriminator stepped).
        Only the last call's updates are pending: a training call before ``step()`` replaces them,
        which is how a loop rejects a step (a non-finite loss) without committing its updates."""
        if self._pending is None:
            return {}
        grads, real, fake = self._pending
        self._pending = None
        return self.gan.commit(grads, real, fake)
