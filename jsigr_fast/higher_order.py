"""Ops whose native higher-order derivatives PyTorch lacks or gets wrong, and the elementary-op
composites every regularizer runs instead (in both backends).

Every penalty here differentiates a derivative: double backprop differentiates an input gradient
(reverse over reverse), the Hutchinson estimator differentiates a forward-mode tangent (reverse over
forward). A layer must therefore have a second derivative in the right mode, and PyTorch 2.13 has
gaps there that a user's model easily hits (each found by scanning common layers against finite
differences, see tests/test_higher_order.py):

* **Softmax, log-softmax, softmin, logsumexp under forward mode**: their tangent cannot be
  differentiated in reverse mode at all ("one of the variables needed for gradient computation has
  been modified by an inplace operation ... output 0 of Exp"): ATen's ``logsumexp_jvp`` scales the
  saved ``exp`` in place (pytorch#162350, fix pending in pytorch#188270). Any attention layer, and a
  model that ends in ``log_softmax``, broke ``jacobian="hutchinson"``.
* **GLU under forward mode**: ``derivative for aten::glu_jvp is not implemented``.
* **GroupNorm on a channels-last input under forward mode** (CPU): ATen's rule views the input as
  NCHW ("view size is not compatible with input tensor's size and stride"); it runs on a contiguous
  copy, as ATen itself does on CUDA.
* **Hardsigmoid** (MobileNetV3's squeeze-excitation): ``derivative for aten::hardsigmoid_backward is
  not implemented``, so no double backprop through it at all.
* **scaled_dot_product_attention**: its fused kernels (flash / memory-efficient, CPU and CUDA) have
  no double backward ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
  not implemented"), which broke every regularizer on a transformer that calls it (timm's ViTs do).
* **torch.cdist** (prototype / nearest-centroid heads): ``the derivative for '_cdist_backward' is not
  implemented``, and it has no forward-mode rule either.
* **nn.MultiheadAttention under forward mode**: it calls softmax (or SDPA) from inside
  ``F.multi_head_attention_forward``, where a ``TorchFunctionMode`` cannot reroute it. It raises
  :class:`ForwardADUnsupported`, and the Hutchinson estimator falls back to the double-VJP JVP
  (exact, one backward more) for that pass, as it does for any layer without a forward-mode rule.

Inside :func:`safe_ops` these calls run the composites below, which use only ops whose derivatives
of every order, in both modes, are PyTorch's ordinary ones. They are exact rewrites (softmax shifted
by its detached row maximum is the same function), so values agree with the native ops to rounding.
Batch / Instance / LayerNorm under forward mode have their own composites in
:func:`jsigr_fast.batchnorm.decomposed_normalization` (there the native rule gives wrong numbers
rather than an error).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

__all__ = ["safe_ops", "SafeOps", "ForwardADUnsupported", "softmax", "log_softmax", "logsumexp", "glu",
           "hardsigmoid", "cdist", "scaled_dot_product_attention"]


class ForwardADUnsupported(NotImplementedError):
    """A layer whose forward-mode tangent cannot be differentiated again (see the module docstring);
    a NotImplementedError, so callers fall back as for a layer without a forward-mode rule."""


# ----------------------------------------------------------------------------------------------
# composites (elementary ops only)
# ----------------------------------------------------------------------------------------------
def _opmath(t: torch.Tensor) -> torch.Tensor:
    """float32 for half / bfloat16 (ATen's softmax kernels accumulate in float32 too)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _shift(input: torch.Tensor, dim) -> torch.Tensor:
    """The detached maximum along ``dim`` (0 where it is infinite, so all -inf rows stay finite)."""
    m = input.detach().amax(dim=dim, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None, *, masked_rows_zero: bool = False
            ) -> torch.Tensor:
    """``softmax(x) = exp(x - c) / sum exp(x - c)`` with c the detached row maximum: the same function
    for any c, so every derivative is softmax's own. ``masked_rows_zero``: an all -inf row gives 0
    (attention's convention) instead of NaN, with a zero gradient."""
    if dtype is not None:
        input = input.to(dtype)
    x = _opmath(input)
    e = torch.exp(x - _shift(x, dim))
    s = e.sum(dim=dim, keepdim=True)
    if masked_rows_zero:
        s = torch.where(s == 0, torch.ones_like(s), s)
    return (e / s).to(input.dtype)


def log_softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    if dtype is not None:
        input = input.to(dtype)
    x = _opmath(input)
    s = x - _shift(x, dim)
    return (s - torch.log(torch.exp(s).sum(dim=dim, keepdim=True))).to(input.dtype)


def logsumexp(input: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    x = _opmath(input)
    c = _shift(x, dim)
    out = (torch.log(torch.exp(x - c).sum(dim=dim, keepdim=True)) + c).to(input.dtype)
    return out if keepdim else out.squeeze(dim)


def glu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    a, b = input.chunk(2, dim=dim)
    return a * torch.sigmoid(b)


def hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``relu6(x + 3) / 6``: the same values and first derivative (1/6 on (-3, 3), else 0), and
    hardtanh's backward is differentiable where hardsigmoid's is not."""
    out = F.relu6(input + 3) / 6
    return input.copy_(out) if inplace else out


def cdist(x1: torch.Tensor, x2: torch.Tensor, p: float = 2.0, compute_mode=None) -> torch.Tensor:
    """``||x1_i - x2_j||_p`` from the broadcast differences (memory ``P x R x M`` per batch, where the
    native kernel needs ``P x R``; only inside the loss call). At a zero distance the gradient is 0,
    as the native backward gives."""
    return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """The math of ``F.scaled_dot_product_attention`` (its documented reference implementation) in
    plain matmul / exp, differentiable to every order in both modes. Rows whose keys are all masked
    give 0, as PyTorch's math kernel does."""
    if is_causal and attn_mask is not None:
        raise RuntimeError("scaled_dot_product_attention: attn_mask and is_causal cannot both be set")
    n_q, n_k = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    blocked = None
    if is_causal:
        blocked = ~torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        blocked = ~attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    weights = softmax(scores, dim=-1, masked_rows_zero=True)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p, training=True)
    return torch.matmul(weights, value)


# ----------------------------------------------------------------------------------------------
# routing
# ----------------------------------------------------------------------------------------------
def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _softmax_call(composite, negate=False):
    def call(args, kwargs):
        # F.softmax(input, dim=None, _stacklevel=3, dtype=None); torch.softmax / Tensor.softmax(input, dim, dtype=None)
        x = _arg(args, kwargs, 0, "input")
        dim = _arg(args, kwargs, 1, "dim")
        if dim is None or not isinstance(x, torch.Tensor):
            return NotImplemented  # the legacy implicit dim: leave it to ATen (and its warning)
        dtype = kwargs.get("dtype")
        if dtype is None and len(args) > 2 and isinstance(args[-1], torch.dtype):
            dtype = args[-1]
        return composite(-x if negate else x, dim, dtype)
    return call


def _logsumexp_call(args, kwargs):
    x, dim = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "dim")
    if dim is None or "out" in kwargs:
        return NotImplemented
    return logsumexp(x, dim, bool(_arg(args, kwargs, 2, "keepdim", False)))


