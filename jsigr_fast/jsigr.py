"""The stateful J-SIGR criterion: the loss of :func:`jsigr_fast.loss` with a trained saliency adaptor."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from . import _checks
from .adversarial import GANCriterion
from .functional import (_check_common, backend_module, check_fd_estimator, layer_rules, mask_builder, mask_fraction,
                         mode_kwargs, resolve_backend)
from .saliency import perturbed_input_gradient

__all__ = ["JSIGR"]


class JSIGR(GANCriterion):
    r"""J-SIGR (Liu et al. 2023, Algorithm 1) as a criterion that owns its saliency adaptor.

    ``crit(model, x, y)`` returns ``CE + lambda_m * R_sig + lambda_j * R_j`` for the classifier,
    exactly as :func:`jsigr_fast.loss`, except that the saliency map is ``M = f_Φ(g_hat)``: JARN's
    adaptor (1x1 conv + tanh) applied to the input gradient at the perturbed input. In training mode
    each call also trains the adaptor to make ``M`` resemble the input images (one Adam step on the
    adversarial loss) and, every ``disc_every`` calls, the discriminator to tell them apart
    (J-SIGR: a 5-layer 32-512 discriminator updated every 20 iterations). The classifier's objective
    is Eq. 10 only: the perturbed gradient is computed without a graph, so the adversarial loss
    trains the adaptor and the discriminator, not the classifier. ``crit.eval()`` freezes both.

    Usage::

        crit = jsigr_fast.JSIGR(input_shape=(3, 32, 32)).to(device)
        for x, y in loader:
            loss = crit(model, x, y)
            opt.zero_grad(); loss.backward(); opt.step()

    Its ``state_dict()`` holds the adaptor, discriminator, their optimizers and the step counter.

    Args:
        input_shape: one sample's shape, ``(C, H, W)`` or ``(D,)``.
        lambda_m, lambda_j, eps, jacobian, n_proj, backend: as in :func:`jsigr_fast.loss`.
        beta: threshold on the adaptor's tanh output (in (-1, 1)): features with ``M <= beta`` are
            penalised. Default 0.0 penalises the half of the tanh range below its midpoint.
        mask_quantile: if set, leave the top q fraction of features by ``M`` unpenalised instead
            (robust to the drift of tanh outputs during training).
        discriminator, disc_every, adaptor_lr, disc_lr, generator_loss: see :class:`SaliencyGAN`.
        mode, fd_step: ``"autograd"`` (double backprop) or ``"fd"`` (finite differences), as in
            :func:`jsigr_fast.loss`.
        sync_grads: see :class:`SaliencyGAN` (rank-averaged adaptor/discriminator gradients under DDP).
        auto_step: ``True`` (default) takes the adaptor/discriminator steps inside the call. ``False``
            defers them until :meth:`step` is called, so a training loop can commit them only for steps
            it accepts (e.g. after checking on every rank that the loss was finite).
    """

    def __init__(self, input_shape: Sequence[int], *, lambda_m: float = 0.5, lambda_j: float = 0.5, eps: float = 0.3,
                 beta: float = 0.0, mask_quantile: float | None = None, jacobian: str = "projection", n_proj: int = 1,
                 discriminator: Sequence[int] | str = "cifar", disc_every: int | None = None,
                 adaptor_lr: float = 1e-3, disc_lr: float = 2e-4, generator_loss: str = "minimax",
                 backend: str = "auto", mode: str = "autograd", fd_step: float = 0.01,
                 sync_grads: bool | None = None, auto_step: bool = True):
        super().__init__()
        self.lambda_m = _checks.check_number("lambda_m", lambda_m, low=0)
        self.lambda_j = _checks.check_number("lambda_j", lambda_j, low=0)
        self.eps = _checks.check_number("eps", eps, low=0)
        self.beta = _checks.check_number("beta", beta)
        self.mask_quantile = None if mask_quantile is None else _checks.check_number("mask_quantile", mask_quantile, low=0, high=1)
        self.jacobian = _checks.check_choice("jacobian", jacobian, _checks.JACOBIAN_ESTIMATORS)
        self.n_proj = _checks.check_int("n_proj", n_proj)
        self.backend = _checks.check_choice("backend", backend, _checks.BACKENDS)
        self.mode = _checks.check_choice("mode", mode, _checks.MODES)
        self.fd_step = _checks.check_number("fd_step", fd_step, low=0, low_open=True)
        self._init_gan(input_shape, auto_step=auto_step, discriminator=discriminator, disc_every=disc_every,
                       adaptor_lr=adaptor_lr, disc_lr=disc_lr, generator_loss=generator_loss, sync_grads=sync_grads)

    def saliency(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The saliency map ``M = f_Φ(∇ℓ(x + eps·σ·z))`` for a batch (detached, x's shape)."""
        g_hat = perturbed_input_gradient(model, x, y, eps=self.eps, generator=generator)
        with torch.no_grad():
            return self.gan.adaptor(g_hat)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, return_terms: bool = False,
                generator: torch.Generator | None = None, grad_scale=None):
        """The classifier's loss; ``grad_scale`` as in :func:`jsigr_fast.loss` (fp16 + GradScaler)."""
        model = _check_common(model, x, y)
        _checks.check_bool("return_terms", return_terms)
        _checks.as_generator(generator, x.device)
        self.gan.check_input(x)
        grad_scale = _checks.check_grad_scale(grad_scale)
        backend = resolve_backend(self.backend, x.device)
        if self.lambda_j > 0:  # before the adaptor's step: a refused call changes nothing
            check_fd_estimator(model, self.mode, self.jacobian)
        terms_extra = {}
        mask = None
        if self.lambda_m > 0 or self.training:
            with layer_rules(backend, first_order=True, device=x.device):
                g_hat = perturbed_input_gradient(model, x, y, eps=self.eps, generator=generator, grad_scale=grad_scale)
            if self.training:
                with torch.enable_grad():
                    M = self.gan.adaptor(g_hat)  # graph to the adaptor's weights only
                    gen = self.gan.generator_loss(self.gan.frozen_discriminator(M))
                    grads = torch.autograd.grad(gen, list(self.gan.adaptor.parameters()))
                M = M.detach()
                terms_extra["gen"] = gen.detach()
                terms_extra.update(self._stage(grads, x, M))
                mask = mask_builder(backend)(M, None, x, beta=self.beta, quantile=self.mask_quantile)
            else:
                with torch.no_grad():  # the adaptor's map, no graph (the fused backend: one kernel)
                    mask = mask_builder(backend)(self.gan.adaptor, g_hat, x, beta=self.beta,
                                                 quantile=self.mask_quantile)
            del g_hat  # input-sized: not to be held through the step's peak (as in functional.loss)
        extra = mode_kwargs(self.mode, self.fd_step, backend)
        out = backend_module(backend, self.mode).jsigr(model, x, y, lambda_m=self.lambda_m, lambda_j=self.lambda_j,
                                                       eps=self.eps, mask=mask, jacobian=self.jacobian,
                                                       n_proj=self.n_proj, generator=generator, grad_scale=grad_scale,
                                                       **extra)
        if not return_terms:
            return out["loss"]
        zero = out["ce"].detach().new_zeros(())
        terms = {k: out[k].detach() if k in out else zero for k in ("loss", "ce", "sig", "jac")}
        terms["mask_fraction"] = mask_fraction(mask, x) if mask is not None else x.new_ones(())
        terms.update(terms_extra)
        return out["loss"], terms
