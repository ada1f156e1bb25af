"""The selective mask of J-SIGR: perturbed-input gradient, saliency map, threshold.

J-SIGR (Liu et al. 2023, Eq. 10) penalises the input gradient only where the saliency map is low:
``mask = 1[M <= beta]``, with ``M = f(grad_x l(x_hat))`` the saliency of the gradient at a
perturbed input ``x_hat = x + eps * z``, ``z ~ N(0, sigma^2)``, ``sigma = std(x)``. The mask is a
constant: no gradient flows through the indicator.

``f`` is either the trained adaptor of :class:`jsigr_fast.JSIGR` (a 1x1 convolution and tanh,
trained JARN-style to make the map look like an image), or, for the stateless functional
:func:`jsigr_fast.loss`, the default :func:`gradient_saliency`: the gradient's magnitude scaled
per sample to [0, 1].
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks
from .batchnorm import frozen_running_stats

__all__ = ["perturbed_input_gradient", "gradient_saliency", "selective_mask", "SaliencyAdaptor", "Saliency"]

Saliency = Union[None, str, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def perturbed_input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3,
                             generator: torch.Generator | None = None, grad_scale=None) -> torch.Tensor:
    """``grad_{x_hat} sum_n CE(f(x_hat)_n, y_n)`` at ``x_hat = x + eps * sigma * z``, no graph kept.

    ``sigma`` is the standard deviation of the whole batch ``x`` (the paper's "noise with identical
    variance to x"), ``z`` standard normal. With ``eps = 0`` it is the plain input gradient at x.
    Train-mode BatchNorm uses the batch statistics of ``x_hat`` but its running statistics are not
    updated; a DistributedDataParallel model runs unwrapped (no gradient all-reduce is needed).
    ``grad_scale``: see :func:`jsigr_fast.reference.vjp`. Returns a detached tensor of ``x``'s shape.
    """
    model = _checks.unwrap_parallel(model)
    x0 = x.detach()
    sigma = x0.std(unbiased=False) if x0.numel() > 1 else x0.new_zeros(())
    x_hat = x0 + eps * sigma * _checks.randn(x0.shape, like=x0, generator=generator) if eps > 0 else x.detach()
    x_hat.requires_grad_(True)  # eps = 0: a fresh alias of x (the model gets a copy below); x's flag stays
    with torch.enable_grad(), frozen_running_stats(model):
        # the model gets a copy of the leaf: an in-place first op would be refused on the leaf itself
        logits = _checks.check_logits(model(_checks.private_input(x_hat)), y, x0.shape[0])
        loss = F.cross_entropy(logits, y, reduction="sum")
        if grad_scale is not None:
            loss = loss * grad_scale
        (g,) = torch.autograd.grad(loss, x_hat)
    return (g if grad_scale is None else g / grad_scale).detach()


def gradient_saliency(g_hat: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Default saliency: ``M = |g| / max_d |g_d|`` per sample, in [0, 1] (scale-free, so a fixed
    ``beta`` means the same thing throughout training). A sample with an all-zero gradient gets M = 0."""
    a = g_hat.detach().abs()
    peak = a.flatten(1).amax(dim=1).clamp_min(torch.finfo(a.dtype).tiny)
    return a / peak.view(-1, *([1] * (a.dim() - 1)))


def quantile_kept(quantile: float, d: int) -> int:
    """How many of a sample's ``d`` features the quantile rule leaves unpenalised: the largest
    ``k`` in ``[0, d]`` with ``k / d <= q`` (``k / d`` the correctly rounded float division).

    Not ``int(q * d)``: the product is rounded, and for many decimal ``q`` it lands just below an
    integer (``0.29 * 100 == 28.999999999999996``, which would keep 28 features, not 29). ``q`` is the
    float nearest the decimal the user wrote and ``k / d`` is correctly rounded, so a ``q`` equal to
    some ``k / d`` keeps exactly ``k``. ``k / d`` is non-decreasing in ``k``, so the count is found from
    ``int(q * d)`` (off by at most one) by stepping. The compiled kernels use the same steps
    (``csrc/quantile_rule.h``), the Triton launchers this function: every backend agrees.
    """
    q, d = float(quantile), int(d)
    k = int(q * d)  # floor, q * d >= 0
    while k < d and (k + 1) / d <= q:
        k += 1
    while k > 0 and k / d > q:
        k -= 1
    return k


def selective_mask(saliency_map: torch.Tensor, *, beta: float | None = 0.1,
                   quantile: float | None = None) -> torch.Tensor:
    """``1[M <= beta]`` (penalise the non-salient features), as a float tensor of M's shape.

    With ``quantile=q`` the threshold is chosen per sample so the top ``q`` fraction of features by
    saliency are left unpenalised (``beta`` is then ignored): the :func:`quantile_kept` most salient
    of the ``D`` features of each sample (``floor(q D)`` computed exactly: the largest ``k`` with
    ``k / D <= q``), and the other ``D - quantile_kept(q, D)`` are penalised; ties at the threshold
    are penalised.
    """
    M = saliency_map.detach()
    if quantile is None:
        if beta is None:
            raise ValueError("selective_mask needs beta or quantile")
        return (M <= beta).to(M.dtype if M.is_floating_point() else torch.float32)
    n, d = M.shape[0], M[0].numel()
    k = d - quantile_kept(quantile, d)  # number of features penalised, the k least salient
    flat = M.reshape(n, d)
    if k <= 0:
        return torch.zeros_like(M)
    if k >= d:
        return torch.ones_like(M)
    thresh = flat.kthvalue(k, dim=1, keepdim=True).values
    return (flat <= thresh).to(M.dtype).reshape(M.shape)


def check_saliency(saliency, x: torch.Tensor) -> None:
    """Raise unless ``saliency`` is a valid argument of :func:`jsigr_fast.loss` for ``x`` (checked up
    front, whatever ``lambda_m`` is, so a typo does not wait for the day the term is switched on)."""
    if saliency is None or callable(saliency):
        return
    if isinstance(saliency, str):
        if saliency not in ("gradient", "none"):
            raise ValueError(f"saliency must be None, 'gradient', 'none', a tensor or a callable; got {saliency!r}")
        return
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(f"saliency must be None, a string, a tensor or a callable, got {type(saliency).__name__}")
    _check_map(saliency, x, "saliency")


def _check_map(M: torch.Tensor, x: torch.Tensor, what: str, *, finite: bool = True) -> None:
    if M.shape != x.shape:
        raise ValueError(f"{what} must have x's shape {tuple(x.shape)}, got {tuple(M.shape)}")
    if M.device != x.device:
        raise ValueError(f"{what} is on {M.device} but x is on {x.device}")
    if M.is_complex() or M.dtype == torch.bool:
        raise TypeError(f"{what} must be a real-valued map (the mask keeps features with M <= beta), got dtype {M.dtype}")
    if (finite and M.is_floating_point() and not _checks.capturing(M)
            and not bool(torch.isfinite(M.detach()).all())):
        raise ValueError(f"{what} contains NaN or infinite values (a NaN feature would silently go unpenalised)")


def compute_saliency(saliency: Saliency, g_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """Resolve the ``saliency`` argument of :func:`jsigr_fast.loss` to a map of x's shape (None: no mask)."""
    if saliency is None or (isinstance(saliency, str) and saliency == "gradient"):
        return gradient_saliency(g_hat, x)
    if isinstance(saliency, str):
        if saliency == "none":
            return None
        raise ValueError(f"saliency must be None, 'gradient', 'none', a tensor or a callable; got {saliency!r}")
    if isinstance(saliency, torch.Tensor):
        M = saliency
    elif callable(saliency):
        M = saliency(g_hat, x)
        if not isinstance(M, torch.Tensor):
            raise TypeError(f"the saliency callable must return a tensor, got {type(M).__name__}")
    else:
        raise TypeError(f"saliency must be None, a string, a tensor or a callable, got {type(saliency).__name__}")
    # maps computed in the step (a callable's, an adaptor's) may be non-finite on a non-finite batch:
    # the step's loss then is too, and the trainer skips it; only a map the caller passed is checked
    _check_map(M, x, "the saliency map", finite=False)
    return M.detach()


class SaliencyAdaptor(nn.Module):
    """JARN's adaptor ``f_apt``: a 1x1 convolution C -> C followed by tanh.

    Maps an input gradient into the image domain. Two choices of ours, both documented:
    the gradient is first divided by its per-sample RMS (``normalize=True``), because input
    gradients shrink by orders of magnitude as a model becomes robust and a fixed 1x1 conv would
    then see only its bias (the "tanh drift" that SPEC.md warns about); and the conv starts as the
    identity, so an untrained adaptor already gives ``tanh(g / rms(g))``.

    Inputs ``(N, C, *spatial)`` use C channels; vector inputs ``(N, D)`` are one channel.
    """

    def __init__(self, channels: int, *, normalize: bool = True):
        super().__init__()
        self.channels = _checks.check_int("channels", channels)
        self.normalize = normalize
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.conv.bias.zero_()

    def forward(self, g: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``tanh(conv1x1(g / rms(g)))``. ``x`` is accepted and ignored, so a trained adaptor can be
        passed directly as ``jsigr_fast.loss(..., saliency=adaptor)`` (called as ``saliency(g_hat, x)``)."""
        shape = g.shape
        if g.dim() == 2:
            g4 = g.reshape(shape[0], 1, shape[1], 1)
        else:
            g4 = g.reshape(shape[0], shape[1], -1, 1)
        if g4.shape[1] != self.channels:
            raise ValueError(f"SaliencyAdaptor was built for {self.channels} channels, got input of shape {tuple(shape)}")
        if self.normalize:  # part of the function, so differentiated too (no detach)
            rms = (g4.pow(2).mean(dim=(1, 2, 3), keepdim=True) + torch.finfo(g4.dtype).tiny).sqrt()
            g4 = g4 / rms
        return torch.tanh(self.conv(g4)).reshape(shape)