def _glu_call(args, kwargs):
    return glu(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "dim", -1))


def _hardsigmoid_call(args, kwargs):
    return hardsigmoid(_arg(args, kwargs, 0, "input"), bool(_arg(args, kwargs, 1, "inplace", False)))


def _cdist_call(args, kwargs):
    return cdist(*args, **kwargs)


def _sdpa_call(args, kwargs):
    return scaled_dot_product_attention(*args, **kwargs)


def in_transform(t) -> bool:
    """True for a tensor seen inside a ``torch.func`` transform (the fused backend's batched Hutchinson
    probes run under vmap(jvp)). Private API: if it is gone, say False (callers take their ordinary path)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:
        return False


def _carries_tangent(t) -> bool:
    """A forward-mode dual tensor, or one inside a torch.func transform (whose jvp tangents unpack_dual
    does not see; there, assume it does)."""
    if not isinstance(t, torch.Tensor):
        return False
    return fwAD.unpack_dual(t).tangent is not None or in_transform(t)


def _group_norm_call(args, kwargs):
    # F.group_norm(input, num_groups, weight=None, bias=None, eps=1e-5). ATen's forward-mode rule views
    # the input as NCHW-contiguous, and torch.group_norm keeps a channels-last input so on CPU (on CUDA
    # it makes it contiguous first): a channels-last input with a tangent fails ("view size is not
    # compatible"), on the caller's channels-last x or on the fused backend's channels-last
    # activations. Run it on a contiguous copy, as ATen does on CUDA: same values and derivatives.
    t = _arg(args, kwargs, 0, "input")
    if not isinstance(t, torch.Tensor) or t.is_contiguous():
        return NotImplemented
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if fmt is None or not t.is_contiguous(memory_format=fmt):
        return NotImplemented  # other layouts torch.group_norm makes contiguous itself
    rest = args[1:] if args else ()
    kw = {k: v for k, v in kwargs.items() if k != "input"}
    return F.group_norm(t.contiguous(), *rest, **kw)


def _mha_call(args, kwargs):
    qkv = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")]
    if not torch.is_grad_enabled() or not any(_carries_tangent(t) for t in qkv):
        # no tangent (the double-VJP fallback itself, under the same mode), or one that will not be
        # differentiated (the per-layer Jacobian norms run under no_grad): the native layer is right
        return NotImplemented
    raise ForwardADUnsupported("nn.MultiheadAttention's tangent cannot be differentiated again "
                               "(softmax inside F.multi_head_attention_forward; pytorch#162350)")


# reverse over reverse (double backprop); forward-mode passes need these and more
_REVERSE = {F.hardsigmoid: _hardsigmoid_call, F.scaled_dot_product_attention: _sdpa_call, torch.cdist: _cdist_call}
_FORWARD_AD = {
    **_REVERSE,
    F.softmax: _softmax_call(softmax), torch.softmax: _softmax_call(softmax), torch.Tensor.softmax: _softmax_call(softmax),
    torch.special.softmax: _softmax_call(softmax),
    F.log_softmax: _softmax_call(log_softmax), torch.log_softmax: _softmax_call(log_softmax),
    torch.Tensor.log_softmax: _softmax_call(log_softmax), torch.special.log_softmax: _softmax_call(log_softmax),
    F.softmin: _softmax_call(softmax, negate=True),
    torch.logsumexp: _logsumexp_call, torch.Tensor.logsumexp: _logsumexp_call, torch.special.logsumexp: _logsumexp_call,
    F.glu: _glu_call,
    F.group_norm: _group_norm_call,
    F.multi_head_attention_forward: _mha_call,
}


class SafeOps(TorchFunctionMode):
    """Reroutes the calls listed in the module docstring to their composites. ``forward_ad=True`` for
    passes whose forward-mode tangents are differentiated (the Hutchinson estimator), False for the
    forwards whose graphs are differentiated twice in reverse mode."""

    def __init__(self, *, forward_ad: bool = False):
        super().__init__()
        self.forward_ad = forward_ad

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # the composite for func, if any (NotImplemented: leave the call alone); this runs for every
        # torch call of the model's forward, so no helper call in between (host work)
        call = (_FORWARD_AD if self.forward_ad else _REVERSE).get(func)
        if call is not None:
            out = call(args, kwargs)
            if out is not NotImplemented:
                return out
        return self.other(func, args, kwargs)

    def other(self, func, args, kwargs):
        """A call no composite replaces: run as is (a subclass adds its own rules here)."""
        return func(*args, **kwargs)


def _covered(forward_ad: bool) -> bool:
    return any(isinstance(m, SafeOps) and (m.forward_ad or not forward_ad) for m in _get_current_function_mode_stack())


@contextlib.contextmanager
def safe_ops(*, forward_ad: bool = False):
    """Inside the block, the calls listed in the module docstring run their composites. Nothing is
    pushed when an enclosing :class:`SafeOps` (the fused backend's layer rules are one) already covers
    the same mode, so nesting costs no extra Python dispatch per op."""
    if _covered(forward_ad):
        yield
        return
    with SafeOps(forward_ad=forward_ad):
        yield
