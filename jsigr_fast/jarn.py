"""JARN (Chan et al. 2020): make the classifier's input gradients fool a discriminator into taking
them for images."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks, reference
from .adversarial import GANCriterion, adversarial_loss
from .functional import _check_common, layer_rules, resolve_backend


__all__ = ["JARN"]


class JARN(GANCriterion):
    r"""JARN's training objective (Algorithm 1) as a criterion owning the adaptor and discriminator.

    ``crit(model, x, y)`` adds uniform noise ``U[-noise, noise]`` to ``x`` (JARN, Alg. 1 line 4),
    computes the per-sample input gradient ``J = ∇_x ℓ`` with its graph, adapts it
    (``J' = tanh(conv1x1(J / rms(J)))``, rms per sample) and returns the classifier's loss ``CE + lambda_adv * E[log(1 - D(J'))]``
    (the ``E log D(x)`` half of L_adv does not depend on the classifier). In training mode the call
    also takes the adaptor's step on the same L_adv and, every ``disc_every`` calls, the
    discriminator's. The gradient through ``J'`` into the classifier is a double backprop.

    Paper settings: lambda_adv = 1 with the "mnist" discriminator every 10 steps (MNIST); 1 with
    "cifar" every 20 (CIFAR-10); 5 with "svhn" every 20 (SVHN). JARN is usually switched on for the
    last 25 % of epochs only (the training layer's ``--jarn-start``).

    Args:
        input_shape: one sample's shape, ``(C, H, W)`` or ``(D,)``.
        lambda_adv: weight of the adversarial term for the classifier.
        noise: half-width of the uniform input noise (0 disables it). Default 8/255.
        discriminator, disc_every, adaptor_lr, disc_lr, generator_loss, sync_grads: see :class:`SaliencyGAN`.
        auto_step: as in :class:`JSIGR` (``False`` defers the adaptor/discriminator steps to :meth:`step`).
        backend: ``"reference"`` (plain autograd), ``"fused"`` (the classifier's forward and input-gradient
            VJP run with :func:`jsigr_fast.fused.fused_layers`, so the double backprop through its
            BatchNorm / conv / ReLU layers uses the fused rules) or ``"auto"`` (fused when built).
    """

    def __init__(self, input_shape: Sequence[int], *, lambda_adv: float = 1.0, noise: float = 8 / 255,
                 discriminator: Sequence[int] | str = "cifar", disc_every: int | None = None,
                 adaptor_lr: float = 1e-3, disc_lr: float = 2e-4, generator_loss: str = "minimax",
                 sync_grads: bool | None = None, auto_step: bool = True, backend: str = "auto"):
        super().__init__()
        self.backend = _checks.check_choice("backend", backend, _checks.BACKENDS)
        self.lambda_adv = _checks.check_number("lambda_adv", lambda_adv, low=0)
        self.noise = _checks.check_number("noise", noise, low=0)
        self._init_gan(input_shape, auto_step=auto_step, discriminator=discriminator, disc_every=disc_every,
                       adaptor_lr=adaptor_lr, disc_lr=disc_lr, generator_loss=generator_loss, sync_grads=sync_grads)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, return_terms: bool = False,
                generator: torch.Generator | None = None, grad_scale=None):
        """The classifier's loss; ``grad_scale`` as in :func:`jsigr_fast.loss` (fp16 + GradScaler)."""
        model = _check_common(model, x, y)
        _checks.check_bool("return_terms", return_terms)
        _checks.as_generator(generator, x.device)
        self.gan.check_input(x)
        grad_scale = _checks.check_grad_scale(grad_scale)
        x_in = x  # kept attached: the loss is differentiable in x when x requires grad (README)
        if self.noise > 0:
            x_in = x + (2 * _checks.rand(x.shape, like=x.detach(), generator=generator) - 1) * self.noise
        with torch.enable_grad():
            # the classifier's forward and input-gradient VJP with the backend's layer rules (the
            # adaptor and discriminator run natively)
            with layer_rules(resolve_backend(self.backend, x.device)):
                xg, logits = reference.forward(model, x_in, y)
                per_sample = F.cross_entropy(logits, y, reduction="none")
                ce = per_sample.mean()
                J = reference.vjp(per_sample.sum(), xg, grad_scale=grad_scale)
            # The adaptor runs on detached copies of its weights (fresh leaves): its gradient is taken
            # here, and stepping the real weights cannot invalidate the classifier's graph.
            apt_params = {k: v.detach().clone().requires_grad_(True) for k, v in self.gan.adaptor.named_parameters()}
            J_adapted = torch.func.functional_call(self.gan.adaptor, apt_params, (J,))
            gen = self.gan.generator_loss(self.gan.frozen_discriminator(J_adapted))
            total = ce + self.lambda_adv * gen
            if self.training:
                grads = torch.autograd.grad(gen, list(apt_params.values()), retain_graph=True)
        terms = {"ce": ce.detach(), "gen": gen.detach()}
        if return_terms:
            # before this call's updates (auto_step commits them just below): the discriminator the
            # loss saw, and the value a deferred step (auto_step=False, the trainer) reports too
            with torch.no_grad():
                adv = adversarial_loss(self.gan.discriminator(x_in.detach()), self.gan.discriminator(J_adapted.detach()))
        if self.training:
            terms.update(self._stage(grads, x_in.detach(), J_adapted))
        if not return_terms:
            return total
        terms["loss"] = total.detach()
        terms["adv"] = adv
        return total, terms
