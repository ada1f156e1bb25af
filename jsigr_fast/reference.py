"""Plain-autograd reference implementations: the oracle every faster path must match.

Written for clarity, not speed: each regularizer is double backprop spelled out with
``torch.autograd.grad(..., create_graph=True)``. Tests compare the fused kernels against these
functions and benchmarks use them as the naive baseline, so both import them from here.

Conventions (SPEC.md), for a batch map ``F: X (N x D) -> Z (N x K)`` of logits:

* Every regularizer is a per-sample quantity averaged over the batch.
* The input gradient is ``G = grad_X sum_n CE(Z_n, y_n)``; its row ``g_n`` is the per-sample
  gradient ``grad_{x_n} l_n`` whenever the model treats samples independently (eval-mode BatchNorm,
  GroupNorm/LayerNorm, no normalisation). Under train-mode BatchNorm the batch statistics couple
  samples and ``g_n = sum_m J_mn^T (p_m - onehot(y_m))`` includes the cross-sample terms: it is the
  gradient that the training loss actually has w.r.t. x_n.
* The Jacobian term is ``R_j = (1/N) ||dZ/dX||_F^2``. For sample-independent models the batch
  Jacobian is block diagonal and this is exactly ``mean_n ||J_n||_F^2``; under train-mode BatchNorm
  it also counts the off-diagonal blocks. All three estimators (exact, projection, hutchinson)
  return (estimates of) this same quantity in every mode, so they can be compared with each other.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from . import _checks
from .batchnorm import batch_coupled, decomposed_normalization, frozen_running_stats
from .higher_order import safe_ops

SqNorm = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# op references
# ----------------------------------------------------------------------------------------------
def masked_sq_norm_ref(g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``out[n] = sum_d (mask[n, d] * g[n, d])**2`` in plain PyTorch (reference of ops.masked_sq_norm)."""
    v = g if mask is None else g * mask
    return v.reshape(v.shape[0], -1).pow(2).sum(dim=1)


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
def input_leaf(x: torch.Tensor) -> torch.Tensor:
    """The tensor to differentiate with respect to, without touching the caller's ``x``.

    If x already requires grad, an alias of it (``x.view_as(x)``): the loss stays differentiable
    w.r.t. whatever produced x, but the internal gradients w.r.t. the alias stop there, so gradient
    hooks the caller registered on x run only in the caller's own backward (on x itself they would
    also rescale the penalty's input gradient). Otherwise a detached alias with
    ``requires_grad=True``. Either way the caller's tensor and its ``requires_grad`` flag are left alone.
    The model itself gets a copy (:func:`jsigr_fast._checks.private_input`), never this tensor: a
    forward that writes into its input in place would write through it into x, or be refused on a leaf.
    """
    return x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)


def forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model on a copy of a differentiable alias of x; return ``(x_leaf, logits)``. Layers without
    a native double backward run their composites (:func:`jsigr_fast.higher_order.safe_ops`)."""
    xg = input_leaf(x)
    with safe_ops():
        logits = _checks.check_logits(model(_checks.private_input(xg)), y, x.shape[0])
    return xg, logits


def vjp(outputs: torch.Tensor, xg: torch.Tensor, cotangent: torch.Tensor | None = None, *, create_graph: bool = True,
        grad_scale=None, is_grads_batched: bool = False) -> torch.Tensor:
    """``grad_x <outputs, cotangent>`` (cotangent None: ones), keeping the graph when create_graph.

    With ``grad_scale = s`` the cotangent is multiplied by s for the backward pass and the result
    divided by s: mathematically a no-op, but under fp16 autocast it keeps small gradients from
    flushing to zero (PyTorch AMP's gradient-penalty recipe: pass ``scaler.get_scale()``).
    """
    cot = torch.ones_like(outputs) if cotangent is None else cotangent
    if grad_scale is not None:
        cot = cot * grad_scale
    (g,) = torch.autograd.grad(outputs, xg, grad_outputs=cot, create_graph=create_graph, retain_graph=True,
                               is_grads_batched=is_grads_batched)
    return g if grad_scale is None else g / grad_scale


def input_gradient(logits: torch.Tensor, xg: torch.Tensor, y: torch.Tensor, *, create_graph: bool = True,
                   grad_scale=None):
    """Per-sample CE losses and ``G = grad_x sum_n l_n`` (with its graph when create_graph)."""
    per_sample = F.cross_entropy(logits, y, reduction="none")
    g = vjp(per_sample.sum(), xg, create_graph=create_graph, grad_scale=grad_scale)
    return per_sample, g


def unit_sphere(n: int, k: int, *, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` independent vectors uniform on the unit sphere S^{k-1} (normalised Gaussians)."""
    v = _checks.randn((n, k), like=like, generator=generator)
    return v / v.norm(dim=1, keepdim=True)


def jacobian_projection_sq(logits: torch.Tensor, xg: torch.Tensor, *, n_proj: int = 1,
                           generator: torch.Generator | None = None, grad_scale=None) -> torch.Tensor:
    """Hoffman et al.'s estimator, per sample: ``K * ||J^T v||^2`` averaged over n_proj draws of
    ``v`` uniform on S^{K-1} (one independent v per sample). Unbiased for ``||J||_F^2`` because
    ``E[v v^T] = I / K``. Returns ``(N,)``, differentiable."""
    n, k = logits.shape
    total = logits.new_zeros(n)
    for _ in range(n_proj):
        v = unit_sphere(n, k, like=logits, generator=generator)
        u = vjp(logits, xg, v, grad_scale=grad_scale)
        total = total + k * u.reshape(n, -1).pow(2).sum(dim=1)
    return total / n_proj


def jacobian_exact_sq(logits: torch.Tensor, xg: torch.Tensor, *, coupled: bool = False,
                      chunk: int = 64, grad_scale=None) -> torch.Tensor:
    """Exact ``sum_m ||J_mn||_F^2`` for each input sample n, differentiable. Returns ``(N,)``.

    Sample-independent model (``coupled=False``): K VJPs with the cotangent ``e_k`` on every sample
    at once give row k of every ``J_n``; the off-diagonal blocks are zero.
    Coupled model (train-mode BatchNorm): one VJP per (sample, class) cotangent, N*K in all,
    vmapped in chunks with ``is_grads_batched``.
    """
    n, k = logits.shape
    total = logits.new_zeros(n)
    if not coupled:
        for c in range(k):
            e = torch.zeros_like(logits)
            e[:, c] = 1
            u = vjp(logits, xg, e, grad_scale=grad_scale)
            total = total + u.reshape(n, -1).pow(2).sum(dim=1)
        return total
    for start in range(0, n * k, chunk):
        idx = torch.arange(start, min(start + chunk, n * k), device=logits.device)
        cot = torch.zeros(idx.numel(), n * k, dtype=logits.dtype, device=logits.device)
        cot[torch.arange(idx.numel(), device=logits.device), idx] = 1
        cot = cot.reshape(-1, n, k)
        try:
            u = vjp(logits, xg, cot, grad_scale=grad_scale, is_grads_batched=True)
        except RuntimeError as exc:  # a layer without a vmap rule for its backward: loop instead
            warnings.warn(f"jacobian_exact_sq: batched VJP failed ({exc}); falling back to a loop", RuntimeWarning)
            u = torch.stack([vjp(logits, xg, c, grad_scale=grad_scale) for c in cot])
        total = total + u.reshape(u.shape[0], n, -1).pow(2).sum(dim=(0, 2))
    return total


def _jvp_forward_mode(model: nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # the dual's primal is a copy of x (make_dual aliases its primal, and a model that writes into its
    # input in place would write into x), still differentiable in x; make_dual lays z out as xp
    xp = _checks.private_input(x)
    with safe_ops(forward_ad=True), fwAD.dual_level():
        out = _checks.check_logits(model(fwAD.make_dual(xp, z)), None, x.shape[0])
        jz = fwAD.unpack_dual(out).tangent
    if jz is None:  # the output does not depend on x
        jz = torch.zeros_like(out)
    return jz


def _jvp_double_vjp(model: nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # J z = d/du <J^T u, z>: the VJP is linear in u, so differentiating it along z gives the JVP.
    xg = input_leaf(x)  # x's own graph kept: J z stays differentiable in x
    with safe_ops():
        out = _checks.check_logits(model(_checks.private_input(xg)), None, x.shape[0])
    u = torch.zeros_like(out, requires_grad=True)
    (vjp_u,) = torch.autograd.grad(out, xg, grad_outputs=u, create_graph=True)
    (jz,) = torch.autograd.grad(vjp_u, u, grad_outputs=z, create_graph=True)
    return jz


def tangent_sq_norm(jz: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``||J z||^2`` per sample (the leading dims of ``jz`` other than the last one are kept: ``(N, K)``
    gives ``(N,)``, ``(P, N, K)`` gives ``(P, N)``), in the dtype of ``x`` promoted with the tangent's.

    Under autocast the logits' tangent comes out in the low-precision dtype while ``x`` is float32: the
    square and the sum then run in float32, so the Hutchinson term has the dtype (and the accumulation)
    of the VJP-based estimators, whose ``J^T v`` is a gradient w.r.t. ``x`` (on CUDA, autocast's fp32
    list would widen the ``pow`` anyway; on the CPU it does not). A half-precision model fed a
    half-precision ``x`` keeps its dtype."""
    t = jz.to(torch.promote_types(jz.dtype, x.dtype))
    return t.pow(2).sum(dim=-1)


def jacobian_hutchinson_sq(model: nn.Module, x: torch.Tensor, *, n_proj: int = 1,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """J-SIGR Eq. 6: ``||J z||^2`` with ``z ~ N(0, I_D)``, a forward-mode (JVP) pass per draw.

    Unbiased for ``||J||_F^2`` because ``E[z z^T] = I``. Returns ``(N,)`` (one value per output
    sample), differentiable w.r.t. the parameters (and x, if it requires grad: the tangent's primal
    is a copy of x, laid out as x, and so is the tangent). Runs its own forward(s) at x, with running
    statistics frozen and Batch/Instance/LayerNorm decomposed into elementary ops, because PyTorch's
    native kernels give wrong parameter gradients for a differentiated forward-mode tangent
    (see jsigr_fast.batchnorm). Forward mode needs no loss scaling under fp16 (tangents are not
    small the way cotangents are), so it takes no ``grad_scale``.
    """
    model = _checks.unwrap_parallel(model)
    n = x.shape[0]
    total = None
    with torch.enable_grad(), frozen_running_stats(model), decomposed_normalization():
        for _ in range(n_proj):
            z = _checks.randn(x.shape, like=x.detach(), generator=generator)
            try:
                jz = _jvp_forward_mode(model, x, z)
            except NotImplementedError as exc:  # a layer (e.g. a custom autograd.Function) lacks a jvp rule
                warnings.warn(f"hutchinson: forward-mode AD unsupported by a layer ({exc}); using the double-VJP JVP",
                              RuntimeWarning)
                jz = _jvp_double_vjp(model, x, z)
            sq = tangent_sq_norm(jz.reshape(n, -1), x)
            total = sq if total is None else total + sq
    return total / n_proj


def jacobian_sq(model: nn.Module, logits: torch.Tensor | None, xg: torch.Tensor | None, x: torch.Tensor, *,
                estimator: str, n_proj: int = 1, generator: torch.Generator | None = None,
                coupled: bool | None = None, grad_scale=None) -> torch.Tensor:
    """Per-sample Jacobian squared-norm term by the named estimator (see the module docstring)."""
    if estimator == "projection":
        return jacobian_projection_sq(logits, xg, n_proj=n_proj, generator=generator, grad_scale=grad_scale)
    if estimator == "exact":
        return jacobian_exact_sq(logits, xg, coupled=batch_coupled(model) if coupled is None else coupled,
                                 grad_scale=grad_scale)
    if estimator == "hutchinson":
        return jacobian_hutchinson_sq(model, x, n_proj=n_proj, generator=generator)
    raise ValueError(f"unknown Jacobian estimator {estimator!r}")


# ----------------------------------------------------------------------------------------------
# the regularizers
# ----------------------------------------------------------------------------------------------
def input_gradient_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mask: torch.Tensor | None = None,
                           sq_norm: SqNorm = masked_sq_norm_ref, grad_scale=None) -> dict[str, torch.Tensor]:
    """``R = mean_n ||m * g_n||^2`` and the CE of the same forward. Returns a dict of tensors."""
    with torch.enable_grad():
        xg, logits = forward(model, x, y)
        per_sample, g = input_gradient(logits, xg, y, grad_scale=grad_scale)
        penalty = sq_norm(g, mask).mean()
    return {"penalty": penalty, "ce": per_sample.mean(), "logits": logits}


def jacobian_norm(model: nn.Module, x: torch.Tensor, *, estimator: str = "exact", n_proj: int = 1,
                  generator: torch.Generator | None = None, coupled: bool | None = None,
                  grad_scale=None) -> dict[str, torch.Tensor]:
    """``R_j = (1/N) ||dZ/dX||_F^2`` (= ``mean_n ||J_n||_F^2`` for sample-independent models)."""
    with torch.enable_grad():
        if estimator == "hutchinson":
            per = jacobian_hutchinson_sq(model, x, n_proj=n_proj, generator=generator)
            return {"jac": per.mean(), "per_sample": per}
        xg, logits = forward(model, x, None)
        per = jacobian_sq(model, logits, xg, x, estimator=estimator, n_proj=n_proj, generator=generator,
                          coupled=coupled, grad_scale=grad_scale)
    return {"jac": per.mean(), "per_sample": per, "logits": logits}


def jsigr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lambda_m: float, lambda_j: float, eps: float,
          mask: torch.Tensor | None, jacobian: str, n_proj: int, generator: torch.Generator | None,
          sq_norm: SqNorm = masked_sq_norm_ref, grad_scale=None) -> dict[str, torch.Tensor]:
    """J-SIGR (Eq. 10): ``CE + lambda_m * mean_n ||m * g_n||^2 + lambda_j * R_j`` given the mask.

    The mask (from the perturbed-input saliency) is computed by the caller. One forward at x
    serves the CE, the input gradient and the projection / exact Jacobian estimators; the
    Hutchinson estimator adds its own forward-mode pass.
    """
    with torch.enable_grad():
        xg, logits = forward(model, x, y)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        ce = per_sample.mean()
        out = {"ce": ce, "logits": logits}
        loss = ce
        if lambda_m > 0:
            g = vjp(per_sample.sum(), xg, grad_scale=grad_scale)
            out["sig"] = sq_norm(g, mask).mean()
            loss = loss + lambda_m * out["sig"]
        if lambda_j > 0:
            out["jac"] = jacobian_sq(model, logits, xg, x, estimator=jacobian, n_proj=n_proj,
                                     generator=generator, grad_scale=grad_scale).mean()
            loss = loss + lambda_j * out["jac"]
        out["loss"] = loss
    return out


def class_gradient(logits: torch.Tensor, xg: torch.Tensor, y: torch.Tensor, *, create_graph: bool = True,
                   grad_scale=None) -> torch.Tensor:
    """``J_c = grad_x z_{y}``: the true-class logit's input gradient (the "simple gradient" saliency)."""
    sel = torch.zeros_like(logits).scatter_(1, y[:, None], 1.0)
    return vjp(logits, xg, sel, create_graph=create_graph, grad_scale=grad_scale)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""``cos(a_n, b_n) = <a_n, b_n> / (||a_n|| ||b_n||)`` per row of two ``(N, D)`` tensors, in ``a``'s dtype
    (computed in at least float32). A row where either vector is zero, where the cosine is undefined, gives
    0 with a zero gradient (the convention ``||v||`` has at ``v = 0``).

    ``F.cosine_similarity(eps=1e-12)`` has the same value there but the gradient ``b_n / (eps ||b_n||)``:
    about 1e11 in float32, which overflows float16 on its way into the half-precision double backward of
    the model (then ``inf * 0 = NaN`` where the input gradient is identically zero, e.g. a sample with
    every ReLU off, whose parameter gradient is exactly 0 in float32); in float16 ``eps`` itself flushes
    to zero and the gradient is ``0 / 0``. Near (not at) zero the gradient is ``~1 / ||a_n||`` whatever
    the formulation: a legitimately large value, which can still overflow float16.
    """
    acc = torch.promote_types(a.dtype, torch.float32)
    af, bf = a.to(acc), b.to(acc)
    na, nb = af.norm(dim=1, keepdim=True), bf.norm(dim=1, keepdim=True)
    ok = (na > 0) & (nb > 0)
    one = torch.ones((), dtype=acc, device=a.device)
    cos = ((af / torch.where(ok, na, one)) * (bf / torch.where(ok, nb, one))).sum(dim=1)
    return torch.where(ok.squeeze(1), cos, torch.zeros((), dtype=acc, device=a.device)).to(a.dtype)


# ----------------------------------------------------------------------------------------------
# train-mode batch norm: references of the ops jsigr_fast::batch_norm_train / _backward /
# _double_backward (csrc/batch_norm.cpp; the derivation is in csrc/README.md)
# ----------------------------------------------------------------------------------------------
def _bn_view(x: torch.Tensor):
    """Reduction dims, per-channel broadcast shape and count M = N * prod(spatial) of an (N, C, *) tensor."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    return dims, shape, x.numel() // x.shape[1]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_norm_train_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train-mode batch norm ``(y, mean, invstd)`` in elementary ops (differentiable at every order).

    ``mean`` and ``invstd = 1/sqrt(var + eps)`` (biased variance) are per channel, in float32 for
    float16/bfloat16/float32 inputs and float64 for float64; ``y`` has x's dtype. Reference of
    ``jsigr_fast::batch_norm_train``.
    """
    dims, shape, _ = _bn_view(x)
    xf = x.to(_opmath(x.dtype))
    mean = xf.mean(dim=dims)
    xc = xf - mean.reshape(shape)
    invstd = torch.rsqrt(xc.pow(2).mean(dim=dims) + eps)
    y = xc * invstd.reshape(shape)
    if weight is not None:
        y = y * weight.to(xf.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(xf.dtype).reshape(shape)
    return y.to(x.dtype), mean, invstd


def batch_norm_backward_ref(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                            invstd: torch.Tensor, grad_mean: torch.Tensor | None = None,
                            grad_invstd: torch.Tensor | None = None):
    """VJP of :func:`batch_norm_train_ref`: ``(grad_x, grad_weight, grad_bias)`` given the cotangents of
    ``(y, mean, invstd)`` (the [C] gradients in mean's dtype). Reference of ``jsigr_fast::batch_norm_backward``.

    As a function of its own inputs, ``mean`` and ``invstd`` are independent arguments (``x`` enters
    only through ``xhat = (x - mean) * invstd``): the batch-statistics terms of the second derivative
    reach ``x`` through the chain rule, via the ``(grad_mean, grad_invstd)`` the double backward
    returns. With ``mean, invstd`` the statistics of x and no ``grad_mean/grad_invstd`` it is the usual
    ``grad_x = w * invstd * (grad_y - mean(grad_y) - xhat * mean(grad_y * xhat))``.
    """
    dims, shape, m = _bn_view(x)
    acc = mean.dtype
    s = invstd.reshape(shape)
    xhat = (x.to(acc) - mean.reshape(shape)) * s
    gy = grad_y.to(acc)
    a = gy.sum(dim=dims)
    b = (gy * xhat).sum(dim=dims)
    w = 1.0 if weight is None else weight.to(acc).reshape(shape)
    gx = w * s * (gy - a.reshape(shape) / m - xhat * b.reshape(shape) / m)
    if grad_mean is not None:
        gx = gx + grad_mean.to(acc).reshape(shape) / m
    if grad_invstd is not None:
        gx = gx - grad_invstd.to(acc).reshape(shape) * s * s * xhat / m
    return gx.to(x.dtype), b, a


def batch_norm_double_backward_ref(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight, mean, invstd,
                                   grad_mean=None, grad_invstd=None):
    """VJP of :func:`batch_norm_backward_ref` in closed form (csrc/README.md has the derivation).

    Given the cotangents ``(u, alpha, beta)`` of ``(grad_x, grad_weight, grad_bias)`` (None: zero)
    returns the gradients with respect to ``(grad_y, x, weight, mean, invstd, grad_mean, grad_invstd)``
    (weight None: ``d_weight`` is the derivative at an implicit weight of ones; the [C] gradients are
    in mean's dtype). Reference of
    ``jsigr_fast::batch_norm_double_backward``; differentiable again (every op is elementary).
    """
    dims, shape, m = _bn_view(x)
    acc = mean.dtype
    sv = invstd
    s = sv.reshape(shape)
    xc = x.to(acc) - mean.reshape(shape)
    xhat = xc * s
    gy = grad_y.to(acc)
    c = x.shape[1]
    zeros = gy.new_zeros(c)
    wv = zeros + 1 if weight is None else weight.to(acc)
    w = wv.reshape(shape)
    alpha = zeros if grad_grad_weight is None else grad_grad_weight.to(acc)
    beta = zeros if grad_grad_bias is None else grad_grad_bias.to(acc)
    q = zeros if grad_invstd is None else grad_invstd.to(acc)
    a = gy.sum(dim=dims)  # grad_bias
    b1 = (gy * xc).sum(dim=dims)  # sum grad_y (x - mean) = grad_weight / invstd
    b = b1 * sv  # grad_weight
    if grad_grad_x is None:
        u = None
        su = sux = sugy = zeros
    else:
        u = grad_grad_x.to(acc)
        su = u.sum(dim=dims)
        sux = (u * xhat).sum(dim=dims)
        sugy = (u * gy).sum(dim=dims)
    e = sugy - a * su / m - b * sux / m
    d_weight = sv * e
    d_grad_mean = su / m
    d_grad_invstd = -sv * sv * sux / m
    sum_h = alpha * a - wv * sv / m * (a * sux + b * su) - q * sv * sv * su / m
    d_mean = -sv * sum_h
    d_invstd = wv * e - 3 * q * sv * sux / m - 2 * wv * b * sux / m + alpha * b1

    def bc(t):
        return t.reshape(shape)

    d_grad_y = bc(sv * (alpha - wv * sv * sux / m)) * xc + bc(beta - wv * sv * su / m)
    d_x = bc(sv * alpha - wv * sv * sv * sux / m) * gy
    if u is not None:
        d_grad_y = d_grad_y + w * s * u
        d_x = d_x + bc(-(wv * sv * sv * b + q * sv ** 3) / m) * u
    return d_grad_y.to(x.dtype), d_x.to(x.dtype), d_weight, d_mean, d_invstd, d_grad_mean, d_grad_invstd


# ----------------------------------------------------------------------------------------------
# the selective mask and the loss head: references of jsigr_fast::gradient_saliency_mask,
# threshold_mask, adaptor_saliency_mask, masked_sq_norm_bool (= masked_sq_norm_ref with a bool
# mask) and cross_entropy_cotangent (csrc/saliency_mask.cpp, csrc/cross_entropy_cotangent.cpp)
# ----------------------------------------------------------------------------------------------
def gradient_saliency_mask_ref(g: torch.Tensor, beta: float, quantile: float | None = None) -> torch.Tensor:
    """J-SIGR's default mask as a bool tensor: :func:`jsigr_fast.saliency.selective_mask` of
    :func:`jsigr_fast.saliency.gradient_saliency` (``|g| / max_d |g|`` per sample), today's path."""
    from .saliency import gradient_saliency, selective_mask

    return selective_mask(gradient_saliency(g), beta=beta, quantile=quantile) != 0


def threshold_mask_ref(saliency_map: torch.Tensor, beta: float, quantile: float | None = None) -> torch.Tensor:
    """:func:`jsigr_fast.saliency.selective_mask` of a given map, as a bool tensor."""
    from .saliency import selective_mask

    return selective_mask(saliency_map, beta=beta, quantile=quantile) != 0


def adaptor_saliency_ref(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                         normalize: bool = True) -> torch.Tensor:
    """:class:`jsigr_fast.SaliencyAdaptor`'s map ``tanh(conv1x1(g / rms(g)))`` from its conv weight and bias."""
    shape = g.shape
    c = 1 if g.dim() == 2 else shape[1]
    g4 = g.reshape(shape[0], c, -1, 1)
    if normalize:
        g4 = g4 / (g4.pow(2).mean(dim=(1, 2, 3), keepdim=True) + torch.finfo(g4.dtype).tiny).sqrt()
    return torch.tanh(F.conv2d(g4, weight.reshape(c, c, 1, 1).to(g4.dtype),
                               None if bias is None else bias.to(g4.dtype))).reshape(shape)


def adaptor_saliency_mask_ref(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, beta: float,
                              quantile: float | None = None, *, normalize: bool = True) -> torch.Tensor:
    """The adaptor's selective mask (bool): :func:`adaptor_saliency_ref`, then the rule."""
    return threshold_mask_ref(adaptor_saliency_ref(g, weight, bias, normalize=normalize), beta, quantile)


def cross_entropy_cotangent_ref(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.cross_entropy(logits, target, reduction="none"), softmax(logits) - onehot(target))``."""
    per_sample = F.cross_entropy(logits, target, reduction="none")
    r = torch.softmax(logits, dim=1) - F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return per_sample, r


def make_mask(saliency, g_hat: torch.Tensor | None, x: torch.Tensor, *, beta: float,
              quantile: float | None) -> torch.Tensor:
    """The selective mask ``1[M <= beta]`` (or the quantile rule) for the ``saliency`` argument of
    :func:`jsigr_fast.loss` (None/"gradient", a callable such as a trained adaptor, or a precomputed
    map; ``g_hat`` is None for a map), as a float tensor of M's dtype: the reference path. Every
    backend module offers a ``make_mask`` with this signature (:func:`jsigr_fast.fused.make_mask`
    returns the same features as a bool tensor)."""
    from .saliency import compute_saliency, selective_mask

    return selective_mask(compute_saliency(saliency, g_hat, x), beta=beta, quantile=quantile)
