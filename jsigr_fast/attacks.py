"""Adversarial attacks for evaluating robustness, in pixel space.

These are the attacks the J-SIGR paper (Liu et al. 2023, Sec. 5) evaluates against, plus
DeepFool's rho_adv from Jakubovitz & Giryes (ECCV 2018):

* :func:`fgsm` -- Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, ICLR 2015): one step
  ``x + eps * sign(grad_x CE)``.
* :func:`pgd` -- Projected Gradient Descent (Madry et al., ICLR 2018): iterated signed (linf) or
  normalised (l2) gradient steps from a random start in the eps-ball, projected back onto the
  ball after every step; optional restarts.
* :func:`mi_fgsm` -- Momentum Iterative FGSM (Dong et al., CVPR 2018): the sign step follows a
  momentum of L1-normalised gradients, which stabilises the direction and transfers better.
* :func:`ni_fgsm` -- Nesterov Iterative FGSM (Lin et al., ICLR 2020): MI-FGSM with the gradient
  taken at the look-ahead point ``x + alpha * decay * g``.
* :func:`abi_fgm` -- AdaBelief Iterative Fast Gradient Method (Yang et al., Applied Intelligence
  2023): the step follows AdaBelief's bias-corrected first moment divided by the root of its
  "belief" (the variance of the gradient around its moving mean), L2-normalised, not signed.
* :func:`jsma` -- Jacobian-based Saliency Map Attack (Papernot et al., EuroS&P 2016): a targeted
  L0 attack that changes a few features at a time, chosen by a saliency map of the logits'
  forward derivative.
* :func:`deepfool` -- DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016): iteratively steps to
  the nearest linearised decision boundary; an estimate of the minimal l2 perturbation.
* :func:`rho_adv` -- ``mean_n ||delta_n||_2 / ||x_n||_2`` over DeepFool's examples (the robustness
  measure of Moosavi-Dezfooli et al., used by Jakubovitz & Giryes).
* :func:`accuracy` and :func:`transfer_accuracy` (craft on a source model, score a target model:
  the transfer protocol of J-SIGR Table 2).

Conventions shared by every attack:

* Inputs are pixels in ``clamp`` (default ``[0, 1]``: this library feeds models [0, 1] images and
  puts normalisation inside the model). ``x`` must lie inside ``clamp``: because it does, clamping to the
  box after projecting onto the eps-ball can only shrink the perturbation, so the budget holds.
  ``clamp=None`` disables the box.
* Each attack returns a new, detached tensor of ``x``'s shape and dtype. It never modifies ``x``,
  never calls ``model.train()`` / ``model.eval()`` (the model is attacked in the mode the caller
  set: usually call ``model.eval()`` first), never writes ``.grad`` of any parameter (input
  gradients come from ``torch.autograd.grad`` w.r.t. the input only), and runs the model inside
  :func:`jsigr_fast.batchnorm.frozen_running_stats`, so BatchNorm running statistics never move.
* The loss is the per-sample cross-entropy summed over the batch, so each sample's gradient is its
  own ``grad_{x_n} l_n`` (a mean would scale it by 1/N: sign and normalised steps would not care,
  ABI's moment values would). In train mode a BatchNorm model couples the samples of a batch, so that gradient
  then also contains cross-sample terms -- attack in eval mode for per-sample attacks.
* ``targeted=True`` reads ``y`` as the target class and descends the CE toward it.
"""
from __future__ import annotations

import functools
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks
from .batchnorm import frozen_running_stats
from .saliency import quantile_kept

__all__ = [
    "fgsm", "pgd", "mi_fgsm", "ni_fgsm", "abi_fgm", "jsma", "deepfool", "rho_adv", "RhoAdv",
    "accuracy", "transfer_accuracy", "default_alpha", "ATTACKS",
]

Clamp = Optional[Tuple[float, float]]

# AdaBelief's additive term inside the second moment (Zhuang et al. 2020 add eps to s_t), so that
# s_hat > 0 even when every gradient equals its running mean.
_ABI_DELTA = 1e-14  # the authors' code


# ----------------------------------------------------------------------------------------------
# argument checks and shared pieces
# ----------------------------------------------------------------------------------------------
def _check_model(model, name: str = "model") -> nn.Module:
    # Not _checks.check_model: that one demands trainable parameters, but attacking a frozen
    # model (requires_grad=False everywhere) is perfectly fine -- we only need input gradients.
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_clamp(clamp) -> tuple[float, float] | None:
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise TypeError(f"clamp must be None or a (low, high) pair of numbers, got {clamp!r}")
    lo = _checks.check_number("clamp[0]", clamp[0])
    hi = _checks.check_number("clamp[1]", clamp[1])
    if not lo < hi:
        raise ValueError(f"clamp must satisfy low < high, got {clamp!r}")
    return lo, hi


