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
with a fused double-backward kernel; formulas and derivation in csrc/README.md), each also an
``autograd.Function`` (:class:`BatchNormTrain` & co.: the same formulas without torch.library's Python
wrapper, for the fused backend's hot path), and ``batch_norm_double_backward_from_grad_x`` (the double
backward given the backward's outputs instead of its grad_y: :data:`BN_DOUBLE_BACKWARD_FROM_GRAD_X`).
The batch-norm and mask ops have two GPU implementations, the compiled CUDA kernels and the Triton kernels of
``jsigr_fast.kernels``: :func:`use_gpu_kernels` picks one (default: CUDA, Triton for ops the build
has no CUDA kernel for, e.g. a build without nvcc).

The selective-mask family (``csrc/saliency_mask.cpp``, ``csrc/cuda/saliency_mask.cu``,
``kernels/saliency_mask.py``): ``gradient_saliency_mask`` (J-SIGR's default saliency
``|g| / max|g|`` and its threshold or quantile in one kernel, bit-identical to
:func:`jsigr_fast.saliency.selective_mask` of :func:`~jsigr_fast.saliency.gradient_saliency`),
``threshold_mask`` (the same rule on any saliency map), ``adaptor_saliency_mask`` (the adaptor's
``tanh(conv1x1(g / rms(g)))`` and the rule, no graph) and ``masked_sq_norm_bool`` (+ backward: the
masked squared norm with a one-byte mask). Both GPU implementations ran on an H200
(bench/results/gpu_session_h200_2026-11-23.md); CI, without a GPU, compiles the CUDA ones and executes
them in a CUDA-on-CPU emulator (``tests/cuda_emu``), and runs the Triton ones under ``TRITON_INTERPRET=1``.
The loss head: ``cross_entropy_cotangent``
(per-sample CE and ``softmax - onehot`` in one pass, differentiable twice).
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from . import _checks, reference
from ._function import LeanFunction
from ._extension import extension_loaded, has_kernel

__all__ = ["masked_sq_norm", "masked_sq_norm_compiled_available", "batch_norm", "batch_norm_compiled_available",
           "gradient_saliency_mask", "threshold_mask", "adaptor_saliency_mask", "cross_entropy_cotangent",
           "mask_ops_compiled_available", "gpu_kernels", "use_gpu_kernels"]

# the ops added with the fused selective mask and loss head (an older build of the extension may lack them)
MASK_OPS = ("gradient_saliency_mask", "threshold_mask", "adaptor_saliency_mask", "masked_sq_norm_bool",
            "masked_sq_norm_bool_backward")
LOSS_HEAD_OPS = ("cross_entropy_cotangent", "cross_entropy_cotangent_backward")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bn_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format the compiled ops compute in and return (csrc/memory_format.h, dense_memory_format)."""
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
    if all(_op_defined(name) for name in MASK_OPS):
        _register_mask_ops(lib)
    if all(_op_defined(name) for name in LOSS_HEAD_OPS):
        _register_loss_head(lib)


def _op_defined(name: str) -> bool:
    return hasattr(torch.ops.jsigr_fast, name)


_sample_major_format = _bn_memory_format  # the same rule for every op: csrc/memory_format.h


def _register_mask_ops(lib: str) -> None:
    """Fake and autograd registrations of the selective-mask ops and of the bool-masked squared norm.

    The mask ops return bool tensors and have no derivative (the indicator is a constant); callers
    pass detached inputs. ``masked_sq_norm_bool`` is differentiable twice in ``g``, like ``masked_sq_norm``:
    its backward is the op ``masked_sq_norm_bool_backward``, bilinear in ``(grad_out, g)``.
    """
    def _mask_like(t):
        return torch.empty(t.shape, dtype=torch.bool, device=t.device, memory_format=_sample_major_format(t))

    @torch.library.register_fake(f"{lib}::gradient_saliency_mask")
    def _(g, beta, quantile):
        torch._check(g.dim() >= 1, lambda: "gradient_saliency_mask: g needs a batch dimension")
        return _mask_like(g)

    @torch.library.register_fake(f"{lib}::threshold_mask")
    def _(saliency, beta, quantile):
        torch._check(saliency.dim() >= 1, lambda: "threshold_mask: the saliency map needs a batch dimension")
        return _mask_like(saliency)

    @torch.library.register_fake(f"{lib}::adaptor_saliency_mask")
    def _(g, weight, bias, beta, quantile, normalize):
        torch._check(g.dim() >= 2, lambda: "adaptor_saliency_mask: g must be (N, C, *) or (N, D)")
        return torch.empty(g.shape, dtype=torch.bool, device=g.device)

    @torch.library.register_fake(f"{lib}::masked_sq_norm_bool")
    def _(g, mask):
        torch._check(g.dim() >= 1, lambda: "masked_sq_norm_bool: g needs a batch dimension")
        return g.new_empty((g.shape[0],))

    @torch.library.register_fake(f"{lib}::masked_sq_norm_bool_backward")
    def _(grad_out, g, mask):
        return torch.empty(g.shape, dtype=g.dtype, device=g.device, memory_format=_sample_major_format(g))

    def _setup(ctx, inputs, output):
        g, mask = inputs
        ctx.save_for_backward(g, mask)

    def _backward(ctx, grad_out):
        g, mask = ctx.saved_tensors
        grad_g = torch.ops.jsigr_fast.masked_sq_norm_bool_backward(grad_out, g, mask) if ctx.needs_input_grad[0] else None
        return grad_g, None

    torch.library.register_autograd(f"{lib}::masked_sq_norm_bool", _backward, setup_context=_setup)

    def _setup_bw(ctx, inputs, output):
        grad_out, g, mask = inputs
        ctx.save_for_backward(grad_out, g, mask)

    def _backward_bw(ctx, gg):
        grad_out, g, mask = ctx.saved_tensors
        d_grad_out = d_g = None
        if ctx.needs_input_grad[0]:  # d/d grad_out of sum [m] 2 g grad_out gg
            d_grad_out = (2.0 * (g * gg).masked_fill(~mask, 0)).flatten(1).sum(1).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            d_g = torch.ops.jsigr_fast.masked_sq_norm_bool_backward(grad_out, gg, mask)
        return d_grad_out, d_g, None

    torch.library.register_autograd(f"{lib}::masked_sq_norm_bool_backward", _backward_bw, setup_context=_setup_bw)


def _register_loss_head(lib: str) -> None:
    """Fake and autograd registrations of ``cross_entropy_cotangent``.

    With ``p = softmax(z)`` and cotangents ``a`` (of the per-sample losses) and ``b`` (of the
    cotangent output ``p - onehot``): ``grad_z = a[:, None] (p - onehot) + p * (b - <p, b>)``
    (the second term is the softmax Jacobian, symmetric, applied to b). Written with differentiable
    torch ops on the saved logits, so the op is differentiable twice (gradgradcheck).
    """
    @torch.library.register_fake(f"{lib}::cross_entropy_cotangent")
    def _(logits, target):
        torch._check(logits.dim() == 2, lambda: "cross_entropy_cotangent: logits must be (N, K)")
        return logits.new_empty((logits.shape[0],)), logits.new_empty(logits.shape)

    @torch.library.register_fake(f"{lib}::cross_entropy_cotangent_backward")
    def _(grad_loss, grad_cot, logits, target):
        torch._check(logits.dim() == 2, lambda: "cross_entropy_cotangent_backward: logits must be (N, K)")
        return logits.new_empty(logits.shape)

    def _setup(ctx, inputs, output):
        logits, target = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, target)

    def _backward(ctx, grad_loss, grad_cot):
        logits, target = ctx.saved_tensors
        if grad_loss is None and grad_cot is None or not ctx.needs_input_grad[0]:
            return None, None
        if not torch.is_grad_enabled() and _has_kernel("cross_entropy_cotangent_backward", logits.device):
            # the step's final backward (no graph of the backward wanted): one pass per row in C++
            return torch.ops.jsigr_fast.cross_entropy_cotangent_backward(grad_loss, grad_cot, logits, target), None
        # a backward that is itself differentiated (gradgradcheck, Hessian-vector products): torch ops
        acc = _opmath(logits.dtype)
        p = torch.softmax(logits.to(acc), dim=1)
        grad = None
        if grad_loss is not None:
            grad = grad_loss.to(acc)[:, None] * (p - F.one_hot(target.long(), logits.shape[1]).to(acc))
        if grad_cot is not None:
            b = grad_cot.to(acc)
            term = p * (b - (p * b).sum(dim=1, keepdim=True))
            grad = term if grad is None else grad + term
        return grad.to(logits.dtype), None

    torch.library.register_autograd(f"{lib}::cross_entropy_cotangent", _backward, setup_context=_setup)


# Keep batch_norm_backward's own output grad_x for its double backward instead of its input grad_y, and rebuild
# grad_y from it there (rebuild_grad_y)? grad_x is the gradient the producer of the batch norm's input (a conv or
# linear layer) keeps anyway, so this removes one activation-sized tensor per batch norm from every
# create-graph backward (ResNet-20, batch 128: 92 of ~190 MiB per input-gradient graph; bench/bench_memory.py).
# The check that the rebuild is exact to rounding (every |weight * invstd| in [2**-24, 2**24]) reads the
# weights on the host: free on the CPU, a device sync on CUDA. Checked per batch norm it was off there: on the
# H200 (bench/results/fused_cuda_*_bn_rebuild.md, memory_cuda_*.md) it made the fused J-SIGR step 1.19x
# (ResNet-20 fp32) / 1.29x (ResNet-18 bf16) slower for a peak of 2.12x / 2.64x the standard step instead of
# 2.76x / 2.91x. Inside the fused backend's blocks the checks of all batch norms are now read together, once
# (rebuild_checks_together: one sync per block instead of one per batch-norm backward); not measured on a GPU
# yet, so CUDA still keeps grad_y; with BN_DOUBLE_BACKWARD_FROM_GRAD_X the rebuild costs no extra pass or kernel
# launch there either (ResNet-18 bf16, the CUDA settings, counted on the CPU: peak 2.81x -> 2.39x the standard
# step with the rebuild forced). float16 keeps grad_y: grad_x = weight * invstd * (...) underflows its range.
BN_REBUILD_GRAD_Y = {"cpu": True, "cuda": False}
_REBUILD_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_REBUILD_RANGE = 2.0 ** -24


def _rebuild_allowed(x, invstd) -> bool:
    """The device's policy and x's dtype allow the rebuild, and there are values to check on the host (not
    traced, not captured into a CUDA graph: the check's host read would break the capture)."""
    return (BN_REBUILD_GRAD_Y.get(x.device.type, False) and x.dtype in _REBUILD_DTYPES
            and not torch.compiler.is_compiling() and not is_fake(invstd) and not _checks.capturing(x))


def _in_range(weight, invstd) -> torch.Tensor:
    """0-dim bool, on the device: every ``|weight * invstd|`` in [2**-24, 2**24] (the rebuild is exact)."""
    scale = invstd if weight is None else weight.abs() * invstd  # promotes to invstd's (the accumulation) dtype
    return ((scale >= _REBUILD_RANGE) & (scale <= 1 / _REBUILD_RANGE)).all()


class _RebuildChecks:
    """The rebuild checks of the batch norms run inside one :func:`rebuild_checks_together` block, read
    together: at the first batch-norm backward that needs one, every check registered so far is computed
    on the device and read with one host transfer."""

    def __init__(self):
        self._pending: list[tuple] = []  # (weight, invstd) registered, not read yet
        self._ok: list[bool] = []

    def add(self, weight, invstd) -> int:
        self._pending.append((weight, invstd))
        return len(self._ok) + len(self._pending) - 1

    def ok(self, i: int) -> bool:
        if i >= len(self._ok):
            flags = [_in_range(w, s) for w, s in self._pending]
            if len({f.device for f in flags}) > 1:  # a model spread over devices (rare): one read each
                self._ok += [bool(f) for f in flags]
            else:
                stacked = torch.stack(flags)
                # the one host read; where some batch norm cannot rebuild (a zero weight), a second for which
                self._ok += [True] * len(flags) if bool(stacked.all()) else stacked.tolist()
            self._pending = []
        return self._ok[i]


_STATE = threading.local()  # .blocks: the open _RebuildChecks (innermost last); .decided, .aten: see below


@contextlib.contextmanager
def rebuild_checks_together():
    """Inside the block, the grad_y-rebuild checks (:data:`BN_REBUILD_GRAD_Y`) of the batch norms that run
    through :class:`BatchNormTrain` are read together (one host read) instead of once per batch-norm
    backward. The fused backend's layer blocks (:func:`jsigr_fast.fused.fused_layers`) open one."""
    blocks = _STATE.__dict__.setdefault("blocks", [])
    blocks.append(_RebuildChecks())
    try:
        yield
    finally:
        blocks.pop()


def _forward_plan(x, weight, invstd):
    """What a batch norm's forward fixes for its backward: ``(rebuild check, ATen's backward kernel?)``, the
    check ``(checks, index)`` in the open block or None (checked on its own; see :func:`_batch_norm_backward`)."""
    blocks = getattr(_STATE, "blocks", None)
    check = None
    if blocks and _rebuild_allowed(x, invstd):
        check = blocks[-1], blocks[-1].add(weight, invstd)
    return check, _aten_bn("backward", x)


def _batch_norm_backward(plan, *args):
    """``BatchNormBackward.apply(*args)`` as the layer's forward planned it (:func:`_forward_plan`): with
    ATen's first-order kernel or ours, and, where a node is recorded (a create-graph backward), its grad_y
    rebuild decided with the block's other checks. The decisions reach the op's kernel and setup_context
    through thread-local state set around the call (same thread)."""
    check, aten = plan
    try:
        _STATE.aten = aten
        if check is not None and args[0] is not None and torch.is_grad_enabled():
            _STATE.decided = check[0].ok(check[1])
        return BatchNormBackward.apply(*args)
    finally:
        _STATE.decided = _STATE.aten = None


def _rebuilds_grad_y(grad_y, x, weight, mean, invstd, grad_mean, grad_invstd) -> bool:
    if grad_y is None or not _rebuild_allowed(x, invstd):
        return False
    decided = getattr(_STATE, "decided", None)  # read with the block's other checks
    return decided if decided is not None else bool(_in_range(weight, invstd))


class _GraphPlace(LeanFunction):
    """Zeros shaped like ``t`` (one stored element, expanded) whose backward passes the gradient on to ``t``:
    holds ``t``'s place in the graph, not its data."""

    @staticmethod
    def forward(t):
        return t.new_zeros(()).expand(t.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def rebuild_grad_y(gx, gw, gb, x, weight, mean, invstd, grad_mean=None, grad_invstd=None) -> torch.Tensor:
    """``grad_y`` of ``batch_norm_backward(grad_y, x, weight, mean, invstd, grad_mean, grad_invstd)`` from its
    outputs ``(gx, gw, gb)``, in mean's dtype. The backward is ``gx = w s (gy - a/m - xhat b/m) + gm/m -
    gi s^2 xhat/m`` with ``a = gb = sum gy``, ``b = gw = sum gy xhat``, ``s = invstd``, ``xhat = (x - mean) s``,
    m the count per channel, so ``gy = gx / (w s) + xhat (b/m + gi s / (w m)) + a/m - gm / (w s m)``:
    exact to rounding wherever ``w s`` is neither tiny nor huge (what ``_rebuilds_grad_y`` checks)."""
    _dims, shape, m = reference._bn_view(x)
    ws = invstd if weight is None else weight * invstd  # promotes to acc
    inv_ws = 1 / ws
    coef = gw / m  # of xhat
    const = gb / m
    if grad_invstd is not None:
        coef = coef + grad_invstd * invstd * invstd * inv_ws / m
    if grad_mean is not None:
        const = const - grad_mean * inv_ws / m
    slope = coef * invstd  # of x
    const = const - mean * slope
    out = torch.addcmul(const.reshape(shape), x, slope.reshape(shape))  # x, gx in acc or narrower: promoted
    if not (torch._C._are_functorch_transforms_active() or _any_legacy_batched((out, gx))):
        # in place (out is ours and x-shaped; not where a batched gx could not be written into it): one
        # activation-sized temporary in acc less (float32 for a bfloat16 activation: twice its size) at the
        # step's peak, which can sit in this rebuild (ResNet-18 bf16, at the 112x112 stem layer: CPU, batch 16,
        # the CUDA settings, the rebuild forced: peak 2.93x -> 2.66x the standard step, below the 2.81x of
        # keeping grad_y; bench/results/memory_cpu_resnet18_b16_bfloat16_cl_cuda_policies.md)
        return out.addcmul_(gx, inv_ws.reshape(shape))
    return torch.addcmul(out, gx, inv_ws.reshape(shape))


# ---- the three train-mode batch-norm ops' autograd formulas (registered below, and run by the Functions) ----
# Derivative chain: batch_norm_train's backward is the op batch_norm_backward; that op's backward is
# batch_norm_double_backward (fused kernel, exact second order); the double backward's own backward
# (third order, only for gradgradcheck-style uses) differentiates the plain-PyTorch reference
# ``reference.batch_norm_double_backward_ref``.
def _cast(g, like):
    return g if like is None or g.dtype == like.dtype else g.to(like.dtype)


def _setup_bn_train(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, invstd = output
    ctx.set_materialize_grads(False)  # unused outputs (usually mean, invstd) give None, not zeros
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.bn_plan = _forward_plan(x, weight, invstd)


def _backward_bn_train(ctx, grad_y, grad_mean, grad_invstd):
    x, weight, mean, invstd = ctx.saved_tensors
    if grad_y is None and grad_mean is None and grad_invstd is None:
        return None, None, None, None
    gx, gw, gb = _batch_norm_backward(ctx.bn_plan, grad_y, x, weight, mean, invstd, grad_mean, grad_invstd)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, _cast(gw, weight) if need[1] else None,
            (gb if ctx.bias_dtype in (None, gb.dtype) else gb.to(ctx.bias_dtype)) if need[2] else None, None)


def _setup_bn_backward(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.rebuild = _rebuilds_grad_y(*inputs)
    if ctx.rebuild:  # grad_y is not kept: see rebuild_grad_y
        grad_y = inputs[0]
        ctx.grad_y_dtype = grad_y.dtype
        # fixed here, with the rebuild, so that the double backward after the loss call runs what it chose
        ctx.from_grad_x = BN_DOUBLE_BACKWARD_FROM_GRAD_X.get(grad_y.device.type, False)
        ctx.save_for_backward(*output, *inputs[1:])
        # grad_y's place in the graph, without its data, for a create-graph double backward (third order)
        ctx.grad_y_place = None
        if grad_y.requires_grad:
            with torch.enable_grad():
                ctx.grad_y_place = _GraphPlace.apply(grad_y)
    else:
        ctx.save_for_backward(*inputs)


# Run the double backward of a batch norm whose grad_y was not kept straight from the backward's outputs (grad_x,
# grad_weight, grad_bias), per device? The op batch_norm_double_backward_from_grad_x never forms grad_y
# (csrc/batch_norm_kernels.h): the same passes over the data as the double backward given grad_y, instead of
# rebuild_grad_y's two more, its activation-sized temporary and its ~10 small [C] ops (kernel launches on a GPU).
# Used wherever no graph of the double backward is recorded (the step's final backward); a create-graph one
# (third order) rebuilds grad_y with torch ops. Read where the rebuild is decided (the create-graph VJP).
# Measured on the 2-core CPU (bench/results/memory_cpu_*.md, fused_cpu_resnet20_b128_float32_t2_jsigr_rebuild_torch
# .md; --ablation rebuild_torch is the torch rebuild): ResNet-20, batch 128, fp32: the fused J-SIGR step's peak
# 428.5 -> 420.5 MiB (2.18x -> 2.14x the standard step; the rebuild's temporary at a stage-1 double backward),
# double backprop's 1.67x -> 1.63x, and the torch rebuild took 1.06x [1.01-1.07] the step's time (8 rounds).
# ResNet-18 bf16 channels-last, batch 16, the CUDA settings with the rebuild forced: 2.66x -> 2.39x (the
# rebuild's float32 temporary was twice the bf16 activation). On CUDA it only runs where BN_REBUILD_GRAD_Y is on
# (bench_fused.py --ablation bn_rebuild times that, --ablation rebuild_torch this).
BN_DOUBLE_BACKWARD_FROM_GRAD_X = {"cpu": True, "cuda": True}
_FROM_GRAD_X = "batch_norm_double_backward_from_grad_x"


def _double_backward_from_grad_x(ctx, gg_x, gg_weight, gg_bias, saved):
    """The 7 gradients straight from the saved ``(grad_x, grad_weight, grad_bias, x, ...)``, or None where this
    call takes the other path (the setting off at the forward, a graph, a torch.func transform, a legacy-batched
    gradient, no kernel)."""
    x = saved[3]
    if (not ctx.from_grad_x or torch.is_grad_enabled()
            or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()
            or _any_legacy_batched((gg_x, gg_weight, gg_bias)) or not _has_kernel(_FROM_GRAD_X, x.device)):
        return None
    return torch.ops.jsigr_fast.batch_norm_double_backward_from_grad_x(gg_x, gg_weight, gg_bias, *saved)


def _backward_bn_backward(ctx, gg_x, gg_weight, gg_bias):
    if gg_x is None and gg_weight is None and gg_bias is None:
        return (None,) * 7
    if ctx.rebuild:
        saved = ctx.saved_tensors
        gx, gw, gb, x, weight, mean, invstd, grad_mean, grad_invstd = saved
        outs = _double_backward_from_grad_x(ctx, gg_x, gg_weight, gg_bias, saved)
        if outs is not None:  # d_grad_y in x's dtype, which is grad_y's (the backward op requires it)
            likes = (x, x, weight, mean, invstd, grad_mean, grad_invstd)
            need = ctx.needs_input_grad
            return tuple([(o if like is None or o.dtype == like.dtype else o.to(like.dtype)) if n else None
                          for o, like, n in zip(outs, likes, need)])
        with torch.no_grad():  # its value; its derivatives are grad_y's own (the rebuild is the identity)
            grad_y = rebuild_grad_y(gx, gw, gb, x, weight, mean, invstd, grad_mean, grad_invstd)
        if grad_y.dtype != ctx.grad_y_dtype:
            grad_y = grad_y.to(ctx.grad_y_dtype)
        if ctx.grad_y_place is not None and torch.is_grad_enabled():
            grad_y = grad_y + ctx.grad_y_place  # zeros, whose backward is grad_y's
    else:
        grad_y, x, weight, mean, invstd, grad_mean, grad_invstd = ctx.saved_tensors
    if grad_y is None:  # the backward ran without a cotangent for y: its terms in grad_y are zero
        grad_y = torch.zeros_like(x)
    outs = BatchNormDoubleBackward.apply(gg_x, gg_weight, gg_bias, grad_y, x, weight, mean, invstd,
                                         grad_mean, grad_invstd)
    likes = (grad_y, x, weight, mean, invstd, grad_mean, grad_invstd)
    # a list comprehension, not a generator, and _cast's test inline: one Python frame per call, not one
    # per element (host work; bench/bench_overhead.py)
    return tuple([(o if like is None or o.dtype == like.dtype else o.to(like.dtype)) if need else None
                  for o, like, need in zip(outs, likes, ctx.needs_input_grad)])


def _setup_bn_double_backward(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs)


def _backward_bn_double_backward(ctx, *grads):
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


_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _any_legacy_batched(args) -> bool:
    # a loop, not any(<generator>): this runs for every batch-norm op call, and a generator costs a
    # Python frame per argument (host work; bench/bench_overhead.py)
    for a in args:
        if isinstance(a, torch.Tensor) and _is_legacy_batched(a):
            return True
    return False


class _OpFunction(LeanFunction):
    """One of the batch-norm ops with its registered autograd formula (the functions above), as a Function.

    What calling ``torch.ops.jsigr_fast.<op>`` does, without torch.library's Python wrapper around the
    formula (a dispatch back into Python, a redispatch and a schema walk to fill defaults per call). With
    :class:`~jsigr_fast._function.LeanFunction` it took the fused ResNet-20 J-SIGR step from 15009 to 11944
    Python calls (bench/bench_overhead.py, the CUDA settings at tiny shapes).
    Inside ``torch.func`` transforms, ``torch.compile`` and the legacy vmap of ``autograd.grad(...,
    is_grads_batched=True)`` it calls the op itself (its vmap rule, fake kernel; a Function applied to
    legacy-batched tensors would save the batch wrappers into the graph)."""

    _op_name = ""

    @classmethod
    def apply(cls, *args):
        if (torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()
                or _any_legacy_batched(args)):
            return getattr(torch.ops.jsigr_fast, cls._op_name)(*args)
        if not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
            # no node to record (e.g. the step's final backward): the kernel alone, as the registered op
            # runs then; Function.apply would still run setup_context (saving tensors, the rebuild check)
            return cls._kernel(*args)
        return super().apply(*args)

    @classmethod
    def _kernel(cls, *args):
        # the op's device kernel, as torch.library's wrapper runs it under no_grad
        with torch._C._AutoDispatchBelowAutograd():
            return getattr(torch.ops.jsigr_fast, cls._op_name)(*args)


# Which first-order kernels of the differentiable batch-norm ops (BatchNormTrain's forward, BatchNormBackward's
# backward) are ATen's native ones, per device: the double backward stays the fused kernel either way, and
# the values are the same to rounding (the batch statistics ATen saves are what the fused double backward
# then uses). On the H200 ATen's forward / backward beat ours at ResNet-20's shapes (16-54 us vs 35-124 us;
# bench/results/bn_cuda_float32.md), which is why the first-order blocks already take ATen's batch norm
# there (fused.FIRST_ORDER_ATEN_BN); here they would serve the create-graph passes too. Off on CUDA until a
# GPU run measures it (bench_fused.py --ablation aten_bn; bench/gpu_session.sh runs it). On the 2-core CPU
# (ResNet-20, batch 128, fp32, channels-last activations; bench/results/fused_cpu_*_jsigr_aten_bn.md) the
# fused J-SIGR step took 1.04x [0.98-1.14] the time with them: off. The choice is fixed at each layer's
# forward (_forward_plan), so the step's backward after the loss call runs the kernel its forward planned.
# ATen's CPU kernels keep bf16 statistics in bf16 (ours: float32), so the CPU takes them for float32 /
# float64 only. Backward calls that carry cotangents of the statistics (from the double backward) stay ours.
ATEN_BN_KERNELS = {"cpu": (), "cuda": ()}


def _aten_bn(step: str, x) -> bool:
    allowed_dtype = x.is_cuda or x.dtype in (torch.float32, torch.float64)
    return allowed_dtype and step in ATEN_BN_KERNELS.get(x.device.type, ())


def _aten_weight(x, weight, acc):
    """ATen's weight argument: in the accumulation dtype, so its [C] gradients come back in it (ours do),
    and ones for none, so the backward still returns sum(grad_y * xhat) and sum(grad_y) (the Hutchinson
    tangent's statistics need them)."""
    return torch.ones(x.shape[1], dtype=acc, device=x.device) if weight is None else weight.to(acc)


class BatchNormTrain(_OpFunction):
    """``jsigr_fast::batch_norm_train`` (x, weight, bias, eps) -> (y, mean, invstd)."""
    _op_name = "batch_norm_train"

    @staticmethod
    def forward(x, weight, bias, eps):
        return BatchNormTrain._kernel(x, weight, bias, eps)

    @classmethod
    def _kernel(cls, x, weight, bias, eps):
        if not _aten_bn("forward", x):
            return super()._kernel(x, weight, bias, eps)
        acc = _opmath(x.dtype)
        b = None if bias is None else bias.to(acc)
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, _aten_weight(x, weight, acc), b, None, None, True,
                                                           0.0, eps)
        return y, mean.to(acc), invstd.to(acc)

    setup_context = staticmethod(_setup_bn_train)
    backward = staticmethod(_backward_bn_train)


class BatchNormBackward(_OpFunction):
    """``jsigr_fast::batch_norm_backward`` (grad_y, x, weight, mean, invstd, grad_mean, grad_invstd)."""
    _op_name = "batch_norm_backward"

    @staticmethod
    def forward(grad_y, x, weight, mean, invstd, grad_mean, grad_invstd):
        return BatchNormBackward._kernel(grad_y, x, weight, mean, invstd, grad_mean, grad_invstd)

    @classmethod
    def _kernel(cls, grad_y, x, weight, mean, invstd, grad_mean, grad_invstd):
        # ATen's has no terms for cotangents of the statistics (grad_mean, grad_invstd): those stay ours
        planned = getattr(_STATE, "aten", None)  # fixed at the layer's forward (_forward_plan)
        aten = _aten_bn("backward", x) if planned is None else planned
        if grad_mean is not None or grad_invstd is not None or grad_y is None or not aten:
            return super()._kernel(grad_y, x, weight, mean, invstd, grad_mean, grad_invstd)
        return torch.ops.aten.native_batch_norm_backward(grad_y, x, _aten_weight(x, weight, mean.dtype), None, None,
                                                         mean, invstd, True, 0.0, [True, True, True])

    setup_context = staticmethod(_setup_bn_backward)
    backward = staticmethod(_backward_bn_backward)


class BatchNormDoubleBackward(_OpFunction):
    """``jsigr_fast::batch_norm_double_backward``."""
    _op_name = "batch_norm_double_backward"

    @staticmethod
    def forward(gg_x, gg_weight, gg_bias, grad_y, x, weight, mean, invstd, grad_mean, grad_invstd):
        return BatchNormDoubleBackward._kernel(gg_x, gg_weight, gg_bias, grad_y, x, weight, mean, invstd,
                                               grad_mean, grad_invstd)

    setup_context = staticmethod(_setup_bn_double_backward)
    backward = staticmethod(_backward_bn_double_backward)


def _register_batch_norm(lib: str) -> None:
    """Fake, autograd and vmap registrations of the three train-mode batch-norm ops (the formulas above)."""
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

    if _op_defined(_FROM_GRAD_X):  # an older build of the extension lacks it
        @torch.library.register_fake(f"{lib}::{_FROM_GRAD_X}")
        def _(gg_x, gg_weight, gg_bias, grad_x, grad_weight, grad_bias, x, weight, mean, invstd, grad_mean,
              grad_invstd):
            c, acc = x.shape[1], _opmath(x.dtype)
            return (_empty_like_bn(x), _empty_like_bn(x)) + tuple(x.new_empty((c,), dtype=acc) for _ in range(5))

    torch.library.register_autograd(f"{lib}::batch_norm_train", _backward_bn_train, setup_context=_setup_bn_train)
    torch.library.register_autograd(f"{lib}::batch_norm_backward", _backward_bn_backward,
                                    setup_context=_setup_bn_backward)
    torch.library.register_autograd(f"{lib}::batch_norm_double_backward", _backward_bn_double_backward,
                                    setup_context=_setup_bn_double_backward)

    for name in ("batch_norm_train", "batch_norm_backward", "batch_norm_double_backward"):
        torch.library.register_vmap(f"{lib}::{name}", _vmap_by_loop(getattr(ops, name).default))


if extension_loaded():
    _register()


def masked_sq_norm_compiled_available(device: torch.device | str) -> bool:
    """True when the compiled masked_sq_norm kernel exists for ``device``."""
    return has_kernel("masked_sq_norm", device)


def _prepare_mask(g: torch.Tensor, mask: torch.Tensor | None, *, keep_bool: bool = False) -> torch.Tensor | None:
    """``mask`` checked, expanded to g's shape, detached and contiguous, in g's dtype (a bool mask
    stays bool, in its own layout, with ``keep_bool``: the one-byte kernel handles layout)."""
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
        if not (keep_bool and mask.dtype == torch.bool):
            mask = mask.to(g.dtype)
    if keep_bool and mask.dtype == torch.bool:
        # the one-byte kernels lay the mask out like g themselves (dense_memory_format): forcing it
        # NCHW here would cost two copies of a channels-last mask (fused.CHANNELS_LAST) per call
        return mask.detach()
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

    A bool mask runs the one-byte kernel ``masked_sq_norm_bool`` where it is built (a quarter of a
    float32 mask's traffic, and no conversion pass); the values are the same (``m * g`` is exact
    for ``m`` in {0, 1}), only the summation order of the kernels differs.
    """
    if (compiled is not False and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
            and _has_kernel("masked_sq_norm_bool", g.device)):
        return torch.ops.jsigr_fast.masked_sq_norm_bool(g, _prepare_mask(g, mask, keep_bool=True))
    mask = _prepare_mask(g, mask)
    use_compiled = masked_sq_norm_compiled_available(g.device) if compiled is None else compiled
    if use_compiled:
        if not masked_sq_norm_compiled_available(g.device):
            raise RuntimeError(f"the compiled masked_sq_norm kernel is not available for device {g.device}")
        return torch.ops.jsigr_fast.masked_sq_norm(g.contiguous(), mask)
    return reference.masked_sq_norm_ref(g, mask)


def _has_kernel(op: str, device) -> bool:
    """has_kernel for an op that an older build of the extension may not define."""
    return _op_defined(op) and has_kernel(op, device) if extension_loaded() else False


def _use_compiled(op: str, device, compiled: bool | None) -> bool:
    if compiled is None:
        return _has_kernel(op, device)
    if compiled and not _has_kernel(op, device):
        raise RuntimeError(f"the compiled {op} kernel is not available for device {device}")
    return compiled


def _quantile(quantile) -> float | None:
    return None if quantile is None else float(quantile)


# ----------------------------------------------------------------------------------------------
# the selective mask (J-SIGR Eq. 10: m = 1[M <= beta]) and the loss head
# ----------------------------------------------------------------------------------------------
def mask_ops_compiled_available(device: torch.device | str) -> bool:
    """True when the compiled selective-mask ops (and the bool-masked squared norm) exist for ``device``."""
    return all(_has_kernel(op, device) for op in MASK_OPS)


def gradient_saliency_mask(g_hat: torch.Tensor, beta: float, quantile: float | None = None, *,
                           compiled: bool | None = None) -> torch.Tensor:
    """J-SIGR's default selective mask from the perturbed-input gradient, in one kernel.

    ``M = |g_hat| / max_d |g_hat|`` per sample (:func:`jsigr_fast.saliency.gradient_saliency`; never
    materialised), then ``M <= beta``, or with ``quantile=q`` the ``k = D - quantile_kept(q, D)`` least
    salient features of each sample (:func:`jsigr_fast.saliency.quantile_kept`: ``floor(q D)`` computed
    exactly; ties at the k-th smallest value included), exactly as
    :func:`jsigr_fast.saliency.selective_mask`. Bit-identical to those two functions (in every dtype).

    Args:
        g_hat: ``(N, ...)`` floating tensor (treated as a constant).
        beta, quantile: the rule (``beta`` is ignored when ``quantile`` is given).
        compiled: force (True) or forbid (False) the compiled kernel; None uses it when available.

    Returns:
        bool tensor of ``g_hat``'s shape (its memory format when contiguous or channels-last).
    """
    g = g_hat.detach()
    if _use_compiled("gradient_saliency_mask", g.device, compiled):
        return torch.ops.jsigr_fast.gradient_saliency_mask(g, float(beta), _quantile(quantile))
    return reference.gradient_saliency_mask_ref(g, beta, quantile)


def threshold_mask(saliency: torch.Tensor, beta: float, quantile: float | None = None, *,
                   compiled: bool | None = None) -> torch.Tensor:
    """``M <= beta`` (or the quantile rule) of a precomputed saliency map ``M``, as a bool tensor:
    :func:`jsigr_fast.saliency.selective_mask` with a one-byte result, bit-identical."""
    M = saliency.detach()
    if _use_compiled("threshold_mask", M.device, compiled):
        return torch.ops.jsigr_fast.threshold_mask(M, float(beta), _quantile(quantile))
    return reference.threshold_mask_ref(M, beta, quantile)


def adaptor_saliency_mask(g_hat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, beta: float,
                          quantile: float | None = None, *, normalize: bool = True,
                          compiled: bool | None = None) -> torch.Tensor:
    """The mask of a :class:`jsigr_fast.SaliencyAdaptor` without a graph: ``M = tanh(conv1x1(g / rms(g)))``
    (``rms`` per sample when ``normalize``; ``(N, D)`` inputs are one channel) and the rule, in one
    kernel, M never stored. Agrees with the reference (``adaptor(g)`` then
    :func:`~jsigr_fast.saliency.selective_mask`) except at features whose ``M`` lies within the
    dtype's rounding of the threshold: the 1x1 convolution sums in another order than ATen's.

    Args:
        weight: the adaptor's ``conv.weight`` (``[C, C, 1, 1]``), bias its ``conv.bias`` (or None).
    """
    g = g_hat.detach()
    w = weight.detach()
    b = None if bias is None else bias.detach()
    if _use_compiled("adaptor_saliency_mask", g.device, compiled):
        return torch.ops.jsigr_fast.adaptor_saliency_mask(g, w, b, float(beta), _quantile(quantile), bool(normalize))
    return reference.adaptor_saliency_mask_ref(g, w, b, beta, quantile, normalize=normalize)


def cross_entropy_cotangent(logits: torch.Tensor, target: torch.Tensor, *,
                            compiled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy and the input-gradient cotangent, in one pass over the logits.

    Returns ``(loss, r)``: ``loss[n] = CE(logits[n], target[n])`` (``F.cross_entropy(...,
    reduction="none")``) and ``r = softmax(logits) - onehot(target)`` (``d sum_n loss_n / d logits``),
    both differentiable (twice) w.r.t. ``logits``; ``J^T r`` is the per-sample input gradient.
    """
    if _use_compiled("cross_entropy_cotangent", logits.device, compiled):
        return torch.ops.jsigr_fast.cross_entropy_cotangent(logits, target)
    return reference.cross_entropy_cotangent_ref(logits, target)


# ----------------------------------------------------------------------------------------------
# train-mode batch norm
# ----------------------------------------------------------------------------------------------
def batch_norm_compiled_available(device: torch.device | str) -> bool:
    """True when the compiled train-mode batch-norm ops (forward, backward, double backward) exist for ``device``."""
    # (and-ed, not all(<generator>): this runs for every batch-norm call of the fused backend)
    return (has_kernel("batch_norm_train", device) and has_kernel("batch_norm_backward", device)
            and has_kernel("batch_norm_double_backward", device))


def batch_norm_supported(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """True when :func:`batch_norm` runs ``x`` through the compiled op (else it calls ``F.batch_norm``)."""
    return (x.dim() >= 2 and x.is_floating_point() and x.numel() > 0 and batch_norm_compiled_available(x.device)
            and (weight is None or weight.dtype in (x.dtype, _opmath(x.dtype))))


def _update_running_stats(input, running_mean, running_var, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch_stat`` (unbiased variance), bit-identical
    to ``F.batch_norm`` on the same input (a channels-last activation, see
    ``jsigr_fast.fused.CHANNELS_LAST``, comes out of a convolution that rounds differently, so there
    the statistics agree to rounding): ATen's own ``batch_norm_update_stats`` computes it (one extra statistics pass
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
    return batch_norm_with_stats(input, running_mean, running_var, weight, bias, training, momentum, eps)[0]


def batch_norm_with_stats(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                          eps=1e-5) -> tuple:
    """:func:`batch_norm` returning ``(y, mean, invstd)``: the op's batch statistics (differentiable outputs of
    its node, in the accumulation dtype), or ``(y, None, None)`` where it falls through to ``F.batch_norm``."""
    if not training or not batch_norm_supported(input, weight):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps), None, None
    F._verify_batch_size(input.size())
    y, mean, invstd = BatchNormTrain.apply(input, weight, bias, eps)
    _update_running_stats(input, running_mean, running_var, momentum)
    return y, mean, invstd


# ----------------------------------------------------------------------------------------------
# the GPU implementation: compiled CUDA kernels (csrc/cuda) or Triton kernels (kernels/)
# ----------------------------------------------------------------------------------------------
# The ops with a Triton launcher (jsigr_fast.kernels.<module>.<op>), by module.
TRITON_OPS = {
    "batch_norm": ("batch_norm_train", "batch_norm_backward", "batch_norm_double_backward", _FROM_GRAD_X),
    "saliency_mask": ("gradient_saliency_mask", "threshold_mask", "adaptor_saliency_mask", "masked_sq_norm_bool",
                      "masked_sq_norm_bool_backward"),
    "loss_head": ("cross_entropy_cotangent", "cross_entropy_cotangent_backward"),
}
GPU_KERNELS_ENV = "JSIGR_FAST_GPU_KERNELS"
GPU_KERNEL_CHOICES = ("cuda", "triton")
# which of them the build compiled a CUDA kernel for (taken before any Triton registration)
_COMPILED_CUDA = frozenset(op for names in TRITON_OPS.values() for op in names
                           if _op_defined(op) and has_kernel(op, "cuda"))
_gpu_state = {"mode": None, "lib": None}  # the active choice and the Library holding its Triton registrations


def gpu_kernels() -> str | None:
    """The GPU implementation in use: ``"cuda"`` (the compiled kernels of csrc/cuda, Triton only for
    ops the build has no CUDA kernel for), ``"triton"`` (the Triton kernels of jsigr_fast.kernels for
    every op that has one) or None (none selected: no GPU at import, or no Triton and no CUDA build)."""
    return _gpu_state["mode"]


def use_gpu_kernels(impl: str) -> None:
    """Choose which implementation the ops' CUDA dispatch key runs: ``"cuda"`` or ``"triton"`` (see
    :func:`gpu_kernels`). The choice is global and takes effect for the next call; autograd, fake and
    vmap registrations apply to either unchanged. The default at import is ``"cuda"``, or the value of
    the ``JSIGR_FAST_GPU_KERNELS`` environment variable. ``bench/bench_bn.py``, ``bench/bench_mask.py``
    and ``bench/bench_loss_head.py`` time both side by side on a GPU, which is how the default is to be
    chosen.

    Raises:
        ValueError: ``impl`` is not one of ``"cuda"``, ``"triton"``.
        RuntimeError: the extension is not loaded, or ``"triton"`` without Triton installed.
    """
    if impl not in GPU_KERNEL_CHOICES:
        raise ValueError(f"use_gpu_kernels: impl must be one of {GPU_KERNEL_CHOICES}, got {impl!r}")
    if not extension_loaded():
        raise RuntimeError("use_gpu_kernels: the jsigr_fast extension is not loaded")
    _apply_gpu_kernels(impl)


def _triton_importable() -> bool:
    from importlib.util import find_spec

    return find_spec("triton") is not None


def _apply_gpu_kernels(mode: str | None) -> None:
    """Register the Triton launchers over the CUDA key for ``mode`` ("triton": every op that has one;
    "cuda": those the build has no compiled CUDA kernel for; None: none), in a Library of their own, so
    that destroying it restores the compiled kernels (the dispatcher keeps the earlier registration)."""
    import warnings

    if _gpu_state["lib"] is not None:
        _gpu_state["lib"]._destroy()
        _gpu_state["lib"] = None
    _gpu_state["mode"] = None
    if mode is None:
        return
    todo = [(module, op) for module, names in TRITON_OPS.items() for op in names
            if _op_defined(op) and (mode == "triton" or op not in _COMPILED_CUDA)]
    if todo and not _triton_importable():
        if mode == "triton":
            raise RuntimeError("use_gpu_kernels('triton'): triton is not installed")
        todo = []  # "cuda" without Triton: only the compiled kernels
    if todo:
        import importlib

        lib = torch.library.Library("jsigr_fast", "IMPL")
        with warnings.catch_warnings():  # "Overriding a previously registered kernel" is the point here
            warnings.simplefilter("ignore", UserWarning)
            for module, op in todo:
                fn = getattr(importlib.import_module(f"jsigr_fast.kernels.{module}"), op)
                torch.library.register_kernel(f"jsigr_fast::{op}", "cuda", fn, lib=lib)
        _gpu_state["lib"] = lib
    _gpu_state["mode"] = mode


def _select_gpu_kernels_at_import() -> None:
    """With a GPU: the compiled CUDA kernels, Triton for ops without one (or Triton for all, when
    ``JSIGR_FAST_GPU_KERNELS=triton``). Without a GPU nothing is registered (and triton not imported)."""
    import os
    import warnings

    if not (extension_loaded() and torch.cuda.is_available()):
        return
    mode = os.environ.get(GPU_KERNELS_ENV, "cuda") or "cuda"
    if mode not in GPU_KERNEL_CHOICES:
        warnings.warn(f"{GPU_KERNELS_ENV}={mode!r} is not one of {GPU_KERNEL_CHOICES}; using 'cuda'")
        mode = "cuda"
    if mode == "triton" and not _triton_importable():
        warnings.warn(f"{GPU_KERNELS_ENV}=triton but triton is not installed; using the compiled CUDA kernels")
        mode = "cuda"
    _apply_gpu_kernels(mode)


_select_gpu_kernels_at_import()
