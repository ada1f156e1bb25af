r"""Finite-difference mode (Finlay & Oberman 2019): gradient penalties without double backprop.

A squared directional derivative is a squared finite difference. For the input-gradient penalty,
take the detached direction ``d_n = m_n² ⊙ g_n / ||m_n ⊙ g_n||``; then ``g_n · d_n = ||m_n ⊙ g_n||`` and

    ||m ⊙ g_n||²  ≈  ((ℓ_n(x + h d) − ℓ_n(x)) / h)²

For the Jacobian term, the projection estimator uses ``d_n = u_n/||u_n||`` with ``u = Jᵀv`` and
``K ((v_n · (z_n(x + h d) − z_n(x))) / h)²``; the Hutchinson estimator needs no gradient for its
direction: ``||ζ_n||² ||(z_n(x + h ζ̂) − z_n(x)) / h||²`` with ``ζ ~ N(0, I)`` and ``ζ̂_n = ζ_n / ||ζ_n||``
(a unit step, like the others: ``h ζ`` itself would have norm ``h sqrt(D)``).

Random layers: each perturbed forward replays the global random-number state the unperturbed
forward started from (:class:`_ForwardRNG`), so train-mode dropout draws the same masks at x and at
x + h d; without it the difference measures the change of mask / h. Gradients in x (when x requires
grad) flow through both forwards of each difference, with the direction held fixed.

The directions cost an input-only backward without a graph; each term then costs one extra forward,
and the loss is differentiated by ordinary backwards through ordinary kernels: no BatchNorm double
backward, nothing DDP or AMP has to treat specially.

Memory. Each perturbed forward's graph is differentiated as soon as its term is computed and freed
(:func:`_free_early`, switch :data:`FREE_EARLY`): its parameter gradients are taken for the per-sample
values' sum and handed on, scaled, when the caller's backward reaches the values. Same values, same
gradients, same backward work (it only runs earlier), but the step holds the unperturbed forward's
graph plus one perturbed graph at a time instead of all of them: ResNet-20, batch 128, 1.99x the
standard step's peak instead of 2.96x (bench/results/memory_*). What this asks of the caller: weight
the per-sample values uniformly (every loss here takes their mean; an unequal weight is an error,
checked on the device), know that a tensor hook on a parameter runs twice, for that early part and
then for the total, and that the part taken early carries no graph (a ``create_graph`` backward
through an fd loss sees it as a constant; first-order training is unaffected). Called under ``torch.no_grad()`` these functions take nothing early (values only); the public
losses of :mod:`jsigr_fast.functional` run with grad on whatever the caller's mode. Under DDP the
early backward runs on the unwrapped module and touches no reducer hook; the caller's backward
all-reduces the total as usual. With
``backend="fused"`` the forwards and that backward run under the fused backend's layer rules
(:func:`jsigr_fast.functional.layer_rules` with ``first_order=True``: channels-last activations and
the fused BatchNorm where they pay, see ``fused.FIRST_ORDER_ATEN_BN``; conv and ReLU stay ATen's, whose
first derivatives are already what the fused rules compute); here they are only differentiated
once, and exactly, so the result is the native one's up to rounding.

Bias (documented and tested): the forward difference has error ``(h/2) dᵀ∇²ℓ d + O(h²)`` in the
directional derivative, so the penalty carries an O(h) bias that vanishes as h → 0; for smooth
activations the parameter gradient (d held fixed) converges to the exact double-backprop gradient,
because ``g · ∂d = 0`` for ``d ∥ g``. A too-small h loses precision to rounding (fp32: keep
``h·||g||`` well above 1e-7 of the loss). Default ``h = 0.01`` in input units (the direction has unit norm for unmasked
penalties). Under train-mode BatchNorm the perturbed forward has its own batch statistics, so the
per-sample difference measures ``sum_m (∂ℓ_n/∂x_m)·d_m`` rather than the exact path's
``g_n · d_n``: the two differ by the batch-statistics cross terms, small for the input-gradient
penalty and the projection/Hutchinson estimators at batch 128 (ResNet-20: within 0.5 % at h = 1e-3).
Not so for ``estimator="exact"``, whose K directions step every sample along its class's gradient
at once: that measures ``sum_k ||J^T e_k||^2``, the target only when samples do not interact.
ResNet-20, batch 16, train mode: 71-72 % below the exact path's value at h = 1e-3 and 1e-2 alike
(eval mode: 0.15 % at 1e-3; bench/results/fd_accuracy_cpu_resnet20_b16_exact*). So fd refuses the
exact estimator on a model with train-mode BatchNorm (ValueError); the stochastic ones are fine.

ReLU networks (measured and tested): the gradient does *not* converge to double backprop's. The fd
gradient differentiates ``ℓ(x + h d) − ℓ(x)``; a ReLU unit whose sign differs at the two ends adds
an O(1/h) term (its kink), which double backprop (ReLU'' = 0) does not have. Such units number
O(h · units), so the error does not shrink with h on average: it is O(h) on a batch where no unit
flips and O(1) or more where one does (tests/test_finite_difference.py: a 12-256-4 ReLU MLP, batch
64, float64; at h = 0.01 19-29 units flip and the gradient is 83-121 % of its norm off double
backprop's). The penalty value converges either way. So on ReLU networks fd trains with a different gradient
(Finlay & Oberman's), not an approximation of the exact path's. ResNet-20, batch 128, train mode
(bench/bench_fd_accuracy.py, bench/results/fd_accuracy_cpu_*): the input-gradient penalty's fd
parameter gradient has cosine 0.12 with the exact one at h = 0.01 (0.04 at 1e-3); with GELU, 0.998.

Half precision (measured, same benchmark): under bf16 autocast the two forwards' rounding swamps
the difference ``ℓ(x + h d) − ℓ(x)``: at h = 0.01 the input-gradient and projection terms are 8-14 %
off and the Hutchinson estimate, whose difference is scaled by ``||ζ||² = D``, 134-202x the exact
value (the exact path: within 3.5 %). A larger h trades this for the O(h) bias. So fd warns when its
forwards run in fp16/bf16; compute an fd loss in float32.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks
from .batchnorm import batch_coupled, frozen_running_stats
from .functional import layer_rules
from .reference import forward, unit_sphere, vjp

__all__ = ["jsigr", "input_gradient_penalty", "jacobian_norm"]

_TINY = 1e-30

# Differentiate each perturbed forward's graph as soon as its term is computed (see _free_early):
# one perturbed graph alive at a time, same values and gradients, same backward work. False keeps
# them all to the caller's backward, as before; bench/steps.py's jsigr_fd_kept ablation measures both.
FREE_EARLY = True


def _low_precision(x: torch.Tensor) -> torch.dtype | None:
    """The half-precision dtype the forwards run in (the input's, or autocast's on x's device), else None."""
    half = (torch.float16, torch.bfloat16)
    if x.dtype in half:
        return x.dtype
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) in half:
        return torch.get_autocast_dtype(dev)
    return None


