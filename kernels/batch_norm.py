"""Triton kernels of train-mode batch norm and its first and second derivatives.

Same ops, semantics and formulas as the compiled ``jsigr_fast::batch_norm_train / _backward /
_double_backward`` (csrc/batch_norm*.cpp, csrc/cuda/batch_norm.cu; derivation in csrc/README.md):
a per-channel reduction kernel (one program per channel and split, fp32 accumulation — fp64 for
fp64 data), per-channel coefficients computed on the host in float64 from the sums ([C] tensors),
then one elementwise kernel. The launchers are plain eager functions, so they run on CUDA tensors
and, under ``TRITON_INTERPRET=1``, on CPU tensors (pytorch#152868); ``jsigr_fast.ops`` registers them
as the CUDA kernels of the ops when the extension was built without CUDA.

Layouts: contiguous ``(N, C, *)`` or channels-last (rows of C, also used for (N, C) and spatial 1x1),
like the C++ ops; anything else is copied to contiguous first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["batch_norm_train", "batch_norm_backward", "batch_norm_double_backward",
           "batch_norm_double_backward_from_grad_x"]

# reduction modes: which sums (K of them) over which inputs
_SUM_X, _DEV_X, _GY_SUMS, _DBW_SUMS, _DBW_GX_SUMS = 0, 1, 2, 3, 4
_K = {_SUM_X: 1, _DEV_X: 2, _GY_SUMS: 2, _DBW_SUMS: 5, _DBW_GX_SUMS: 3}
# apply modes
_APPLY_Y, _APPLY_GX, _APPLY_GX_NOGY, _APPLY_DBW, _APPLY_DBW_NOU, _APPLY_DBW_GX, _APPLY_DBW_GX_NOU = range(7)

_REDUCE_BLOCK = 1024
_APPLY_BLOCK = 1024


@triton.jit
def _channel_offsets(m, c, C, S, ROWS: tl.constexpr):
    # element m (in [0, N*S)) of channel c -> memory offset, int64
    m = m.to(tl.int64)
    if ROWS:
        return m * C + c
    n = m // S
    return (n * C + c) * S + (m - n * S)


@triton.jit
def _bn_reduce_kernel(a_ptr, b_ptr, c_ptr, shift_ptr, partial_ptr, M, C, S, SPLITS,
                      MODE: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr, ACC: tl.constexpr,
                      BLOCK: tl.constexpr):
    # a_ptr, b_ptr, c_ptr: the inputs, x-shaped (MODE 0/1: x; 2: gy, x; 3: u, gy, x; 4: u, gx, x); unused ones are
    #                      any valid pointer
    # shift_ptr: [C] opmath (MODE 1: the rounded mean; 2-4: mean)
    # partial_ptr: [SPLITS, K, C] float64
    c = tl.program_id(0)
    split = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    s0 = tl.zeros([BLOCK], dtype=ACC)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    s3 = tl.zeros([BLOCK], dtype=ACC)
    s4 = tl.zeros([BLOCK], dtype=ACC)
    k = 0.0
    if MODE != 0:
        k = tl.load(shift_ptr + c).to(ACC)
    for start in range(split * BLOCK, M, SPLITS * BLOCK):
        m = start + offs
        mask = m < M
        off = _channel_offsets(m, c, C, S, ROWS)
        if MODE == 0:
            x = tl.load(a_ptr + off, mask=mask, other=0.0).to(ACC)
            s0 += x
        elif MODE == 1:
            x = tl.load(a_ptr + off, mask=mask, other=0.0).to(ACC)
            d = tl.where(mask, x - k, 0.0)
            s0 += d
            s1 += d * d
        elif MODE == 2:
            gy = tl.load(a_ptr + off, mask=mask, other=0.0).to(ACC)
            x = tl.load(b_ptr + off, mask=mask, other=0.0).to(ACC)
            s0 += gy
            s1 += gy * (x - k)
        elif MODE == 3:
            u = tl.load(a_ptr + off, mask=mask, other=0.0).to(ACC)
            gy = tl.load(b_ptr + off, mask=mask, other=0.0).to(ACC)
            x = tl.load(c_ptr + off, mask=mask, other=0.0).to(ACC)
            xc = x - k
            s0 += u
            s1 += u * xc
            s2 += u * gy
            s3 += gy
            s4 += gy * xc
        else:  # (u, gx, x): Su, Su(x - mean), Sugx
            u = tl.load(a_ptr + off, mask=mask, other=0.0).to(ACC)
            gx = tl.load(b_ptr + off, mask=mask, other=0.0).to(ACC)
            x = tl.load(c_ptr + off, mask=mask, other=0.0).to(ACC)
            s0 += u
            s1 += u * (x - k)
            s2 += u * gx
    base = partial_ptr + split * K * C + c
    tl.store(base, tl.sum(s0, axis=0).to(tl.float64))
    if K > 1:
        tl.store(base + C, tl.sum(s1, axis=0).to(tl.float64))
    if K > 2:
        tl.store(base + 2 * C, tl.sum(s2, axis=0).to(tl.float64))
    if K > 3:
        tl.store(base + 3 * C, tl.sum(s3, axis=0).to(tl.float64))
        tl.store(base + 4 * C, tl.sum(s4, axis=0).to(tl.float64))


@triton.jit
def _bn_apply_kernel(a_ptr, b_ptr, c_ptr, out0_ptr, out1_ptr, k_ptr, TOTAL, C, S,
                     MODE: tl.constexpr, ROWS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # a/b/c_ptr: inputs, x-shaped, same layout (0: x; 1: gy, x; 2: x; 3: u, gy, x; 4: gy, x; 5: u, gx, x; 6: gx, x)
    # out0_ptr, out1_ptr: outputs, x-shaped (out1 only for MODE 3-6)
    # k_ptr: [NK, C] opmath coefficients (NK = 3, 4, 4, 6, 6, 8, 8)
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    mask = i < TOTAL
    if ROWS:
        c = i % C
    else:
        c = (i // S) % C
    k0 = tl.load(k_ptr + c, mask=mask, other=0.0).to(ACC)
    k1 = tl.load(k_ptr + C + c, mask=mask, other=0.0).to(ACC)
    k2 = tl.load(k_ptr + 2 * C + c, mask=mask, other=0.0).to(ACC)
    if MODE == 0:  # y = (x - k0) k1 + k2
        x = tl.load(a_ptr + i, mask=mask, other=0.0).to(ACC)
        tl.store(out0_ptr + i, ((x - k0) * k1 + k2).to(out0_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:  # grad_x = k0 gy + (x - k1) k2 + k3
        k3 = tl.load(k_ptr + 3 * C + c, mask=mask, other=0.0).to(ACC)
        gy = tl.load(a_ptr + i, mask=mask, other=0.0).to(ACC)
        x = tl.load(b_ptr + i, mask=mask, other=0.0).to(ACC)
        tl.store(out0_ptr + i, (gy * k0 + (x - k1) * k2 + k3).to(out0_ptr.dtype.element_ty), mask=mask)
    elif MODE == 2:  # grad_x without grad_y = (x - k1) k2 + k3
        k3 = tl.load(k_ptr + 3 * C + c, mask=mask, other=0.0).to(ACC)
        x = tl.load(a_ptr + i, mask=mask, other=0.0).to(ACC)
        tl.store(out0_ptr + i, ((x - k1) * k2 + k3).to(out0_ptr.dtype.element_ty), mask=mask)
    else:
        k3 = tl.load(k_ptr + 3 * C + c, mask=mask, other=0.0).to(ACC)
        k4 = tl.load(k_ptr + 4 * C + c, mask=mask, other=0.0).to(ACC)
        k5 = tl.load(k_ptr + 5 * C + c, mask=mask, other=0.0).to(ACC)
        if MODE == 3:  # d_gy = k0 u + (x - k1) k2 + k3, d_x = k4 gy + k5 u
            u = tl.load(a_ptr + i, mask=mask, other=0.0).to(ACC)
            gy = tl.load(b_ptr + i, mask=mask, other=0.0).to(ACC)
            x = tl.load(c_ptr + i, mask=mask, other=0.0).to(ACC)
            tl.store(out0_ptr + i, (u * k0 + (x - k1) * k2 + k3).to(out0_ptr.dtype.element_ty), mask=mask)
            tl.store(out1_ptr + i, (gy * k4 + u * k5).to(out1_ptr.dtype.element_ty), mask=mask)
        elif MODE == 4:  # d_gy = (x - k1) k2 + k3, d_x = k4 gy
            gy = tl.load(a_ptr + i, mask=mask, other=0.0).to(ACC)
            x = tl.load(b_ptr + i, mask=mask, other=0.0).to(ACC)
            tl.store(out0_ptr + i, ((x - k1) * k2 + k3).to(out0_ptr.dtype.element_ty), mask=mask)
            tl.store(out1_ptr + i, (gy * k4).to(out1_ptr.dtype.element_ty), mask=mask)
        else:  # from grad_x: d_gy = k0 u + (x - k1) k2 + k3, d_x = k4 gx + k5 u + (x - k1) k6 + k7
            k6 = tl.load(k_ptr + 6 * C + c, mask=mask, other=0.0).to(ACC)
            k7 = tl.load(k_ptr + 7 * C + c, mask=mask, other=0.0).to(ACC)
            if MODE == 5:
                u = tl.load(a_ptr + i, mask=mask, other=0.0).to(ACC)
                gx = tl.load(b_ptr + i, mask=mask, other=0.0).to(ACC)
                x = tl.load(c_ptr + i, mask=mask, other=0.0).to(ACC)
                xc = x - k1
                tl.store(out0_ptr + i, (u * k0 + xc * k2 + k3).to(out0_ptr.dtype.element_ty), mask=mask)
                tl.store(out1_ptr + i, (gx * k4 + u * k5 + xc * k6 + k7).to(out1_ptr.dtype.element_ty), mask=mask)
            else:
                gx = tl.load(a_ptr + i, mask=mask, other=0.0).to(ACC)
                x = tl.load(b_ptr + i, mask=mask, other=0.0).to(ACC)
                xc = x - k1
                tl.store(out0_ptr + i, (xc * k2 + k3).to(out0_ptr.dtype.element_ty), mask=mask)
                tl.store(out1_ptr + i, (gx * k4 + xc * k6 + k7).to(out1_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(x):
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class _Layout:
    def __init__(self, x):
        if x.dim() < 2 or x.numel() == 0 or not x.is_floating_point():
            raise ValueError(f"batch norm needs a non-empty floating (N, C, *) tensor, got {x.dtype} {tuple(x.shape)}")
        self.fmt = _memory_format(x)
        self.N, self.C = x.shape[0], x.shape[1]
        self.S = x[0, 0].numel()
        self.M = self.N * self.S
        self.rows = self.fmt != torch.contiguous_format or self.S == 1
        self.acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        self.opmath = _opmath(x.dtype)

    def canon(self, t):
        return t.contiguous(memory_format=self.fmt)

    def empty(self, x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=self.fmt)


def _channel(t, like, fill, L):
    if t is None:
        return torch.full((L.C,), fill, dtype=torch.float64, device=like.device)
    if t.shape != (L.C,):
        raise ValueError(f"expected a [{L.C}] tensor, got {tuple(t.shape)}")
    return t.to(torch.float64)


def _reduce(L, mode, inputs, shift):
    """[K, C] float64 sums (over the splits) of the reduction `mode` of `inputs`."""
    k = _K[mode]
    splits = max(1, min(triton.cdiv(L.M, _REDUCE_BLOCK * 4), max(1, 1024 // L.C)))
    partial = torch.empty((splits, k, L.C), dtype=torch.float64, device=inputs[0].device)
    a, b, c = (list(inputs) + [inputs[0]] * 3)[:3]
    if shift is None:
        shift = partial  # never read when mode == _SUM_X
    _bn_reduce_kernel[(L.C, splits)](a, b, c, shift, partial, L.M, L.C, L.S, splits, MODE=mode, K=k, ROWS=L.rows,
                                     ACC=L.acc, BLOCK=_REDUCE_BLOCK)
    return partial.sum(0)


def _apply(L, mode, inputs, outputs, coef):
    total = L.N * L.C * L.S
    a, b, c = (list(inputs) + [inputs[0]] * 3)[:3]
    o0, o1 = (list(outputs) + [outputs[0]])[:2]
    k = torch.stack(coef).to(L.opmath).contiguous()
    _bn_apply_kernel[(triton.cdiv(total, _APPLY_BLOCK),)](a, b, c, o0, o1, k, total, L.C, L.S, MODE=mode,
                                                            ROWS=L.rows, ACC=L.acc, BLOCK=_APPLY_BLOCK)


def batch_norm_train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train-mode batch norm: ``(y, mean, invstd)`` as ``jsigr_fast::batch_norm_train``.

    Args:
        x: ``(N, C, *)`` floating tensor (contiguous or channels-last; other strides are copied).
        weight, bias: ``[C]`` or None.
        eps: added to the biased variance.
    Returns:
        ``y`` (x's dtype and layout), ``mean`` and ``invstd`` (``[C]``, float32; float64 for float64 x).
    """
    L = _Layout(x)
    x = L.canon(x)
    w, b = _channel(weight, x, 1.0, L), _channel(bias, x, 0.0, L)
    m = float(L.M)
    shift = (_reduce(L, _SUM_X, [x], None)[0] / m).to(L.opmath)
    d1, d2 = _reduce(L, _DEV_X, [x], shift)
    d = d1 / m
    var = (d2 / m - d * d).clamp_min(0)
    mean = shift.double() + d
    invstd = (var + eps).rsqrt()
    y = L.empty(x)
    _apply(L, _APPLY_Y, [x], [y], [mean, w * invstd.to(L.opmath).double(), b])
    return y, mean.to(L.opmath), invstd.to(L.opmath)


