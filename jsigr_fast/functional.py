"""The functional API: drop-in regularized losses for any classifier ``(N, ...) -> (N, K)`` logits.

Every function here validates its arguments (TypeError / ValueError naming the argument), never
modifies ``x`` or its ``requires_grad`` flag, never changes the model's train/eval mode, and
returns a scalar differentiable w.r.t. the model's parameters (under ``torch.no_grad()``: its value,
without a graph). Scaling conventions are those of
:mod:`jsigr_fast.reference` (per-sample quantities averaged over the batch).

BatchNorm running statistics: a loss that includes the cross-entropy (:func:`loss`,
:func:`jacobian_regularization`, :func:`double_backprop`, :func:`interpretation_regularization`)
changes them exactly as one ordinary training forward on ``x`` does; the bare regularizers
(:func:`input_gradient_penalty`, :func:`jacobian_norm`) and every auxiliary pass leave them alone,
since they are meant to be added to a loss whose own forward already updated them.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks, ops, reference
from ._extension import extension_loaded
from .batchnorm import frozen_running_stats
from .saliency import Saliency, check_saliency, perturbed_input_gradient

__all__ = [
    "loss", "input_gradient_penalty", "jacobian_norm", "jacobian_regularization", "double_backprop",
    "smoothgrad", "interpretation_regularization", "resolve_backend", "available_backends",
]


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable for tensors on ``device`` (``"reference"`` always is)."""
    out = ["reference"]
    if ops.masked_sq_norm_compiled_available(device):
        out.append("fused")
    return out


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Map ``"auto"`` to the fastest backend available on ``device``; check explicit names."""
    _checks.check_choice("backend", backend, _checks.BACKENDS)
    available = available_backends(device)
    if backend == "auto":
        return "fused" if "fused" in available else "reference"
    if backend not in available:
        why = "the compiled extension is not loaded" if not extension_loaded() else f"no kernel for {device}"
        raise RuntimeError(f"backend={backend!r} is not available on {device} ({why}); use 'reference' or 'auto'")
    return backend


def _check_mode(mode: str, fd_step: float) -> float:
    _checks.check_choice("mode", mode, _checks.MODES)
    return _checks.check_number("fd_step", fd_step, low=0, low_open=True)


def backend_module(backend: str, mode: str = "autograd"):
    """The module implementing a resolved backend: :mod:`jsigr_fast.reference` or :mod:`jsigr_fast.fused`
    (same function names and signatures: ``jsigr``, ``input_gradient_penalty``, ``jacobian_norm``);
    ``mode="fd"`` selects :mod:`jsigr_fast.finite_difference`, which needs no special kernels."""
    if mode == "fd":
        from . import finite_difference

        return finite_difference
    if backend == "fused":
        from . import fused

        return fused
    return reference


def mask_builder(backend: str):
    """``make_mask(saliency, g_hat, x, *, beta, quantile)`` of the backend (the fused backend builds a
    one-byte mask with its fused ops, in either mode; the reference uses :func:`jsigr_fast.reference.make_mask`)."""
    return getattr(backend_module(backend), "make_mask", reference.make_mask)


def mask_fraction(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Share of input features penalised, averaged in x's dtype whatever the mask's own dtype (the fused
    backend's bool mask, or the reference's float mask in the saliency map's dtype, which is bfloat16 /
    float16 for a map computed under autocast or passed in half precision): same term in both
    backends, and the count / D that bfloat16 would round to 8 bits."""
    return mask.to(x.dtype).mean()


def layer_rules(backend: str, *, first_order: bool = False, device=None):
    """The backend's layer rules for a block of plain autograd code: the fused backend's
    BatchNorm/conv/ReLU rules (:func:`jsigr_fast.fused.fused_layers`), nothing for the others.
    Used for the perturbed-input saliency pass (an input-only backward, no graph) and by the
    regularizers written as plain autograd code (``mode="fd"``, Jacobian and interpretation
    regularization, JARN). ``first_order=True`` for a block whose graph is differentiated only
    once (the saliency pass, ``mode="fd"``): conv and ReLU then stay ATen's (see fused_layers);
    with the inputs' ``device`` given, such a block where the device's settings leave ATen's layers
    in place (the GPU's) runs without the rerouting mode at all."""
    if backend == "fused":
        from . import fused

        return fused.fused_layers(first_order=first_order, device=device)
    return contextlib.nullcontext()