def _warn_low_precision(x: torch.Tensor) -> None:
    dtype = _low_precision(x)
    if dtype is not None:
        warnings.warn(f"mode='fd' with {dtype} forwards: the differences (l(x + h d) - l(x)) / h lose most of "
                      f"their digits to the rounding of the two forwards (ResNet-20, batch 128, bf16 autocast, "
                      f"fd_step 0.01: input-gradient penalty -14 %, Jacobian by projection -10 %, by Hutchinson "
                      f"134x the exact value; bench/results/fd_accuracy_*). mode='autograd' stays within 3.5 % "
                      f"there; or compute this loss outside autocast.", RuntimeWarning, stacklevel=4)


def check_estimator(aux: nn.Module, estimator: str) -> None:
    """Raise unless ``estimator`` suits fd on ``aux`` (called by the public API before any work).
    fd's exact estimator steps every sample along its class-k gradient at once (K forwards), which
    measures ``sum_k ||J^T e_k||^2`` only when samples do not interact; under train-mode BatchNorm the
    exact value ``(1/N) ||dZ/dX||_F^2`` would need one forward per (sample, class)."""
    if estimator == "exact" and batch_coupled(aux):
        raise ValueError("estimator='exact' with mode='fd' needs a model whose samples do not interact, but "
                         "train-mode BatchNorm couples them (measured on ResNet-20: 71-72 % below the exact "
                         "value at any fd_step); use estimator='projection' or 'hutchinson' with mode='fd', "
                         "or mode='autograd' (which takes N*K VJPs for this case)")


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _direction(g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``m² ⊙ g / ||m ⊙ g||`` per sample (``g / ||g||`` without a mask); zero where g is zero."""
    n = g.shape[0]
    if mask is not None:
        mg = mask * g
        norm = mg.reshape(n, -1).norm(dim=1)
        d = mask * mg
    else:
        norm = g.reshape(n, -1).norm(dim=1)
        d = g
    return d / _expand(norm.clamp_min(_TINY), g)


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors whose gradients accumulate at the ends of t's graph (the AccumulateGrad nodes)."""
    seen, stack, leaves = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            leaves.append(var)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves


class _GradsTakenEarly(torch.autograd.Function):
    """Per-sample values whose gradients in ``leaves`` through a graph now freed were taken already
    (``grads``: of the values' sum). Backward hands them on scaled by the incoming per-sample weight,
    which must be the same for every sample (the losses take a mean): checked on the device."""

    @staticmethod
    def forward(ctx, values, grads, *leaves):
        ctx.grads = grads
        return values.clone()

    @staticmethod
    def backward(ctx, c):
        w = c.reshape(-1)[0]
        # non-finite weights pass: the step is void anyway, and GradScaler skips it on the grads' inf
        torch._assert_async(((c == w) | ~torch.isfinite(c)).all(),
                            "mode='fd': the per-sample penalty values were weighted unequally in the backward; "
                            "their parameter gradients were taken early for a uniform weight (a mean or sum)")
        return (c, None, *(g * w.to(device=g.device, dtype=g.dtype) for g in ctx.grads))


def _free_early(plus: torch.Tensor, base: torch.Tensor, f, grad_scale, early: bool, swap=None) -> torch.Tensor:
    """``f(plus, base)``, per sample, where ``plus`` is a perturbed forward's output and ``base`` the
    unperturbed one's. With ``early``, the perturbed forward's graph is differentiated now and freed:
    its leaves' gradients (the parameters') are taken here, for the values' sum, and handed on by
    :class:`_GradsTakenEarly` in the caller's backward; ``base`` keeps its graph. Same values and
    gradients, but each perturbed forward's graph lives only until its term is computed, so the step
    holds one forward's graph plus one perturbed one at a time instead of all of them at the end
    (ResNet-20, batch 128: 2.96x the standard step's peak memory -> 1.99x), for the same backward
    work, just earlier (and 1.11x faster there: less memory to fault in). With ``grad_scale`` the
    early backward is scaled as the caller's will be (fp16: no underflow of small gradients).
    ``swap = (leaf, x)``: the perturbed input's leaf, whose gradient goes on to x."""
    if not (early and plus.requires_grad):
        return f(plus, base)
    leaves = _leaves(plus)
    partial = f(plus, base.detach())
    cot = torch.ones_like(partial) if grad_scale is None else torch.ones_like(partial) * grad_scale  # no sync
    grads = torch.autograd.grad(partial, leaves, grad_outputs=cot)
    if grad_scale is not None:
        grads = [g / grad_scale for g in grads]
    if swap is not None:
        leaves = [swap[1] if t is swap[0] else t for t in leaves]
    return _GradsTakenEarly.apply(f(plus.detach(), base), list(grads), *leaves)


class _ForwardRNG:
    """The global random-number state the unperturbed forward started from (CPU, and x's CUDA device),
    replayed for every perturbed forward: a model that draws random numbers in its forward (train-mode
    dropout, RReLU) then draws the same ones at x + h d as at x, so the difference measures the
    directional derivative of one function rather than the change of dropout mask / h (100-10^5 x the
    penalty). The stream outside the perturbed forwards runs on as if they had not happened."""

    def __init__(self, x: torch.Tensor):
        self.device = x.device
        self.start = _checks.rng_state(self.device)

    @contextlib.contextmanager
    def replay(self):
        now = _checks.rng_state(self.device)
        _checks.set_rng_state(self.device, self.start)
        try:
            yield
        finally:
            _checks.set_rng_state(self.device, now)


def _perturbed_forward(aux, x, step, rng: _ForwardRNG, early: bool):
    """``aux(x + step)`` with ``step`` detached, running statistics frozen and the unperturbed forward's
    random numbers. Differentiable in x when x requires grad (d/dx of x + step is the identity): with
    ``early`` through a fresh leaf, returned as ``(leaf, x)`` for :func:`_free_early` to hand its early
    gradient on to x (walking into the graph that produced x would free it), else through x itself.
    The model always gets the fresh tensor ``x + step``, never x or the leaf, so a model that writes
    into its input in place needs no copy here (see :func:`jsigr_fast._checks.private_input`)."""
    swap = None
    if x.requires_grad:
        if early:
            # the leaf before the step: the model's input x + step is then no leaf (an in-place
            # first op would be refused on one), and the leaf's gradient is the same
            leaf = x.detach().requires_grad_(True)
            xp = leaf + step
            swap = (leaf, x)
        else:
            xp = x + step
    else:
        xp = x.detach() + step
    with frozen_running_stats(aux), rng.replay():
        return aux(xp), swap


def _input_penalty_fd(aux, x, y, per_sample, g, mask, h, *, rng, grad_scale=None, early=False):
    d = _direction(g.detach(), mask)
    del g  # the callers hold no other reference: one input-sized tensor less during the forward
    out, swap = _perturbed_forward(aux, x, h * d, rng, early)
    plus = F.cross_entropy(out, y, reduction="none")
    del d, out  # and one less during the early backward (its graph keeps x + h d)
    return _free_early(plus, per_sample, lambda p, base: ((p - base) / h).pow(2), grad_scale, early, swap)


def _jacobian_fd(aux, x, logits, xg, *, estimator, n_proj, generator, h, grad_scale, rng, early=False):
    n, k = logits.shape
    x0 = x.detach()
    total = logits.new_zeros(n)
    if estimator == "hutchinson":
        for _ in range(n_proj):
            zeta = _checks.randn(x0.shape, like=x0, generator=generator)
            # ||J z||^2 = ||z||^2 ||J z/||z||||^2: step along the unit direction, so that h is the
            # perturbation's norm as for the other terms (h * z itself has norm h * sqrt(D): 0.55
            # on CIFAR, 3.9 at 224 px, far outside the linear range; ResNet-20: -19 % bias at h = 0.01)
            sq = zeta.reshape(n, -1).pow(2).sum(1)
            d = zeta / _expand(sq.sqrt().clamp_min(_TINY), zeta)
            plus, swap = _perturbed_forward(aux, x, h * d, rng, early)
            total = total + _free_early(plus, logits,
                                        lambda p, base: sq * ((p - base) / h).reshape(n, -1).pow(2).sum(1),
                                        grad_scale, early, swap)
        return total / n_proj
    if estimator == "projection":
        cots = [(unit_sphere(n, k, like=logits, generator=generator), float(k)) for _ in range(n_proj)]
    elif estimator == "exact":  # K directions, one per class: sum_k ||J^T e_k||^2 (sample-independent models)
        cots = []
        for c in range(k):
            e = torch.zeros_like(logits)
            e[:, c] = 1
            cots.append((e, 1.0))
    else:
        raise ValueError(f"unknown Jacobian estimator {estimator!r}")
    for v, weight in cots:
        u = vjp(logits, xg, v, create_graph=False, grad_scale=grad_scale).detach()
        d = u / _expand(u.reshape(n, -1).norm(dim=1).clamp_min(_TINY), u)
        del u
        plus, swap = _perturbed_forward(aux, x, h * d, rng, early)
        del d
        total = total + _free_early(plus, logits, lambda p, base: weight * (((p - base) * v).sum(1) / h).pow(2),
                                    grad_scale, early, swap)
    return total / (n_proj if estimator == "projection" else 1)


def jsigr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lambda_m: float, lambda_j: float, eps: float,
          mask: torch.Tensor | None, jacobian: str, n_proj: int, generator: torch.Generator | None,
          fd_step: float = 0.01, grad_scale=None, backend: str = "reference",
          **_unused) -> dict[str, torch.Tensor]:
    """J-SIGR Eq. 10 with both penalties by finite differences (same returns as reference.jsigr);
    ``backend``: whose layer rules the passes run under (see the module docstring)."""
    _warn_low_precision(x)
    aux = _checks.unwrap_parallel(model)
    early = FREE_EARLY and torch.is_grad_enabled()  # the caller will differentiate (no_grad: values only)
    with torch.enable_grad(), layer_rules(backend, first_order=True, device=x.device):
        rng = _ForwardRNG(x)
        xg, logits = forward(model, x, y)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        ce = per_sample.mean()
        out = {"ce": ce, "logits": logits}
        loss = ce
        if lambda_m > 0:
            # g passed without a name here, so that the callee's del frees it before its forward
            out["sig"] = _input_penalty_fd(aux, x, y, per_sample,
                                           vjp(per_sample.sum(), xg, create_graph=False, grad_scale=grad_scale),
                                           mask, fd_step, rng=rng, grad_scale=grad_scale, early=early).mean()
            loss = loss + lambda_m * out["sig"]
        if lambda_j > 0:
            out["jac"] = _jacobian_fd(aux, x, logits, xg, estimator=jacobian, n_proj=n_proj, generator=generator,
                                      h=fd_step, grad_scale=grad_scale, rng=rng, early=early).mean()
            loss = loss + lambda_j * out["jac"]
        out["loss"] = loss
    return out