def batch_norm_backward(grad_y, x, weight, mean, invstd, grad_mean=None, grad_invstd=None):
    """``(grad_x, grad_weight, grad_bias)`` as ``jsigr_fast::batch_norm_backward`` (grad_y may be None)."""
    L = _Layout(x)
    x = L.canon(x)
    m = float(L.M)
    w = _channel(weight, x, 1.0, L)
    s, mu = invstd.double(), mean.to(L.opmath)
    p, q = _channel(grad_mean, x, 0.0, L), _channel(grad_invstd, x, 0.0, L)
    if grad_y is not None:
        gy = L.canon(grad_y)
        a, b1 = _reduce(L, _GY_SUMS, [gy, x], mu)
    else:
        a = b1 = torch.zeros(L.C, dtype=torch.float64, device=x.device)
    b = s * b1
    coef = [w * s, mu.double(), s * (-w * s * b - q * s * s) / m, (p - w * s * a) / m]
    gx = L.empty(x)
    if grad_y is not None:
        _apply(L, _APPLY_GX, [gy, x], [gx], coef)
    else:
        _apply(L, _APPLY_GX_NOGY, [x], [gx], coef)
    return gx, b.to(L.opmath), a.to(L.opmath)


def batch_norm_double_backward(gg_x, gg_weight, gg_bias, grad_y, x, weight, mean, invstd, grad_mean=None,
                               grad_invstd=None):
    """The 7 gradients of ``jsigr_fast::batch_norm_double_backward`` (csrc/README.md)."""
    return _double_backward(gg_x, gg_weight, gg_bias, grad_y, None, x, weight, mean, invstd, grad_mean, grad_invstd)


