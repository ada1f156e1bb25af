"""Every compiled op of jsigr_fast: schema lookup, autograd and fake registrations, Python entry points.

The schemas live in ``csrc/ops.cpp`` (``TORCH_LIBRARY(jsigr_fast, m)``), kernels in ``csrc/<op>.cpp``
(CPU) and ``csrc/cuda/<op>.cu`` (CUDA). This file registers, once, what the C++ side does not:
the autograd formula (``torch.library.register_autograd``) and the shape-only "fake" kernel
(``torch.library.register_fake``) that ``torch.compile`` and ``opcheck`` need.

Each Python entry point picks the compiled kernel when one exists for the tensor's device and
otherwise runs the pure-PyTorch reference from :mod:`jsigr_fast.reference` (or, for
:func:`batch_norm`, ``F.batch_norm``), so callers never have to care whether the extension was built.

Ops: ``masked_sq_norm`` (+ backward); ``batch_norm_train`` / ``batch_norm_backward`` /
``batch_norm_double_backward`` (train-mode batch norm whose backward is itself a differentiable op
with a fused double-backward kernel; formulas and derivation in csrc/README.md). When the extension
has no CUDA kernels but a GPU and Triton are present, the Triton kernels of ``jsigr_fast.kernels``
are registered as the batch-norm ops' CUDA kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from ._extension import extension_loaded, has_kernel

__all__ = ["masked_sq_norm", "masked_sq_norm_compiled_available", "batch_norm", "batch_norm_compiled_available"]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bn_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format the batch-norm ops compute in and return (csrc/batch_norm.cpp, bn_memory_format)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _empty_like_bn(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_bn_memory_format(x))


def _vmap_by_loop(op):
    """A vmap rule that runs ``op`` once per batch entry and stacks the outputs (out_dims 0).

    Used for the batch-norm ops, whose batch semantics (statistics over dims 0 and 2+) do not fold
    into a bigger call. It serves ``torch.func.vmap`` (and jacrev / jacfwd over the ops);
    ``autograd.grad(..., is_grads_batched=True)`` uses the legacy vmap, whose generic fallback runs
    the same per-entry loop (tests/test_bn_ops.py::test_vmap_and_batched_vjp checks both).
    """
    def rule(info, in_dims, *args):
        outs = []
        for i in range(info.batch_size):
            outs.append(op(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]))
        res = tuple(torch.stack([o[k] for o in outs]) for k in range(len(outs[0])))
        return res, (0,) * len(res)

    return rule


def _register() -> None:
    lib = "jsigr_fast"

    @torch.library.register_fake(f"{lib}::masked_sq_norm")
    def _(g, mask):
        torch._check(g.dim() >= 1, lambda: "masked_sq_norm: g needs a batch dimension")
        return g.new_empty((g.shape[0],))

    @torch.library.register_fake(f"{lib}::masked_sq_norm_backward")
    def _(grad_out, g, mask):
        return torch.empty_like(g, memory_format=torch.contiguous_format)

    def _setup(ctx, inputs, output):
        g, mask = inputs
        ctx.save_for_backward(g, mask)

    def _backward(ctx, grad_out):
        g, mask = ctx.saved_tensors
        grad_g = torch.ops.jsigr_fast.masked_sq_norm_backward(grad_out, g, mask) if ctx.needs_input_grad[0] else None
        return grad_g, None  # the mask is a constant: no gradient flows through the indicator

    torch.library.register_autograd(f"{lib}::masked_sq_norm", _backward, setup_context=_setup)

    # The backward is itself differentiable (so gradgradcheck holds and the penalty can be
    # differentiated twice): grad_g = 2 m^2 g grad_out is bilinear in (grad_out, g).
    def _setup_bw(ctx, inputs, output):
        grad_out, g, mask = inputs
        ctx.save_for_backward(grad_out, g, mask)

    def _backward_bw(ctx, gg):
        grad_out, g, mask = ctx.saved_tensors
        d_grad_out = d_g = None
        if ctx.needs_input_grad[0]:
            m2 = 1.0 if mask is None else mask * mask
            d_grad_out = (2.0 * m2 * g * gg).flatten(1).sum(1).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            d_g = torch.ops.jsigr_fast.masked_sq_norm_backward(grad_out, gg.contiguous(), mask)
        return d_grad_out, d_g, None

    torch.library.register_autograd(f"{lib}::masked_sq_norm_backward", _backward_bw, setup_context=_setup_bw)
    _register_batch_norm(lib)


def _register_batch_norm(lib: str) -> None:
    """Fake, autograd and vmap registrations of the three train-mode batch-norm ops.

    Derivative chain: batch_norm_train's backward is the op batch_norm_backward; that op's backward
    is batch_norm_double_backward (fused kernel, exact second order); the double backward's own
    backward (third order, only for gradgradcheck-style uses) differentiates the plain-PyTorch
    reference ``reference.batch_norm_double_backward_ref``.
    """
    ops = torch.ops.jsigr_fast

    @torch.library.register_fake(f"{lib}::batch_norm_train")
    def _(x, weight, bias, eps):
        c, acc = x.shape[1], _opmath(x.dtype)
        return _empty_like_bn(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)

    @torch.library.register_fake(f"{lib}::batch_norm_backward")
    def _(grad_y, x, weight, mean, invstd, grad_mean, grad_invstd):
        c, acc = x.shape[1], _opmath(x.dtype)
        return _empty_like_bn(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)

    @torch.library.register_fake(f"{lib}::batch_norm_double_backward")
    def _(gg_x, gg_weight, gg_bias, grad_y, x, weight, mean, invstd, grad_mean, grad_invstd):
        c, acc = x.shape[1], _opmath(x.dtype)
        return (_empty_like_bn(x), _empty_like_bn(x)) + tuple(x.new_empty((c,), dtype=acc) for _ in range(5))

    def _cast(g, like):
        return g if like is None or g.dtype == like.dtype else g.to(like.dtype)

    # ---- batch_norm_train: backward = batch_norm_backward ----
    def _setup_train(ctx, inputs, output):
        x, weight, bias, _eps = inputs
        _y, mean, invstd = output
        ctx.set_materialize_grads(False)  # unused outputs (usually mean, invstd) give None, not zeros
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.bias_dtype = None if bias is None else bias.dtype

    def _backward_train(ctx, grad_y, grad_mean, grad_invstd):
        x, weight, mean, invstd = ctx.saved_tensors
        if grad_y is None and grad_mean is None and grad_invstd is None:
            return None, None, None, None
        gx, gw, gb = ops.batch_norm_backward(grad_y, x, weight, mean, invstd, grad_mean, grad_invstd)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, _cast(gw, weight) if need[1] else None,
                (gb if ctx.bias_dtype in (None, gb.dtype) else gb.to(ctx.bias_dtype)) if need[2] else None, None)

    torch.library.register_autograd(f"{lib}::batch_norm_train", _backward_train, setup_context=_setup_train)

    # ---- batch_norm_backward: backward = batch_norm_double_backward ----
    def _setup_bw(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs)

    def _backward_bw(ctx, gg_x, gg_weight, gg_bias):
        grad_y, x, weight, mean, invstd, grad_mean, grad_invstd = ctx.saved_tensors
        if gg_x is None and gg_weight is None and gg_bias is None:
            return (None,) * 7
        if grad_y is None:  # the backward ran without a cotangent for y: its terms in grad_y are zero
            grad_y = torch.zeros_like(x)
        outs = ops.batch_norm_double_backward(gg_x, gg_weight, gg_bias, grad_y, x, weight, mean, invstd,
                                              grad_mean, grad_invstd)
        likes = (grad_y, x, weight, mean, invstd, grad_mean, grad_invstd)
        return tuple(_cast(o, like) if need else None for o, like, need in zip(outs, likes, ctx.needs_input_grad))

    torch.library.register_autograd(f"{lib}::batch_norm_backward", _backward_bw, setup_context=_setup_bw)

    # ---- batch_norm_double_backward: third order through the differentiable reference ----
    def _setup_dbw(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs)

    def _backward_dbw(ctx, *grads):
        inputs = ctx.saved_tensors
        wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need and inputs[i] is not None]
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            outs = reference.batch_norm_double_backward_ref(*inputs)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            res = [None] * len(inputs)
            if pairs and wanted:
                got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                          allow_unused=True, create_graph=create_graph)
                for i, g in zip(wanted, got):
                    res[i] = g
        return tuple(res)

    torch.library.register_autograd(f"{lib}::batch_norm_double_backward", _backward_dbw, setup_context=_setup_dbw)

    for name in ("batch_norm_train", "batch_norm_backward", "batch_norm_double_backward"):
        torch.library.register_vmap(f"{lib}::{name}", _vmap_by_loop(getattr(ops, name).default))


if extension_loaded():
    _register()


def masked_sq_norm_compiled_available(device: torch.device | str) -> bool:
    """True when the compiled masked_sq_norm kernel exists for ``device``."""
    return has_kernel("masked_sq_norm", device)


def _prepare_mask(g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device != g.device:
        raise ValueError(f"mask is on {mask.device} but the gradient is on {g.device}")
    if mask.shape == g.shape[1:]:  # one mask shared by every sample
        mask = mask.unsqueeze(0)
    try:
        mask = mask.expand_as(g)
    except RuntimeError:
        raise ValueError(
            f"mask must have the input's shape {tuple(g.shape)} (or {tuple(g.shape[1:])}, shared by all "
            f"samples), got {tuple(mask.shape)}"
        ) from None
    if mask.dtype != g.dtype:
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
        mask = mask.to(g.dtype)
    return mask.detach().contiguous()


def masked_sq_norm(g: torch.Tensor, mask: torch.Tensor | None = None, *, compiled: bool | None = None) -> torch.Tensor:
    """Per-sample masked squared norm ``out[n] = sum_d (mask[n, d] * g[n, d])**2``.

    Args:
        g: ``(N, ...)`` floating tensor (typically the input gradient, with its graph).
        mask: ``None`` (all ones), or a bool/float tensor of ``g``'s shape or of ``g.shape[1:]``.
            It is treated as a constant (detached).
        compiled: force (True) or forbid (False) the compiled kernel; None uses it when available.

    Returns:
        ``(N,)`` tensor in ``g``'s dtype, differentiable w.r.t. ``g`` (twice).
    """
    mask = _prepare_mask(g, mask)
    use_compiled = masked_sq_norm_compiled_available(g.device) if compiled is None else compiled
    if use_compiled:
        if not masked_sq_norm_compiled_available(g.device):
            raise RuntimeError(f"the compiled masked_sq_norm kernel is not available for device {g.device}")
        return torch.ops.jsigr_fast.masked_sq_norm(g.contiguous(), mask)
    return reference.masked_sq_norm_ref(g, mask)


# ----------------------------------------------------------------------------------------------
# train-mode batch norm
# ----------------------------------------------------------------------------------------------
def batch_norm_compiled_available(device: torch.device | str) -> bool:
    """True when the compiled train-mode batch-norm ops (forward, backward, double backward) exist for ``device``."""
    return all(has_kernel(op, device) for op in ("batch_norm_train", "batch_norm_backward",
                                                 "batch_norm_double_backward"))


def batch_norm_supported(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """True when :func:`batch_norm` runs ``x`` through the compiled op (else it calls ``F.batch_norm``)."""
    return (x.dim() >= 2 and x.is_floating_point() and x.numel() > 0 and batch_norm_compiled_available(x.device)
            and (weight is None or weight.dtype in (x.dtype, _opmath(x.dtype))))


def _update_running_stats(input, running_mean, running_var, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch_stat`` (unbiased variance), bit-identical
    to ``F.batch_norm``: ATen's own ``batch_norm_update_stats`` computes it (one extra statistics pass
    over the input, in the training forward only). nn.BatchNorm passes ``1/num_batches_tracked`` as
    momentum when its own momentum is None, so the cumulative average needs nothing special here."""
    if running_mean is None and running_var is None:
        return
    with torch.no_grad():
        torch.batch_norm_update_stats(input.detach(), running_mean, running_var, momentum)


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm`` (same signature and results) whose train mode runs ``jsigr_fast::batch_norm_train``.

    The op's backward and double backward are fused kernels, so a gradient penalty differentiating
    through this layer twice avoids ATen's long chain of small kernels (pytorch#3076). Running
    statistics (when passed) are updated bit-identically to ``F.batch_norm``. Eval mode, unsupported
    inputs or a missing kernel fall through to ``F.batch_norm``.
    """
    if not training or not batch_norm_supported(input, weight):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    F._verify_batch_size(input.size())
    y, _mean, _invstd = torch.ops.jsigr_fast.batch_norm_train(input, weight, bias, eps)
    _update_running_stats(input, running_mean, running_var, momentum)
    return y


def _register_triton_cuda_kernels() -> None:
    """When the extension was built without CUDA kernels but a GPU and Triton are present, the Triton
    launchers of ``jsigr_fast.kernels.batch_norm`` become the CUDA kernels of the batch-norm ops (the
    autograd, fake and vmap registrations above apply to them unchanged)."""
    if not (extension_loaded() and torch.cuda.is_available()) or has_kernel("batch_norm_train", "cuda"):
        return
    from importlib.util import find_spec

    if find_spec("triton") is None:
        return
    from .kernels import batch_norm as triton_bn

    for name in ("batch_norm_train", "batch_norm_backward", "batch_norm_double_backward"):
        torch.library.register_kernel(f"jsigr_fast::{name}", "cuda", getattr(triton_bn, name))


_register_triton_cuda_kernels()
