"""Triton kernels of the fused loss head: per-sample cross-entropy and its input-gradient cotangent.

Same ops and contracts as the compiled ``jsigr_fast::cross_entropy_cotangent`` and
``cross_entropy_cotangent_backward`` (schemas in csrc/ops.cpp, CPU kernels in
csrc/cross_entropy_cotangent.cpp + csrc/sample_ops_kernels.h, CUDA kernels in
csrc/cuda/cross_entropy_cotangent.cu)::

    loss[n] = logsumexp(z_n) - z_n[y_n]              cot[n] = softmax(z_n) - onehot(y_n)
    grad[n] = a_n (p_n - onehot(y_n)) + p_n * (b_n - <p_n, b_n>),   p = softmax(z)

The launchers are plain eager functions: they run on CUDA tensors and, under ``TRITON_INTERPRET=1``,
on CPU tensors; ``jsigr_fast.ops`` registers them as the CUDA kernels of the ops when the build has
no CUDA sources, or for every op after ``jsigr_fast.ops.use_gpu_kernels("triton")``.

Structure: one program per row (K is 10..1000 for classifiers, up to ~2e4 for ImageNet-21k), looping
over the row in blocks of ``min(next_pow2(K), 2048)``: max, then the sum of ``exp(z - max)``, then the
outputs (``p = exp((z - max) - log s)``, as the CPU kernel writes it: no division), and in the backward
one more pass for ``<p, b>``. Re-reading a row of at most a few KB comes from L1/L2. Accumulation in
float32 (float64 for float64 logits); bfloat16 / half are widened exactly and each output is rounded
once to the dtype. ``tl.exp`` / ``tl.log`` are the GPU's fast approximations in float32 (a few units
of float32 rounding relative on p; below the tolerances of tests/test_loss_head.py).

Targets. The C++ CPU op checks every target on the host and names the bad sample; here that would
cost a device-to-host synchronisation per call, so the launchers do what ATen's ``nll_loss`` does on
a GPU: an asynchronous device-side check (``torch._assert_async``, which on CPU tensors raises at
once), and the kernels never read outside the row whatever the target.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dtype import _load, _round_to, _store

__all__ = ["cross_entropy_cotangent", "cross_entropy_cotangent_backward"]

_MAX_BLOCK = 2048


@triton.jit
def _row_lse(z_ptr, base, K, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # (max_k z_k, log sum_k exp(z_k - max)) of the row z_ptr[base : base + K], in ACC
    offs = tl.arange(0, BLOCK)
    mx = tl.full([BLOCK], float("-inf"), ACC)
    for start in range(0, K, BLOCK):
        k = start + offs
        inb = k < K
        mx = tl.maximum(mx, tl.where(inb, _load(z_ptr, base + k, inb, ACC), float("-inf")))
    m = tl.max(mx, axis=0)
    s = tl.zeros([BLOCK], ACC)
    for start in range(0, K, BLOCK):
        k = start + offs
        inb = k < K
        # lanes past the row read m (exp(0), then dropped), so nothing overflows there
        s += tl.where(inb, tl.exp(tl.where(inb, _load(z_ptr, base + k, inb, ACC), m) - m), 0.0)
    return m, tl.log(tl.sum(s, axis=0))


@triton.jit
def _softmax(z_ptr, offs, inb, m, log_s, ACC: tl.constexpr):
    # p = exp((z - m) - log s) at offs (lanes past the row read m: a finite value, never stored)
    return tl.exp((tl.where(inb, _load(z_ptr, offs, inb, ACC), m) - m) - log_s)


@triton.jit
def _ce_forward_kernel(z_ptr, y_ptr, loss_ptr, cot_ptr, K, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # z_ptr: [N, K] contiguous logits; y_ptr: [N] int64 targets
    # loss_ptr: [N], cot_ptr: [N, K] contiguous, both the logits' dtype
    n = tl.program_id(0).to(tl.int64)
    base = n * K
    m, log_s = _row_lse(z_ptr, base, K, ACC, BLOCK)
    t = tl.load(y_ptr + n)
    ok = (t >= 0) & (t < K)
    zt = _load(z_ptr, base + t, ok, ACC)
    loss = log_s - (zt - m)
    _store(loss_ptr, n, _round_to(loss, loss_ptr.dtype.element_ty), True)
    offs = tl.arange(0, BLOCK)
    for start in range(0, K, BLOCK):
        k = start + offs
        inb = k < K
        p = _softmax(z_ptr, base + k, inb, m, log_s, ACC)
        c = tl.where(k == t, p - 1.0, p)
        _store(cot_ptr, base + k, _round_to(c, cot_ptr.dtype.element_ty), inb)


@triton.jit
def _ce_backward_kernel(ga_ptr, gb_ptr, z_ptr, y_ptr, out_ptr, K,
                        HAS_A: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # ga_ptr: [N] cotangent of the losses (HAS_A); gb_ptr: [N, K] contiguous cotangent of cot (HAS_B);
    # both already in the logits' dtype (any valid pointer when absent)
    # z_ptr: [N, K] contiguous logits; y_ptr: [N] int64; out_ptr: [N, K] contiguous, logits' dtype
    n = tl.program_id(0).to(tl.int64)
    base = n * K
    m, log_s = _row_lse(z_ptr, base, K, ACC, BLOCK)
    offs = tl.arange(0, BLOCK)
    if HAS_A:
        a = _load(ga_ptr, n, True, ACC)
    else:
        a = tl.zeros([], ACC)
    # grad = p (c + b) - a onehot with c = a - <p, b>
    c = a
    if HAS_B:
        dot = tl.zeros([BLOCK], ACC)
        for start in range(0, K, BLOCK):
            k = start + offs
            inb = k < K
            p = _softmax(z_ptr, base + k, inb, m, log_s, ACC)
            dot += tl.where(inb, p * _load(gb_ptr, base + k, inb, ACC), 0.0)
        c = a - tl.sum(dot, axis=0)
    t = tl.load(y_ptr + n)
    for start in range(0, K, BLOCK):
        k = start + offs
        inb = k < K
        p = _softmax(z_ptr, base + k, inb, m, log_s, ACC)
        if HAS_B:
            g = p * (c + _load(gb_ptr, base + k, inb, ACC))
        else:
            g = p * c
        g = tl.where(k == t, g - a, g)
        _store(out_ptr, base + k, _round_to(g, out_ptr.dtype.element_ty), inb)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _checked_target(logits, target, op):
    """The C++ op's argument checks (same messages); the range of the targets is checked on the device."""
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise RuntimeError(f"{op}: logits must have shape (N, K) with K >= 1, got {list(logits.shape)}")
    if not logits.is_floating_point():
        raise RuntimeError(f"{op}: logits must be floating point, got {logits.dtype}")
    N, K = logits.shape
    if target.dim() != 1 or target.shape[0] != N:
        raise RuntimeError(f"{op}: target must have shape [{N}], got {list(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool \
            or target.device != logits.device:
        raise RuntimeError(f"{op}: target must be an integer tensor on logits' device, got {target.dtype} "
                           f"on {target.device}")
    y = target.to(torch.int64).contiguous()
    if N:
        torch._assert_async(((y >= 0) & (y < K)).all(), f"{op}: a target is out of range [0, {K})")
    return y


def _launch_args(logits):
    K = logits.shape[1]
    block = min(triton.next_power_of_2(K), _MAX_BLOCK)
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    # one warp for a CIFAR / ImageNet-1k row, more for very wide rows
    return dict(ACC=acc, BLOCK=block, num_warps=max(1, min(8, block // 256)))


def cross_entropy_cotangent(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss [N], softmax(logits) - onehot(target))`` (see the module docstring)."""
    y = _checked_target(logits, target, "jsigr_fast::cross_entropy_cotangent")
    z = logits.contiguous()
    loss = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    cot = torch.empty_like(z, memory_format=torch.contiguous_format)
    if z.shape[0]:
        _ce_forward_kernel[(z.shape[0],)](z, y, loss, cot, z.shape[1], **_launch_args(z))
    return loss, cot


def cross_entropy_cotangent_backward(grad_loss: torch.Tensor | None, grad_cot: torch.Tensor | None,
                                     logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``a (p - onehot) + p * (b - <p, b>)``, ``a = grad_loss`` and ``b = grad_cot`` (None: zero)."""
    op = "jsigr_fast::cross_entropy_cotangent_backward"
    y = _checked_target(logits, target, op)
    N, K = logits.shape
    if grad_loss is not None and (grad_loss.dim() != 1 or grad_loss.shape[0] != N):
        raise RuntimeError(f"{op}: grad_loss must have shape [{N}], got {list(grad_loss.shape)}")
    if grad_cot is not None and grad_cot.shape != logits.shape:
        raise RuntimeError(f"{op}: grad_cot must have logits' shape {list(logits.shape)}, got {list(grad_cot.shape)}")
    z = logits.contiguous()
    # the cotangents in the logits' dtype first, as the C++ op does
    ga = None if grad_loss is None else grad_loss.to(z.dtype).contiguous()
    gb = None if grad_cot is None else grad_cot.to(z.dtype).contiguous()
    out = torch.empty_like(z, memory_format=torch.contiguous_format)
    if N:
        _ce_backward_kernel[(N,)](z if ga is None else ga, z if gb is None else gb, z, y, out, K,
                                  HAS_A=ga is not None, HAS_B=gb is not None, **_launch_args(z))
    return out