def _prepare(model, x, labels, clamp, *, label_name: str = "y", labels_optional: bool = False):
    """Validate the common arguments; return (detached x, clamp pair or None).
    ``labels_optional``: None is allowed (FGSM's predicted labels, DeepFool); otherwise it is refused."""
    _check_model(model)
    _checks.check_input(x, model)
    x0 = x.detach()
    # None is refused where it means nothing: PGD and the momentum attacks would otherwise relabel
    # with the prediction at every iterate, and JSMA would silently return x
    if labels is not None or not labels_optional:
        _checks.check_labels(labels, x0.shape[0], x0.device, label_name)
    clamp = _check_clamp(clamp)
    if clamp is not None:
        lo, hi = clamp
        if not _checks.capturing(x0) and bool(((x0 < lo) | (x0 > hi)).any()):  # one host read
            # Not silently clamped: moving x into the box could itself exceed the eps budget.
            raise ValueError(
                f"x has values outside clamp=({lo}, {hi}) (min {x0.min().item():.4g}, max {x0.max().item():.4g}); "
                "pass the right bounds, or clamp=None for inputs that are not box-constrained"
            )
    return x0, clamp


def default_alpha(name: str, eps: float, steps: int) -> float:
    """The step size an iterative attack takes when ``alpha`` is not given: PGD ``2.5 eps / steps``
    (Madry et al.: enough to reach the boundary from a random start), the momentum attacks
    ``eps / steps`` (their papers: the steps add up to eps)."""
    return (2.5 if name == "pgd" else 1.0) * eps / steps


def _check_eps_steps_alpha(name, eps, steps, alpha):
    eps = _checks.check_number("eps", eps, low=0.0)
    steps = _checks.check_int("steps", steps, low=1)
    alpha = default_alpha(name, eps, steps) if alpha is None else _checks.check_number("alpha", alpha, low=0.0)
    return eps, steps, alpha


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (N,) shaped to broadcast against ``like`` (N, ...)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return _view(t.flatten(1).norm(dim=1), t)


def _box(x: torch.Tensor, clamp) -> torch.Tensor:
    return x if clamp is None else x.clamp(clamp[0], clamp[1])


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Euclidean projection of each sample's perturbation onto its eps-ball."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    tiny = torch.finfo(delta.dtype).tiny
    factor = (eps / _flat_norm(delta).clamp_min(tiny)).clamp(max=1.0)
    return delta * factor


# Non-finite input gradients (a model with sqrt(|x|) at 0, an overflowing layer) make the gradient
# attacks leave samples unmoved or produce NaN iterates: the accuracy under attack then overstates
# robustness without a sign. Each public gradient attack collects one on-device flag per gradient
# (no synchronisation per step) and warns once at its end.
_GRAD_CHECK = threading.local()


def _warns_on_nonfinite_gradients(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outer = getattr(_GRAD_CHECK, "flags", None)
        _GRAD_CHECK.flags = flags = []
        try:
            out = fn(*args, **kwargs)
        finally:
            _GRAD_CHECK.flags = outer
        # (not while a CUDA graph captures the attack: the host read would break the capture, and a replay
        # never returns here to warn)
        if flags and not _checks.capturing(flags[0]) and bool(torch.stack(flags).any()):
            warnings.warn(f"{fn.__name__}: the model's input gradient was not finite (NaN/inf) at some samples "
                          "and steps; those samples were not attacked as intended, so accuracy under this attack "
                          "overstates robustness", RuntimeWarning, stacklevel=2)
        return out
    return wrapper


def _loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None):
    """Per-sample CE losses (N,), logits and ``grad_x sum_n CE_n`` (all detached) at ``x``.
    ``y=None`` uses the model's own predictions at ``x`` as labels (from the same forward)."""
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad(), frozen_running_stats(model):
        # every forward here gets a copy (_checks.private_input): a model whose first op writes into
        # its input in place would be refused on the leaf, and would overwrite x or the iterate
        logits = _checks.check_logits(model(_checks.private_input(xr)), y, xr.shape[0])
        if y is None:
            y = logits.detach().argmax(dim=1)
        losses = F.cross_entropy(logits, y, reduction="none")
        if losses.requires_grad:
            (g,) = torch.autograd.grad(losses.sum(), xr, allow_unused=True)
        else:  # the model's output does not depend on x differentiably
            g = None
    if g is None:
        g = torch.zeros_like(xr)
    flags = getattr(_GRAD_CHECK, "flags", None)
    if flags is not None:
        flags.append(~torch.isfinite(g).all())
    return losses.detach(), logits.detach(), g.detach()