def mode_kwargs(mode: str, fd_step: float, backend: str) -> dict:
    """The extra keyword arguments of the ``mode="fd"`` functions: the step, and the backend whose
    layer rules their forwards and ordinary backward run under (the fused one's are exact and
    need no double backward, so fd gains from them too)."""
    return {"fd_step": fd_step, "backend": backend} if mode == "fd" else {}


def check_fd_estimator(model: nn.Module, mode: str, estimator: str) -> None:
    """Before any work: ``mode="fd"`` refuses the exact Jacobian estimator on a model whose samples
    interact (:func:`jsigr_fast.finite_difference.check_estimator`)."""
    if mode == "fd":
        from .finite_difference import check_estimator

        check_estimator(_checks.unwrap_parallel(model), estimator)


def _detached(d: dict, keys) -> dict:
    return {k: d[k].detach() for k in keys if k in d}


def _values_under_no_grad(fn):
    """Under ``torch.no_grad()`` a loss here is a value, as any PyTorch op's result is there: the
    input gradients it is built from still need autograd inside, but no graph is handed back (some
    paths used to return one and others not; an evaluation loop summing losses would keep every
    batch's activations alive through it). ``inference_mode`` is refused by the checks instead."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_grad_enabled():
            return fn(*args, **kwargs)
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):  # (loss, terms): the terms are detached already
            return (out[0].detach(), *out[1:])
        return out.detach()
    return wrapper


def _check_common(model, x, y=None) -> nn.Module:
    """Check the arguments every loss takes; return the module the loss runs (the model itself, or
    the original module of a torch.compile'd one: :func:`jsigr_fast._checks.uncompiled`)."""
    _checks.check_model(model)
    _checks.check_input(x, model)
    if y is not None:
        _checks.check_labels(y, x.shape[0], x.device)
    return _checks.uncompiled(model)


# ----------------------------------------------------------------------------------------------
# J-SIGR
# ----------------------------------------------------------------------------------------------
@_values_under_no_grad
def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lambda_m: float = 0.5, lambda_j: float = 0.5,
         eps: float = 0.3, beta: float = 0.1, mask_quantile: float | None = None, jacobian: str = "projection",
         n_proj: int = 1, saliency: Saliency = None, backend: str = "auto", return_terms: bool = False,
         generator: torch.Generator | None = None, grad_scale=None, mode: str = "autograd", fd_step: float = 0.01):
    r"""The J-SIGR loss (Liu et al. 2023, Eq. 10) for any classifier:

    .. math:: \mathrm{CE} + \lambda_m \,\mathrm{mean}_n \|m_n \odot \nabla_{x_n}\ell_n\|^2
              + \lambda_j \,\mathrm{mean}_n \|J_n\|_F^2

    with the selective mask ``m = 1[M <= beta]`` built from the saliency ``M`` of the input
    gradient at the perturbed input ``x + eps * sigma * z`` (``sigma = std(x)``, ``z ~ N(0, 1)``).

    Args:
        model: any ``nn.Module`` mapping ``x`` to ``(N, K)`` logits (train or eval mode).
        x: ``(N, C, H, W)`` or ``(N, D)`` floating inputs; never modified.
        y: ``(N,)`` integer class labels in ``[0, K)``.
        lambda_m, lambda_j: weights of the selective input-gradient and Jacobian terms (paper: 0.5, 0.5).
        eps: scale of the saliency perturbation, in units of ``std(x)`` (paper: 0.3).
        beta: mask threshold on the saliency map. The default saliency is ``|g_hat|`` divided by its
            per-sample maximum, so ``beta=0.1`` leaves unpenalised every feature whose perturbed
            gradient is at least 10 % of the sample's largest (the paper gives no value).
        mask_quantile: if set to q, ignore ``beta`` and leave the top q fraction of features (by
            saliency, per sample) unpenalised instead; robust to saliency maps whose scale drifts.
        jacobian: ``"projection"`` (Hoffman et al., n_proj VJPs), ``"hutchinson"`` (J-SIGR Eq. 6,
            n_proj forward-mode JVPs) or ``"exact"`` (K VJPs).
        n_proj: random draws per step for the stochastic Jacobian estimators.
        saliency: ``None``/``"gradient"`` (the default above), ``"none"`` (no mask: plain input-gradient
            penalty), a callable ``(g_hat, x) -> M`` (e.g. a trained :class:`SaliencyAdaptor`), or a
            precomputed tensor ``M`` of x's shape.
        backend: ``"reference"`` (plain autograd double backprop, the oracle), ``"fused"`` (compiled
            kernels where we have them) or ``"auto"`` (the fastest available).
        return_terms: also return a dict of detached 0-d tensors: ``loss``, ``ce``, ``sig``, ``jac``
            and ``mask_fraction`` (share of input features penalised).
        generator: optional ``torch.Generator`` for the noise and random projections.
        grad_scale: under fp16 autocast with a ``GradScaler``, pass ``scaler.get_scale()``: the input
            gradients are computed from scaled cotangents and unscaled before the penalty (PyTorch
            AMP's gradient-penalty recipe). Not needed for bf16 or fp32.
        mode: ``"autograd"`` (exact penalties, differentiated by double backprop) or ``"fd"`` (Finlay &
            Oberman's finite differences along the detached gradient directions, step ``fd_step``:
            no double backprop, one ordinary backward; O(fd_step) bias, see
            :mod:`jsigr_fast.finite_difference`, which also says why on ReLU networks its parameter
            gradient is not double backprop's at any step, and why it wants float32 forwards).

    Returns:
        Scalar loss, differentiable w.r.t. the model's parameters (and ``(loss, terms)`` when
        ``return_terms``).
    """
    model = _check_common(model, x, y)
    _checks.check_bool("return_terms", return_terms)
    lambda_m = _checks.check_number("lambda_m", lambda_m, low=0)
    lambda_j = _checks.check_number("lambda_j", lambda_j, low=0)
    eps = _checks.check_number("eps", eps, low=0)
    beta = _checks.check_number("beta", beta)
    if mask_quantile is not None:
        mask_quantile = _checks.check_number("mask_quantile", mask_quantile, low=0, high=1)
    _checks.check_choice("jacobian", jacobian, _checks.JACOBIAN_ESTIMATORS)
    _checks.check_int("n_proj", n_proj)
    _checks.as_generator(generator, x.device)
    check_saliency(saliency, x)
    grad_scale = _checks.check_grad_scale(grad_scale)
    fd_step = _check_mode(mode, fd_step)
    backend = resolve_backend(backend, x.device)
    if lambda_j > 0:
        check_fd_estimator(model, mode, jacobian)

    mask = None
    if lambda_m > 0 and not (isinstance(saliency, str) and saliency == "none"):
        g_hat = None  # a precomputed map needs no perturbed pass
        if not isinstance(saliency, torch.Tensor):
            with layer_rules(backend, first_order=True, device=x.device):
                g_hat = perturbed_input_gradient(model, x, y, eps=eps, generator=generator, grad_scale=grad_scale)
        mask = mask_builder(backend)(saliency, g_hat, x, beta=beta, quantile=mask_quantile)
        del g_hat  # an input-sized tensor not to hold through the step's peak

    out = backend_module(backend, mode).jsigr(model, x, y, lambda_m=lambda_m, lambda_j=lambda_j, eps=eps, mask=mask,
                                              jacobian=jacobian, n_proj=n_proj, generator=generator,
                                              grad_scale=grad_scale, **mode_kwargs(mode, fd_step, backend))
    if not return_terms:
        return out["loss"]
    terms = _detached(out, ("loss", "ce", "sig", "jac"))
    zero = out["ce"].detach().new_zeros(())
    terms.setdefault("sig", zero)
    terms.setdefault("jac", zero)
    terms["mask_fraction"] = mask_fraction(mask, x) if mask is not None else x.new_ones(())
    return out["loss"], terms