def batch_norm_double_backward_from_grad_x(gg_x, gg_weight, gg_bias, grad_x, grad_weight, grad_bias, x, weight, mean,
                                           invstd, grad_mean=None, grad_invstd=None):
    """``jsigr_fast::batch_norm_double_backward_from_grad_x``: the same 7 gradients given the backward's outputs
    ``(grad_x, grad_weight, grad_bias)`` instead of its grad_y (never formed; csrc/batch_norm_kernels.h)."""
    return _double_backward(gg_x, gg_weight, gg_bias, grad_x, (grad_weight, grad_bias), x, weight, mean, invstd,
                            grad_mean, grad_invstd)


def _double_backward(gg_x, gg_weight, gg_bias, grad, rebuild, x, weight, mean, invstd, grad_mean, grad_invstd):
    # grad: grad_y, or with rebuild = (grad_weight, grad_bias) the backward's grad_x
    L = _Layout(x)
    x, g = L.canon(x), L.canon(grad)
    m = float(L.M)
    w = _channel(weight, x, 1.0, L)
    s, mu = invstd.double(), mean.to(L.opmath)
    al, be = _channel(gg_weight, x, 0.0, L), _channel(gg_bias, x, 0.0, L)
    q = _channel(grad_invstd, x, 0.0, L)
    u = None if gg_x is None else L.canon(gg_x)
    zeros = torch.zeros(L.C, dtype=torch.float64, device=x.device)
    if rebuild is not None:
        # grad_y = ra gx + rb (x - mean) + rc: the backward solved for its input
        b, a = (t.double() for t in rebuild)
        b1 = b / s
        p = _channel(grad_mean, x, 0.0, L)
        ra, rb, rc = 1 / (w * s), s * b / m + q * s * s / (w * m), a / m - p / (w * s * m)
        su, sux1, sugx = _reduce(L, _DBW_GX_SUMS, [u, g, x], mu) if u is not None else (zeros,) * 3
        sugy = ra * sugx + rb * sux1 + rc * su
    elif u is not None:
        su, sux1, sugy, a, b1 = _reduce(L, _DBW_SUMS, [u, g, x], mu)
    else:
        a, b1 = _reduce(L, _GY_SUMS, [g, x], mu)
        su = sux1 = sugy = zeros
    sux, b = s * sux1, s * b1
    e = sugy - a * su / m - b * sux / m
    sum_h = al * a - w * s * (a * sux + b * su) / m - q * s * s * su / m
    chan = [s * e, -s * sum_h, w * e - 3 * q * s * sux / m - 2 * w * b * sux / m + al * b1, su / m, -s * s * sux / m]
    f1 = s * al - w * s * s * sux / m
    coef = [w * s, mu.double(), s * (al - w * s * sux / m), be - w * s * su / m, f1, -(w * s * s * b + q * s ** 3) / m]
    if rebuild is not None:
        coef[4:] = [f1 * ra, coef[5], f1 * rb, f1 * rc]
    d_gy, d_x = L.empty(x), L.empty(x)
    if rebuild is not None:
        mode = _APPLY_DBW_GX if u is not None else _APPLY_DBW_GX_NOU
    else:
        mode = _APPLY_DBW if u is not None else _APPLY_DBW_NOU
    _apply(L, mode, [u, g, x] if u is not None else [g, x], [d_gy, d_x], coef)
    d_w, d_mean, d_invstd, d_gm, d_gs = (t.to(L.opmath) for t in chan)
    return d_gy, d_x, d_w, d_mean, d_invstd, d_gm, d_gs