def input_gradient_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mask: torch.Tensor | None = None,
                           fd_step: float = 0.01, grad_scale=None, backend: str = "reference",
                           **_unused) -> dict[str, torch.Tensor]:
    _warn_low_precision(x)
    aux = _checks.unwrap_parallel(model)
    early = FREE_EARLY and torch.is_grad_enabled()
    with torch.enable_grad(), layer_rules(backend, first_order=True, device=x.device):
        rng = _ForwardRNG(x)
        xg, logits = forward(model, x, y)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        penalty = _input_penalty_fd(aux, x, y, per_sample,
                                    vjp(per_sample.sum(), xg, create_graph=False, grad_scale=grad_scale),
                                    mask, fd_step, rng=rng, grad_scale=grad_scale, early=early).mean()
    return {"penalty": penalty, "ce": per_sample.mean(), "logits": logits}


def jacobian_norm(model: nn.Module, x: torch.Tensor, *, estimator: str = "projection", n_proj: int = 1,
                  generator: torch.Generator | None = None, fd_step: float = 0.01, grad_scale=None,
                  backend: str = "reference", **_unused) -> dict[str, torch.Tensor]:
    _warn_low_precision(x)
    aux = _checks.unwrap_parallel(model)
    early = FREE_EARLY and torch.is_grad_enabled()
    with torch.enable_grad(), layer_rules(backend, first_order=True, device=x.device):
        rng = _ForwardRNG(x)
        xg, logits = forward(model, x, None)
        per = _jacobian_fd(aux, x, logits, xg, estimator=estimator, n_proj=n_proj, generator=generator,
                           h=fd_step, grad_scale=grad_scale, rng=rng, early=early)
    return {"jac": per.mean(), "per_sample": per, "logits": logits}