# ----------------------------------------------------------------------------------------------
# the individual regularizers
# ----------------------------------------------------------------------------------------------
@_values_under_no_grad
def input_gradient_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mask: torch.Tensor | None = None,
                           backend: str = "auto", grad_scale=None, mode: str = "autograd",
                           fd_step: float = 0.01) -> torch.Tensor:
    r"""``mean_n ||m ⊙ ∇_{x_n} ℓ_n||²`` — double backprop's penalty (Drucker & LeCun; Ross & Doshi-Velez;
    J-SIGR Eq. 8, with a mask Eq. 10).

    The gradient is of the per-sample loss (the gradient of ``sum_n ℓ_n``, never of the batch mean,
    which would scale the penalty by 1/N²). ``mask`` is None, or a bool/float tensor of x's shape or
    of ``x.shape[1:]``; it is a constant. BatchNorm running statistics are not updated.
    ``grad_scale``, ``mode``, ``fd_step``: see :func:`loss`.
    """
    model = _check_common(model, x, y)
    grad_scale = _checks.check_grad_scale(grad_scale)
    fd_step = _check_mode(mode, fd_step)
    backend = resolve_backend(backend, x.device)
    if mask is not None:
        mask = ops._prepare_mask(x, mask)
    extra = mode_kwargs(mode, fd_step, backend)
    with frozen_running_stats(model):
        out = backend_module(backend, mode).input_gradient_penalty(model, x, y, mask=mask, grad_scale=grad_scale, **extra)
    return out["penalty"]