@torch.no_grad()
def _loss_and_pred(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    with frozen_running_stats(model):
        logits = _checks.check_logits(model(_checks.private_input(x)), y, x.shape[0])
    return F.cross_entropy(logits, y, reduction="none"), logits.argmax(dim=1)


# ----------------------------------------------------------------------------------------------
# FGSM and PGD
# ----------------------------------------------------------------------------------------------
@_warns_on_nonfinite_gradients
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, eps: float, *, targeted: bool = False,
         clamp: Clamp = (0.0, 1.0)) -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015): ``clamp(x + eps * sign(grad_x CE(f(x), y)))``.

    With ``targeted=True``, ``y`` is the target class and the step descends the CE toward it:
    ``x - eps * sign(grad)``. ``y=None`` perturbs against the model's own predicted labels (taken
    from the same forward), as FGSM adversarial training does to avoid label leaking (Kurakin et
    al. 2017; J-SIGR's FGSM-AT). Features whose gradient is exactly zero are left unchanged.
    """
    x0, clamp = _prepare(model, x, y, clamp, labels_optional=True)
    eps = _checks.check_number("eps", eps, low=0.0)
    direction = -1.0 if _checks.check_bool("targeted", targeted) else 1.0  # before the test below reads it
    if y is None and targeted:
        raise ValueError("targeted=True needs the target classes in y (y=None means the predicted labels)")
    _, _, g = _loss_grad(model, x0, y)
    return _box(x0 + (direction * eps) * g.sign(), clamp).detach()


def _random_start(x0: torch.Tensor, eps: float, norm: str, generator) -> torch.Tensor:
    if norm == "linf":  # uniform in the cube [-eps, eps]^D
        return (2.0 * _checks.rand(x0.shape, like=x0, generator=generator) - 1.0) * eps
    # Uniform in the l2 ball: an isotropic direction, radius eps * U^(1/D) (volume grows as r^D).
    d = x0[0].numel()
    direction = _checks.randn(x0.shape, like=x0, generator=generator)
    direction = direction / _flat_norm(direction).clamp_min(torch.finfo(x0.dtype).tiny)
    radius = eps * _checks.rand((x0.shape[0],), like=x0, generator=generator).pow(1.0 / d)
    return direction * _view(radius, x0)


@_warns_on_nonfinite_gradients
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float | None = None,
        steps: int = 10, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        targeted: bool = False, clamp: Clamp = (0.0, 1.0),
        generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD (Madry et al. 2018) on the cross-entropy, in the linf or l2 eps-ball around ``x``.

    Each step: linf ``x + alpha * sign(g)``; l2 ``x + alpha * g / ||g||_2`` (per sample); then
    projection onto the eps-ball and clamping to ``clamp``. ``alpha`` defaults to
    ``2.5 * eps / steps`` (Madry et al.: enough to walk from one side of the ball to the other).
    The last iterate is returned (as Madry et al. do; not the best iterate).

    ``random_start``: linf, uniform in the cube; l2, uniform in the ball (then clamped to the box).
    ``restarts=R > 1`` runs R random starts, drawn one after the other from ``generator`` (so it
    equals R single-restart runs sharing that generator), and keeps per sample the restart that is
    successful (misclassified; for ``targeted``, classified as the target) and, among restarts of
    equal success, has the highest CE (lowest CE toward the target when ``targeted``). It needs
    ``random_start=True`` (otherwise every restart would be the same).
    """
    x0, clamp = _prepare(model, x, y, clamp)
    eps, steps, alpha = _check_eps_steps_alpha("pgd", eps, steps, alpha)
    norm = _checks.check_choice("norm", norm, ("linf", "l2"))
    random_start = _checks.check_bool("random_start", random_start)
    restarts = _checks.check_int("restarts", restarts, low=1)
    direction = -1.0 if _checks.check_bool("targeted", targeted) else 1.0
    generator = _checks.as_generator(generator, x0.device)
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 needs random_start=True: without a random start every restart is identical")
    tiny = torch.finfo(x0.dtype).tiny

    best_x = best_score = best_success = None
    for _ in range(restarts):
        delta = _random_start(x0, eps, norm, generator) if random_start else torch.zeros_like(x0)
        xa = _box(x0 + delta, clamp)
        for _ in range(steps):
            _, _, g = _loss_grad(model, xa, y)
            step = g.sign() if norm == "linf" else g / _flat_norm(g).clamp_min(tiny)
            # Project the total perturbation (not the step) and re-derive it from the clamped point,
            # so the iterate is always inside ball and box.
            xa = _box(x0 + _project(xa + (direction * alpha) * step - x0, eps, norm), clamp)
        if restarts == 1:
            return xa.detach()
        losses, pred = _loss_and_pred(model, xa, y)
        success = pred == y if direction < 0 else pred != y
        score = direction * losses
        if best_x is None:
            best_x, best_score, best_success = xa, score, success
            continue
        better = (success & ~best_success) | ((success == best_success) & (score > best_score))
        best_x = torch.where(_view(better, xa), xa, best_x)
        best_score = torch.where(better, score, best_score)
        best_success = best_success | success
    return best_x.detach()


# ----------------------------------------------------------------------------------------------
# transfer-oriented iterative attacks: MI-FGSM, NI-FGSM, ABI-FGM
# ----------------------------------------------------------------------------------------------
def _l1_normalised(g: torch.Tensor) -> torch.Tensor:
    # Dong et al. write ||g||_1; their reference code (and Lin et al.'s, and torchattacks) divide by
    # the mean |g| = ||g||_1 / D. D is the same constant at every step, so MI-FGSM's sign step is
    # identical either way; only NI-FGSM's look-ahead sees the scale, and we match the code.
    scale = g.abs().flatten(1).mean(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
    return g / _view(scale, g)


def _momentum_attack(kind: str, model, x, y, eps, steps, alpha, decay, targeted, clamp):
    x0, clamp = _prepare(model, x, y, clamp)
    eps, steps, alpha = _check_eps_steps_alpha(kind, eps, steps, alpha)
    decay = _checks.check_number("decay", decay, low=0.0)
    direction = -1.0 if _checks.check_bool("targeted", targeted) else 1.0
    momentum = torch.zeros_like(x0)
    xa = x0.clone()
    for _ in range(steps):
        if kind == "ni":
            # Lin et al.: gradient at the Nesterov look-ahead point, which is neither projected nor
            # clamped to the box (as in the paper and its reference code).
            _, _, g = _loss_grad(model, xa + (direction * alpha * decay) * momentum, y)
        else:
            _, _, g = _loss_grad(model, xa, y)
        momentum = decay * momentum + _l1_normalised(g)
        xa = _box(x0 + _project(xa + (direction * alpha) * momentum.sign() - x0, eps, "linf"), clamp)
    return xa.detach()


@_warns_on_nonfinite_gradients
def mi_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 10,
            alpha: float | None = None, decay: float = 1.0, targeted: bool = False,
            clamp: Clamp = (0.0, 1.0)) -> torch.Tensor:
    """MI-FGSM (Dong et al. 2018), linf: ``g <- decay * g + grad / ||grad||_1``,
    ``x <- Proj_eps(x + alpha * sign(g))``, clamped. ``alpha`` defaults to ``eps / steps``; no random
    start."""
    return _momentum_attack("mi", model, x, y, eps, steps, alpha, decay, targeted, clamp)


@_warns_on_nonfinite_gradients
def ni_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 10,
            alpha: float | None = None, decay: float = 1.0, targeted: bool = False,
            clamp: Clamp = (0.0, 1.0)) -> torch.Tensor:
    """NI-FGSM (Lin et al. 2020), linf: as :func:`mi_fgsm` but the gradient is taken at the
    Nesterov look-ahead ``x + alpha * decay * g``.

    The look-ahead uses the raw momentum ``g``, whose scale is set by the gradient normalisation:
    like the authors' reference code (and torchattacks) we divide each gradient by its mean
    ``|g|`` rather than by ``||g||_1``, so ``g``'s entries are O(1) (growing with the steps when
    ``decay = 1``) and the look-ahead is a few step sizes, not O(alpha / D).
    """
    return _momentum_attack("ni", model, x, y, eps, steps, alpha, decay, targeted, clamp)