@_values_under_no_grad
def jacobian_norm(model: nn.Module, x: torch.Tensor, *, estimator: str = "exact", n_proj: int = 1,
                  backend: str = "auto", generator: torch.Generator | None = None, grad_scale=None,
                  mode: str = "autograd", fd_step: float = 0.01) -> torch.Tensor:
    r"""``mean_n ||J_n||_F²`` of the logits w.r.t. the input (Jakubovitz & Giryes Eq. 5).

    Estimators: ``"exact"`` (K VJPs; N·K under train-mode BatchNorm), ``"projection"`` (Hoffman et
    al.: ``K ||Jᵀv||²``, v uniform on the sphere, n_proj VJPs), ``"hutchinson"`` (J-SIGR Eq. 6:
    ``||J z||²``, z standard normal, n_proj forward-mode JVPs). The stochastic ones are unbiased.
    Under train-mode BatchNorm all three measure ``(1/N) ||dZ/dX||_F²``, which also counts how a
    sample's logits move with the other samples' inputs through the batch statistics.
    BatchNorm running statistics are not updated. ``grad_scale``, ``mode``, ``fd_step``: see :func:`loss`.
    """
    model = _check_common(model, x)
    _checks.check_choice("estimator", estimator, _checks.JACOBIAN_ESTIMATORS)
    _checks.check_int("n_proj", n_proj)
    _checks.as_generator(generator, x.device)
    grad_scale = _checks.check_grad_scale(grad_scale)
    fd_step = _check_mode(mode, fd_step)
    backend = resolve_backend(backend, x.device)
    check_fd_estimator(model, mode, estimator)
    extra = mode_kwargs(mode, fd_step, backend)
    with frozen_running_stats(model):
        return backend_module(backend, mode).jacobian_norm(model, x, estimator=estimator, n_proj=n_proj,
                                                           generator=generator, grad_scale=grad_scale, **extra)["jac"]


@_values_under_no_grad
def jacobian_regularization(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lambda_j: float = 0.1,
                            squared: bool = True, estimator: str = "exact", n_proj: int = 1,
                            backend: str = "auto", return_terms: bool = False,
                            generator: torch.Generator | None = None, grad_scale=None, mode: str = "autograd",
                            fd_step: float = 0.01):
    r"""Jakubovitz & Giryes' Jacobian regularization: ``CE + lambda_j * R``.

    ``squared=True``: ``R = mean_n ||J_n||_F²``. ``squared=False``: ``R = sqrt(sum_n ||J_n||_F²) / N``,
    the Frobenius norm of the whole batch's Jacobian as their Eq. 6 writes it (a norm, not its
    square), divided by the batch size N like everything else here: their Eq. 6 sums the CE over the
    batch where this CE is the mean, so the total is their loss / N and their lambda means what it
    meant there (without the 1/N it would weigh the norm N times as much). They use it as
    post-processing (fine-tuning a trained model) with lambda_j = 0.1 on MNIST and 0.5 on CIFAR-10. ``backend``, ``grad_scale``, ``mode``,
    ``fd_step``: see :func:`loss` (the fused backend runs the forward and the Jacobian VJPs / JVPs
    with its layer rules; ``mode="fd"`` takes ``||J_n||²`` by finite differences).
    """
    model = _check_common(model, x, y)
    _checks.check_bool("return_terms", return_terms)
    _checks.as_generator(generator, x.device)  # checked even where the estimator draws nothing
    lambda_j = _checks.check_number("lambda_j", lambda_j, low=0)
    _checks.check_choice("estimator", estimator, _checks.JACOBIAN_ESTIMATORS)
    _checks.check_int("n_proj", n_proj)
    _checks.check_bool("squared", squared)
    grad_scale = _checks.check_grad_scale(grad_scale)
    fd_step = _check_mode(mode, fd_step)
    backend = resolve_backend(backend, x.device)
    check_fd_estimator(model, mode, estimator)
    if mode == "fd":  # its forward at x is the training forward (running statistics updated once)
        out = backend_module(backend, mode).jacobian_norm(model, x, estimator=estimator, n_proj=n_proj,
                                                          generator=generator, grad_scale=grad_scale,
                                                          **mode_kwargs(mode, fd_step, backend))
        _checks.check_logits(out["logits"], y, x.shape[0])  # the labels' range (its forward ran without y)
        with torch.enable_grad():
            ce, per = F.cross_entropy(out["logits"], y), out["per_sample"]
    else:
        ce, per = _jacobian_regularization_terms(model, x, y, estimator=estimator, n_proj=n_proj, backend=backend,
                                                 generator=generator, grad_scale=grad_scale)
    with torch.enable_grad():
        reg = per.mean() if squared else per.sum().sqrt() / x.shape[0]
        total = ce + lambda_j * reg
    if return_terms:
        return total, {"loss": total.detach(), "ce": ce.detach(), "jac": reg.detach()}
    return total


def _jacobian_regularization_terms(model, x, y, *, estimator, n_proj, backend, generator, grad_scale):
    """The CE and the per-sample ``||J_n||_F²`` of :func:`jacobian_regularization`, by autograd."""
    with torch.enable_grad():
        with layer_rules(backend):
            xg, logits = reference.forward(model, x, y)
            ce = F.cross_entropy(logits, y)
            if estimator != "hutchinson":
                per = reference.jacobian_sq(model, logits, xg, x, estimator=estimator, n_proj=n_proj,
                                            generator=generator, grad_scale=grad_scale)
        if estimator == "hutchinson":  # its own forward-mode pass(es), with the backend's forward-mode rules
            per = backend_module(backend).jacobian_hutchinson_sq(model, x, n_proj=n_proj, generator=generator)
    return ce, per


@_values_under_no_grad
def double_backprop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lambda_ig: float = 1.0,
                    backend: str = "auto", return_terms: bool = False, grad_scale=None, mode: str = "autograd",
                    fd_step: float = 0.01):
    r"""Double backpropagation (Drucker & LeCun 1992; Ross & Doshi-Velez 2018):
    ``CE + lambda_ig * mean_n ||∇_{x_n} ℓ_n||²`` (J-SIGR Eq. 8 with per-sample averaging).
    ``grad_scale``, ``mode``, ``fd_step``: see :func:`loss`."""
    model = _check_common(model, x, y)
    _checks.check_bool("return_terms", return_terms)
    lambda_ig = _checks.check_number("lambda_ig", lambda_ig, low=0)
    grad_scale = _checks.check_grad_scale(grad_scale)
    fd_step = _check_mode(mode, fd_step)
    backend = resolve_backend(backend, x.device)
    extra = mode_kwargs(mode, fd_step, backend)
    out = backend_module(backend, mode).input_gradient_penalty(model, x, y, grad_scale=grad_scale, **extra)
    total = out["ce"] + lambda_ig * out["penalty"]
    if return_terms:
        return total, {"loss": total.detach(), "ce": out["ce"].detach(), "sig": out["penalty"].detach()}
    return total