@_warns_on_nonfinite_gradients
def abi_fgm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 10,
            alpha: float | None = None, beta1: float = 0.9, beta2: float = 0.999, targeted: bool = False,
            clamp: Clamp = (0.0, 1.0)) -> torch.Tensor:
    """ABI-FGM (Yang et al. 2023), linf ball, as the authors' code runs it (CI-AB-FGM.py, without its
    random crop). With ``g_t`` the input gradient at step t, L1-normalised per sample::

        g_t <- g_t / ||g_t||_1
        m_t = beta1 m_{t-1} + (1 - beta1) g_t
        s_t = beta2 s_{t-1} + (1 - beta2) (g_t - m_t)^2
        d   = m_hat / (sqrt(s_hat) + delta),  m_hat = m_t / (1 - beta1^t),  s_hat = (s_t + delta) / (1 - beta2^t)
        x  <- Proj_eps(x + alpha sqrt(D) d / ||d||_2)                                     (delta = 1e-14)

    clamped to ``clamp``. The step is not a sign: AdaBelief's belief ``s`` rescales each feature
    (a sign would discard it: ``sign(m_hat / (sqrt(s_hat) + delta)) = sign(m_hat)``), and its L2
    length ``alpha sqrt(D)`` is that of a sign step of ``alpha`` (D = features per sample), so
    ``alpha`` (default ``eps / steps``) means what it means for the other iterative attacks.
    """
    x0, clamp = _prepare(model, x, y, clamp)
    eps, steps, alpha = _check_eps_steps_alpha("abi_fgm", eps, steps, alpha)
    beta1 = _checks.check_number("beta1", beta1, low=0.0)
    beta2 = _checks.check_number("beta2", beta2, low=0.0)
    if beta1 >= 1.0:
        raise ValueError(f"beta1 must be < 1, got {beta1}")
    if beta2 >= 1.0:
        raise ValueError(f"beta2 must be < 1, got {beta2}")
    direction = -1.0 if _checks.check_bool("targeted", targeted) else 1.0
    n = x0.shape[0]
    shape = (n,) + (1,) * (x0.dim() - 1)
    length = alpha * math.sqrt(x0[0].numel())
    tiny = torch.finfo(x0.dtype).tiny
    m = torch.zeros_like(x0)
    s = torch.zeros_like(x0)
    xa = x0.clone()
    for t in range(1, steps + 1):
        _, _, g = _loss_grad(model, xa, y)
        g = g / g.abs().reshape(n, -1).sum(1).clamp_min(tiny).view(shape)
        m = beta1 * m + (1.0 - beta1) * g
        s = beta2 * s + (1.0 - beta2) * (g - m).pow(2)
        m_hat = m / (1.0 - beta1 ** t)
        s_hat = (s + _ABI_DELTA) / (1.0 - beta2 ** t)
        d = m_hat / (s_hat.sqrt() + _ABI_DELTA)
        d = d / d.reshape(n, -1).norm(dim=1).clamp_min(tiny).view(shape)
        xa = _box(x0 + _project(xa + (direction * length) * d - x0, eps, "linf"), clamp)
    return xa.detach()


# ----------------------------------------------------------------------------------------------
# JSMA
# ----------------------------------------------------------------------------------------------
def _jsma_pick_pairs(sa: torch.Tensor, sb: torch.Tensor, domain: torch.Tensor):
    """Best pair (p, q), p != q, per row: maximise A * (-B) subject to A > 0, B < 0, with
    A = sa_p + sa_q, B = sb_p + sb_q, both features in ``domain``. Returns (p, q, found)."""
    n, d = sa.shape
    p = torch.zeros(n, dtype=torch.long, device=sa.device)
    q = torch.zeros_like(p)
    found = torch.zeros(n, dtype=torch.bool, device=sa.device)
    off_diag = ~torch.eye(d, dtype=torch.bool, device=sa.device)
    chunk = max(1, (1 << 24) // (d * d))  # bound the (chunk, D, D) score tensor to 16M entries
    for i in range(0, n, chunk):
        a, b, dom = sa[i:i + chunk], sb[i:i + chunk], domain[i:i + chunk]
        A = a[:, :, None] + a[:, None, :]
        B = b[:, :, None] + b[:, None, :]
        valid = (A > 0) & (B < 0) & dom[:, :, None] & dom[:, None, :] & off_diag
        score = torch.where(valid, A * (-B), torch.full_like(A, -math.inf))
        best, idx = score.flatten(1).max(dim=1)
        p[i:i + chunk], q[i:i + chunk] = idx // d, idx % d
        found[i:i + chunk] = best > -math.inf
    return p, q, found


def jsma(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, theta: float = 1.0, gamma: float = 0.1,
         pairwise: bool = True, clamp: Clamp = (0.0, 1.0)) -> torch.Tensor:
    """JSMA (Papernot et al. 2016): targeted; changes at most a fraction ``gamma`` of the features.

    Saliency is computed on the logits (the "JSMA-Z" form; Papernot's network output before
    softmax, as in Cleverhans, which J-SIGR used): with ``a = grad_x z_t`` and
    ``b = sum_{j != t} grad_x z_j``, the default ``pairwise=True`` variant (Papernot's Algorithm 3)
    picks the pair ``p != q`` maximising ``(a_p + a_q) * |b_p + b_q|`` among pairs with
    ``a_p + a_q > 0`` and ``b_p + b_q < 0``; ``pairwise=False`` picks one feature with ``a_i > 0``,
    ``b_i < 0`` maximising ``a_i * |b_i|`` (Papernot's Eq. 8). The chosen features move by ``theta``
    (clamped to ``clamp``) and leave the search domain, so each feature changes at most once.
    ``theta > 0`` increases features (the paper's main variant; search domain: features below the
    upper bound), ``theta < 0`` decreases them (signs of a and b flipped; domain: above the lower
    bound).

    Cost: each step is one forward and two input-gradient passes over the whole batch; the
    pairwise search also scores all D^2 pairs per sample (chunked to bound memory), which suits
    MNIST-sized inputs (as in the paper) -- use ``pairwise=False`` for large images.

    Per sample it stops when the model predicts ``target``, when the next step would modify more
    than ``gamma * D`` features in total (the largest k with k / D <= gamma, as
    :func:`jsigr_fast.saliency.quantile_kept` counts: gamma = 0.29 of 100 features allows 29), or when no admissible feature (pair) is left.
    Samples already classified as ``target`` are returned unchanged. The forward pass always sees
    the whole batch (so train-mode BatchNorm statistics stay those of the batch); finished samples
    are just not updated. The result has ``x``'s memory format (channels-last in, channels-last out).
    """
    x0, clamp = _prepare(model, x, target, clamp, label_name="target")
    target = target.long()  # gather needs int64 indices; check_labels also accepts uint8
    theta = _checks.check_number("theta", theta)
    if theta == 0.0:
        raise ValueError("theta must be non-zero (> 0 increases features, < 0 decreases them)")
    gamma = _checks.check_number("gamma", gamma, low=0.0, high=1.0, low_open=True)
    pairwise = _checks.check_bool("pairwise", pairwise)
    n = x0.shape[0]
    d = x0[0].numel()
    # the largest k with k / d <= gamma: the mask quantile's rule (0.29 * 100 is 28.999999999999996
    # in floats, so floor(gamma * d) would allow 28 of 100 features, not 29)
    limit = quantile_kept(gamma, d)
    per_step = 2 if pairwise else 1
    s = 1.0 if theta > 0 else -1.0
    rows = torch.arange(n, device=x0.device)

    xa = x0.reshape(n, d).clone()
    if clamp is None:
        domain = torch.ones_like(xa, dtype=torch.bool)
    else:
        domain = xa < clamp[1] if theta > 0 else xa > clamp[0]
    n_modified = torch.zeros(n, dtype=torch.long, device=x0.device)
    while True:
        xr = xa.reshape(x0.shape).clone().requires_grad_(True)  # a copy: xa is edited in place below
        with torch.enable_grad(), frozen_running_stats(model):
            logits = _checks.check_logits(model(_checks.private_input(xr)), target, n)
            active = (logits.argmax(dim=1) != target) & (n_modified + per_step <= limit)
            if not bool(active.any()):
                break
            # Two VJPs: the target logit's gradient a, and the gradient of the sum of all logits
            # (b = that minus a); cheaper than the K-row Jacobian the saliency map only sums.
            grads = []
            for out, keep in ((logits.gather(1, target[:, None]).sum(), True), (logits.sum(), False)):
                g = (torch.autograd.grad(out, xr, retain_graph=keep, allow_unused=True)[0]
                     if logits.requires_grad else None)
                grads.append(torch.zeros_like(xr) if g is None else g)
            a, total = grads
        a = a.detach().reshape(n, d)
        b = total.detach().reshape(n, d) - a  # sum over the non-target logits
        sa, sb = s * a, s * b  # for theta < 0 the roles of "increase" and "decrease" swap
        if pairwise:
            p, q, found = _jsma_pick_pairs(sa[active], sb[active], domain[active])
        else:
            score = torch.where((sa > 0) & (sb < 0) & domain, sa * (-sb), torch.full_like(sa, -math.inf))[active]
            best, p = score.max(dim=1)
            q, found = p, best > -math.inf
        idx = rows[active][found]
        if idx.numel() == 0:  # every remaining sample is out of admissible features
            break
        for f in ((p[found], q[found]) if pairwise else (p[found],)):
            new = xa[idx, f] + theta
            xa[idx, f] = new if clamp is None else new.clamp(clamp[0], clamp[1])
            domain[idx, f] = False
        n_modified[idx] += per_step
        # samples with no admissible feature stop for good: make their budget look spent
        n_modified[rows[active][~found]] = limit + 1
    # xa is (N, D) row-major, so its reshape is NCHW-contiguous: return x's memory format (channels-last in,
    # channels-last out), as every other attack does (empty_like keeps the strides of a dense input)
    return torch.empty_like(x0).copy_(xa.reshape(x0.shape))


# ----------------------------------------------------------------------------------------------
# DeepFool and rho_adv
# ----------------------------------------------------------------------------------------------
def _deepfool(model, x, num_candidates, overshoot, max_iter, clamp):
    x0, clamp = _prepare(model, x, None, clamp, labels_optional=True)
    num_candidates = _checks.check_int("num_candidates", num_candidates, low=2)
    overshoot = _checks.check_number("overshoot", overshoot, low=0.0)
    max_iter = _checks.check_int("max_iter", max_iter, low=1)
    n = x0.shape[0]
    with torch.no_grad(), frozen_running_stats(model):
        logits0 = _checks.check_logits(model(_checks.private_input(x0)), None, n)
    k = logits0.shape[1]
    if k < 2:
        raise ValueError(f"DeepFool needs a model with at least 2 outputs, got {k}")
    nc = min(num_candidates, k)
    k0 = logits0.argmax(dim=1)
    # Candidates: the original prediction first, then the nc - 1 next most likely classes at x
    # (Moosavi-Dezfooli et al. restrict to the top classes for speed).
    others = logits0.scatter(1, k0[:, None], -math.inf).topk(nc - 1, dim=1).indices
    cand = torch.cat([k0[:, None], others], dim=1)

    r_tot = torch.zeros_like(x0)
    xa = x0.clone()
    stuck = torch.zeros(n, dtype=torch.bool, device=x0.device)
    for it in range(max_iter + 1):
        xr = xa.detach().requires_grad_(True)
        with torch.enable_grad(), frozen_running_stats(model):
            logits = model(_checks.private_input(xr))
            flipped = logits.argmax(dim=1) != k0
            active = ~flipped & ~stuck
            if it == max_iter or not bool(active.any()):
                break
            zc = logits.gather(1, cand)  # (N, nc)
            grads = []
            for j in range(nc):
                g = (torch.autograd.grad(zc[:, j].sum(), xr, retain_graph=j < nc - 1, allow_unused=True)[0]
                     if zc.requires_grad else None)
                grads.append(torch.zeros_like(xr) if g is None else g)
        grads = torch.stack([g.detach().flatten(1) for g in grads], dim=1)  # (N, nc, D)
        zc = zc.detach()
        w = grads[:, 1:] - grads[:, :1]  # (N, nc-1, D): gradients of f_k = z_k - z_k0
        f = zc[:, 1:] - zc[:, :1]        # (N, nc-1), <= 0 while not flipped
        wn = w.norm(dim=2)
        dist = torch.where(wn > 0, f.abs() / wn, torch.full_like(wn, math.inf))
        best, l = dist.min(dim=1)
        # A sample whose candidate gradients all vanish cannot be moved by linearisation: give up.
        stuck |= active & torch.isinf(best)
        move = active & ~torch.isinf(best)
        w_l = w[torch.arange(n, device=x0.device), l]
        wn_l = wn.gather(1, l[:, None]).squeeze(1)
        # Step exactly onto the linearised boundary: |f_l| / ||w_l||^2 * w_l (no +1e-4 as in the
        # reference code: the overshoot is what carries the point across).
        coef = torch.where(move, best / wn_l.clamp_min(torch.finfo(x0.dtype).tiny), torch.zeros_like(best))
        # masked with where, not by coef = 0: 0 * a NaN/inf gradient would make a stuck or
        # finished sample's perturbation NaN instead of keeping its last iterate
        r_tot = r_tot + torch.where(move[:, None], coef[:, None] * w_l, torch.zeros_like(w_l)).reshape(x0.shape)
        xa = _box(x0 + (1.0 + overshoot) * r_tot, clamp)
    r = (1.0 + overshoot) * r_tot
    return xa.detach(), r.detach(), flipped.detach()


def deepfool(model: nn.Module, x: torch.Tensor, *, num_candidates: int = 10, overshoot: float = 0.02,
             max_iter: int = 50, clamp: Clamp = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepFool (Moosavi-Dezfooli et al. 2016), untargeted l2, against the model's own prediction.

    Returns ``(x_adv, r)``: ``r = (1 + overshoot) * sum_i r_i`` is the total perturbation, where each
    ``r_i = |f_l| / ||w_l||^2 * w_l`` steps onto the nearest linearised boundary among the
    ``num_candidates`` most likely classes (``f_k = z_k - z_k0``, ``w_k = grad f_k``); ``x_adv =
    clamp(x + r)``. Every iterate is ``clamp(x + (1 + overshoot) * sum r_i)``; a sample stops once
    its prediction changes. Unclamped by default (``clamp=None``), as in the paper. For an affine
    classifier the first step is the exact minimal l2 perturbation, times ``1 + overshoot``.

    Samples not flipped after ``max_iter`` steps (or whose candidate gradients vanish) keep their
    last iterate; :func:`rho_adv` reports how many flipped.
    """
    x_adv, r, _ = _deepfool(model, x, num_candidates, overshoot, max_iter, clamp)
    return x_adv, r


@dataclass(frozen=True)
class RhoAdv:
    """Result of :func:`rho_adv`.

    ``rho``: mean of ``ratios`` over the flipped samples (NaN if none flipped); ``n_success`` /
    ``n_total``: flipped / all samples; ``ratios``: per-sample ``||x_adv - x||_2 / ||x||_2`` (NaN
    for samples DeepFool did not flip; inf for a flipped all-zero x).
    """
    rho: float
    n_success: int
    n_total: int
    ratios: torch.Tensor

    def __float__(self) -> float:
        return self.rho


def rho_adv(model: nn.Module, x: torch.Tensor, **deepfool_kwargs) -> RhoAdv:
    """Robustness ``rho_adv = mean_n ||delta_n||_2 / ||x_n||_2`` (Moosavi-Dezfooli et al. 2016, Eq. 15;
    Jakubovitz & Giryes 2018) with ``delta_n = x_adv_n - x_n`` from :func:`deepfool`.

    ``delta`` equals DeepFool's ``r`` unless a ``clamp`` is passed (then it is the perturbation that
    is actually applied). The mean is over the samples DeepFool flips; the others are excluded, not
    counted with some stand-in distance, and their number is reported (``n_total - n_success``),
    so a low success count flags that rho is optimistic. ``float(result)`` gives ``rho``.
    """
    unknown = set(deepfool_kwargs) - {"num_candidates", "overshoot", "max_iter", "clamp"}
    if unknown:
        raise TypeError(f"rho_adv got unexpected keyword arguments {sorted(unknown)} (DeepFool's are "
                        "num_candidates, overshoot, max_iter, clamp)")
    kw = dict(num_candidates=10, overshoot=0.02, max_iter=50, clamp=None)
    kw.update(deepfool_kwargs)
    x_adv, _, success = _deepfool(model, x, kw["num_candidates"], kw["overshoot"], kw["max_iter"], kw["clamp"])
    x0 = x.detach()
    ratios = (x_adv - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)
    ratios = torch.where(success, ratios, torch.full_like(ratios, math.nan))
    n_success = int(success.sum())
    rho = float(ratios[success].mean()) if n_success else math.nan
    return RhoAdv(rho=rho, n_success=n_success, n_total=int(x0.shape[0]), ratios=ratios)


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> float:
    """Fraction of samples with ``argmax f(x) == y``, in [0, 1], without gradients, in the model's
    current mode (train-mode BatchNorm then uses each chunk's statistics; running statistics are
    not updated)."""
    _check_model(model)
    _checks.check_input(x, model)
    _checks.check_labels(y, x.shape[0], x.device)
    batch_size = _checks.check_int("batch_size", batch_size, low=1)
    correct = 0
    with torch.no_grad(), frozen_running_stats(model):
        for i in range(0, x.shape[0], batch_size):
            yi = y[i:i + batch_size]
            logits = _checks.check_logits(model(_checks.private_input(x[i:i + batch_size].detach())), yi,
                                          yi.shape[0])
            correct += int((logits.argmax(dim=1) == yi).sum())
    return correct / x.shape[0]


ATTACKS: dict[str, Callable] = {
    "fgsm": fgsm,
    "pgd": pgd,
    "mi_fgsm": mi_fgsm,
    "ni_fgsm": ni_fgsm,
    "abi_fgm": abi_fgm,
    "jsma": jsma,
    "deepfool": deepfool,
}


def transfer_accuracy(source: nn.Module, target: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      attack: str | Callable, /, *, batch_size: int | None = None, **attack_kwargs) -> float:
    """Accuracy of ``target`` on examples crafted against ``source`` (J-SIGR Table 2's protocol).

    ``attack`` is a name in :data:`ATTACKS` or a callable. Label-based attacks are called as
    ``attack(source, x, y, **attack_kwargs)``; :func:`deepfool` takes no label
    (``attack(source, x, **kw)``, first output used); :func:`jsma` is targeted, so its
    ``target=`` classes must be given in ``attack_kwargs`` (``y`` stays the true label used for
    scoring). The first five parameters are positional-only, so ``target=`` among the keywords
    always means JSMA's target classes, never the target model. ``batch_size`` crafts the
    examples in chunks (None: all at once; train-mode BatchNorm makes the result depend on it).
    """
    if isinstance(attack, str):
        _checks.check_choice("attack", attack, ATTACKS)
        attack = ATTACKS[attack]
    elif not callable(attack):
        raise TypeError(f"attack must be a name in ATTACKS or a callable, got {type(attack).__name__}")
    _check_model(source, "source")
    _check_model(target, "target")
    _checks.check_input(x, source)
    _checks.check_input(x, target)
    _checks.check_labels(y, x.shape[0], x.device)
    n = x.shape[0]
    batch_size = n if batch_size is None else _checks.check_int("batch_size", batch_size, low=1)
    if attack is jsma:
        if "target" not in attack_kwargs:
            raise ValueError("transfer_accuracy with jsma needs target=<target classes> in the attack kwargs")
        # checked whole: sliced per chunk, a too-long target would be silently truncated
        _checks.check_labels(attack_kwargs["target"], n, x.device, "target")
    pieces = []
    for i in range(0, n, batch_size):
        xi, yi = x[i:i + batch_size], y[i:i + batch_size]
        if attack is deepfool:
            out = attack(source, xi, **attack_kwargs)
        elif attack is jsma:
            kw = dict(attack_kwargs)
            t = kw.pop("target")
            out = attack(source, xi, t[i:i + batch_size], **kw)
        else:
            out = attack(source, xi, yi, **attack_kwargs)
        if isinstance(out, tuple):
            out = out[0]
        pieces.append(out.detach())
    x_adv = torch.cat(pieces, dim=0)
    return accuracy(target, x_adv, y)