# ----------------------------------------------------------------------------------------------
# Interpretation Regularization (Noack et al.)
# ----------------------------------------------------------------------------------------------
def smoothgrad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, n_samples: int = 50, sigma: float = 0.15,
               phi: float | None = 1.0, chunk: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""SmoothGrad target interpretations (Noack et al. Eqs. 10-11), detached.

    ``I(x) = (1/n) sum_i J_c(x + e_i)`` with ``e_i ~ N(0, (sigma * (max(x_n) - min(x_n)))²)`` per sample
    (SmoothGrad's noise level, a fraction of the sample's value range: 0.15 is their recommendation)
    and ``J_c`` the gradient of the true-class logit. Then, per sample, every value within
    ``mean ± phi * std`` of that map is set to zero (``phi=None`` skips the thresholding).
    ``chunk`` noisy copies of the batch are pushed through the model at once. Running statistics of
    BatchNorm are not updated; use the teacher in eval mode, as one normally would.
    """
    model = _check_common(model, x, y)
    n_samples = _checks.check_int("n_samples", n_samples)
    sigma = _checks.check_number("sigma", sigma, low=0)
    chunk = _checks.check_int("chunk", chunk)
    if phi is not None:
        phi = _checks.check_number("phi", phi, low=0)
    model = _checks.unwrap_parallel(model)
    x0 = x.detach()
    n = x0.shape[0]
    flat = x0.reshape(n, -1)
    scale = (sigma * (flat.amax(1) - flat.amin(1))).view(n, *([1] * (x0.dim() - 1)))
    acc = torch.zeros_like(x0)
    done = 0
    with torch.enable_grad(), frozen_running_stats(model):
        while done < n_samples:
            c = min(chunk, n_samples - done)
            noise = _checks.randn((c, *x0.shape), like=x0, generator=generator) * scale
            xs = (x0.unsqueeze(0) + noise).reshape(c * n, *x0.shape[1:]).requires_grad_(True)
            # a copy of the leaf: an in-place first op (nn.ReLU(inplace=True)) would be refused on it
            logits = _checks.check_logits(model(_checks.private_input(xs)), None, c * n)
            jc = reference.class_gradient(logits, xs, y.repeat(c), create_graph=False)
            acc += jc.reshape(c, *x0.shape).sum(0)
            done += c
    target = acc / n_samples
    if phi is not None:
        f = target.reshape(n, -1)
        mu, sd = f.mean(1, keepdim=True), f.std(1, unbiased=False, keepdim=True)
        keep = (f < mu - phi * sd) | (f > mu + phi * sd)
        target = (f * keep).reshape(target.shape)
    return target


@_values_under_no_grad
def interpretation_regularization(model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, *,
                                  lambda_d: float = 3.0, lambda_m: float = 0.15, backend: str = "auto",
                                  return_terms: bool = False, grad_scale=None):
    r"""Interpretation Regularization (Noack et al. Eq. 9):
    ``CE - lambda_d * mean_n cos(J_c(x_n), I(x_n)) + lambda_m * mean_n ||J_c(x_n)||``.

    ``J_c`` is the input gradient of the true-class logit, ``targets`` the interpretations ``I``
    (e.g. :func:`smoothgrad` of a robust teacher), x's shape. The magnitude term is a norm, not its
    square. A sample whose ``J_c`` or ``I`` is zero (e.g. every ReLU off) has cosine 0 and contributes no
    gradient through it (:func:`jsigr_fast.reference.cosine_rows`); ``||J_c||`` has gradient 0 at ``J_c = 0``.
    Defaults are the paper's MNIST grid-search optimum (3.0, 0.15). ``backend``, ``grad_scale``:
    see :func:`loss` (the fused backend runs the forward and the class-gradient VJP with its layer rules).
    """
    model = _check_common(model, x, y)
    _checks.check_bool("return_terms", return_terms)
    lambda_d = _checks.check_number("lambda_d", lambda_d, low=0)
    lambda_m = _checks.check_number("lambda_m", lambda_m, low=0)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor of x's shape, got {type(targets).__name__}")
    if targets.shape != x.shape:
        raise ValueError(f"targets must have x's shape {tuple(x.shape)}, got {tuple(targets.shape)}")
    grad_scale = _checks.check_grad_scale(grad_scale)
    backend = resolve_backend(backend, x.device)
    with torch.enable_grad(), layer_rules(backend):
        xg, logits = reference.forward(model, x, y)
        ce = F.cross_entropy(logits, y)
        jc = reference.class_gradient(logits, xg, y, grad_scale=grad_scale).reshape(x.shape[0], -1)
        # zero-safe: a sample whose J_c is identically 0 has cos 0 and no gradient (not 1/eps, NaN in fp16)
        cos = reference.cosine_rows(jc, targets.detach().reshape(x.shape[0], -1).to(jc.dtype)).mean()
        mag = jc.norm(dim=1).mean()
        total = ce - lambda_d * cos + lambda_m * mag
    if return_terms:
        return total, {"loss": total.detach(), "ce": ce.detach(), "cos": cos.detach(), "mag": mag.detach()}
    return total
