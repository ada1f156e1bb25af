"""Triton kernels of J-SIGR's selective mask and of the bool-masked squared norm.

Same ops and contracts as the compiled ``jsigr_fast::gradient_saliency_mask / threshold_mask /
adaptor_saliency_mask / masked_sq_norm_bool / masked_sq_norm_bool_backward`` (schemas in
csrc/ops.cpp, CPU kernels in csrc/saliency_mask.cpp + csrc/sample_ops_kernels.h, CUDA kernels in
csrc/cuda/saliency_mask.cu).
The launchers are plain eager functions, so they run on CUDA tensors and, under
``TRITON_INTERPRET=1``, on CPU tensors; ``jsigr_fast.ops`` can register each of them as the CUDA
kernel of its op (``torch.library.register_kernel("jsigr_fast::<name>", "cuda", fn)``).

Layout. A per-sample op only needs each sample's D features to be one contiguous block, in any
order: contiguous and channels-last(3d) tensors are used as they are ("sample-major", element
``n * D + d``), outputs take the input's memory format; any other layout is copied to contiguous.

Structure (why two passes and a flat grid rather than one program per sample): a program per
sample looping over D serialises a 150528-feature ImageNet sample on one SM and leaves most of the
GPU idle for small batches, and a per-sample max must be known before the first comparison. So
the gradient mask is

  1. ``_abs_max_kernel``: grid (N, SPLITS), each program the max over a strided slice of a sample,
     one partial per (sample, split) in an [N, SPLITS] workspace (no atomics: deterministic, and
     the interpreter runs it too); the host takes ``amax`` over the splits (a tiny [N, SPLITS] op);
  2. ``_mask_kernel``: one flat elementwise pass over the N*D elements, sample ``n = i // D``,
     recomputing ``M`` from ``g`` and the peak (M is never stored) and writing one byte per feature.

Exactness (bit-identical to ``selective_mask(gradient_saliency(g), ...) != 0``):

* the max is taken on the IEEE bit patterns of ``|g|`` as integers (sign bit cleared): for
  non-negative floats the integer order is the float order, and every NaN pattern is above +inf,
  so the max propagates NaN like ``torch.amax`` whatever Triton's float max does with NaN;
  ``peak = max.clamp_min(tiny)`` (NaN kept), ``tiny = finfo(g.dtype).tiny``;
* ``M = |g| / peak`` is one IEEE division: ``tl.math.div_rn`` for float32 accumulators (Triton's
  plain ``/`` on fp32 may lower to an approximate ``div.full.f32``), ``/`` for float64; for
  bfloat16 / half it is computed in float32 and rounded to the dtype (round-to-nearest-even), as
  ATen does — never a multiplication by ``1 / peak``;
* ``beta`` is rounded to the dtype by torch's float64 -> dtype cast (the conversion ``M <= beta``
  applies to a Python float: for bfloat16 / half through float32, out-of-range values to inf),
  then compared in the accumulator type.

Quantile rule (the ``k = D - quantile_kept(q, D)`` least salient features, ``quantile_kept`` being
selective_mask's exact ``floor(q D)``, jsigr_fast.saliency; ``k <= 0``: all False, ``k >= D``: all
True). A k-th-smallest selection per sample is a sort or a radix select, which has no good
Triton form for D up to 150528, so the threshold ``t_n`` is computed with ``torch.kthvalue`` — the
function the reference itself uses, hence the same NaN ordering (NaN last) and ties — on the
per-sample ``M``: for ``threshold_mask`` that is the input; for ``gradient_saliency_mask`` the same
``_mask_kernel`` first writes ``M`` (rounded to the dtype: the reference's values exactly) into an
[N, D] buffer. Then ``_mask_kernel`` compares with the per-sample ``t_n``. Costs one extra write
and two reads of an [N, D] buffer of g's dtype, and a kthvalue per sample.

Adaptor mask (``tanh(conv1x1(g / rms(g)) + b)``, then the rule; a :class:`jsigr_fast.SaliencyAdaptor`
without its graph). ``rms`` per sample from ``_sq_norm_kernel`` without a mask (the same partial
sums), rounded on the host in g's dtype step by step as the reference computes it
(``sqrt(mean(g^2) + tiny)``); then ``_adaptor_kernel``, one flat pass over the N*D outputs in NCHW
order: output ``(n, o, s)`` reads the C inputs ``g[n, c, s]`` (through channel / spatial strides, so
a channels-last g is read in place), each divided by rms and rounded to the dtype, sums
``b_o + sum_c W_oc x_c`` in the accumulator type and applies tanh. M is never stored for the beta
rule; the quantile rule writes it (contiguous, g's dtype) for ``torch.kthvalue`` as above. The mask is
contiguous whatever g's layout, like the CPU op's. Not bit-identical to the reference (ATen's conv
sums in its own order, and tanh here is ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` — one formula
that runs the same in the interpreter, which has no libdevice, and on the GPU; absolute error a few
units of the dtype's rounding): features whose M lies within rounding of the threshold may differ.

Norm: ``_sq_norm_kernel``, grid (N, SPLITS), fp32 partial sums (fp64 for fp64 data) per program,
summed over the splits in float64 on the host, cast to g's dtype. Backward: one flat elementwise
pass, ``[mask] (2 grad_out[n]) g`` in the accumulator type (grad_out first cast to g's dtype, as
the C++ op does), rounded once to g's dtype.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..saliency import quantile_kept
from ._dtype import _load, _round_to, _store

__all__ = ["gradient_saliency_mask", "threshold_mask", "adaptor_saliency_mask", "masked_sq_norm_bool",
           "masked_sq_norm_bool_backward"]

_REDUCE_BLOCK = 1024
_APPLY_BLOCK = 1024

# _mask_kernel modes
_GRAD_MASK, _GRAD_WRITE_M, _THRESH_MASK = 0, 1, 2


@triton.jit
def _abs_key(x_ptr, offs, inb, ACC: tl.constexpr):
    # |x| as the integer of its IEEE bits in ACC (sign bit cleared): integer order == float order,
    # NaN > +inf. Out-of-range lanes give 0 (the key of +0).
    x = _load(x_ptr, offs, inb, ACC)
    if ACC == tl.float64:
        return x.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _abs_max_kernel(g_ptr, part_ptr, D, SPLITS, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # g_ptr: [N, D] sample-major data (g's dtype)
    # part_ptr: [N, SPLITS] int32 (int64 for float64 g): the bit keys of max |g| over each slice
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    if ACC == tl.float64:
        best = tl.zeros([BLOCK], dtype=tl.int64)
    else:
        best = tl.zeros([BLOCK], dtype=tl.int32)
    base = n * D
    for start in range(split * BLOCK, D, SPLITS * BLOCK):
        d = start + offs
        inb = d < D
        best = tl.maximum(best, _abs_key(g_ptr, base + d, inb, ACC))
    tl.store(part_ptr + n * SPLITS + split, tl.max(best, axis=0))


@triton.jit
def _mask_kernel(src_ptr, peak_ptr, thr_ptr, out_ptr, TOTAL, D,
                 MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # src_ptr: [N, D] sample-major, the data's dtype: g (MODE 0, 1) or the saliency M (MODE 2)
    # peak_ptr: [N] ACC, max(max_d |g|, tiny) (MODE 0, 1; any valid pointer for MODE 2)
    # thr_ptr: [N] ACC, the per-sample threshold (beta rounded to the dtype, or t_n) (MODE 0, 2)
    # out_ptr: [N, D] uint8 (a bool tensor's bytes) for MODE 0, 2; the data's dtype (M) for MODE 1
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inb = i < TOTAL
    n = i // D
    x = _load(src_ptr, i, inb, ACC)
    if MODE == 2:  # _THRESH_MASK (jit code sees no non-constexpr globals)
        m = x
    else:
        a = tl.abs(x)
        peak = tl.load(peak_ptr + n, mask=inb, other=1.0)
        if ACC == tl.float64:
            q = a / peak  # div.rn.f64
        else:
            q = tl.math.div_rn(a, peak)  # IEEE round-to-nearest, never the approximate fp32 division
        # rounded to the data's dtype (identity for float32 / float64), kept in ACC: exact
        m = _round_to(q, src_ptr.dtype.element_ty)
    if MODE == 1:  # _GRAD_WRITE_M
        _store(out_ptr, i, m, inb)
    else:
        t = tl.load(thr_ptr + n, mask=inb, other=0.0)
        tl.store(out_ptr + i, (m <= t).to(tl.uint8), mask=inb)


@triton.jit
def _sq_norm_kernel(g_ptr, m_ptr, part_ptr, D, SPLITS, ACC: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_MASK: tl.constexpr = True):
    # g_ptr: [N, D] sample-major (g's dtype); m_ptr: [N, D] uint8 (the bool mask's bytes, same layout)
    # part_ptr: [N, SPLITS] float64: sum over a slice of [mask] g^2 (accumulated in ACC)
    # HAS_MASK False: the plain sum of g^2 (the adaptor's rms; m_ptr unused)
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC)
    base = n * D
    for start in range(split * BLOCK, D, SPLITS * BLOCK):
        d = start + offs
        inb = d < D
        g = _load(g_ptr, base + d, inb, ACC)
        if HAS_MASK:
            sel = tl.load(m_ptr + base + d, mask=inb, other=0) != 0
            g = tl.where(sel, g, 0.0)  # exact select: a masked-out NaN / inf does not leak into the sum
        acc += g * g
    tl.store(part_ptr + n * SPLITS + split, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _sq_norm_backward_kernel(go_ptr, g_ptr, m_ptr, out_ptr, TOTAL, D, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # go_ptr: [N] (g's dtype); g_ptr, out_ptr: [N, D] sample-major (g's dtype); m_ptr: [N, D] uint8
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inb = i < TOTAL
    n = i // D
    scale = 2.0 * _load(go_ptr, n, inb, ACC)
    g = _load(g_ptr, i, inb, ACC)
    sel = tl.load(m_ptr + i, mask=inb, other=0) != 0
    _store(out_ptr, i, _round_to(tl.where(sel, scale * g, 0.0), out_ptr.dtype.element_ty), inb)


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1]: no overflow, NaN kept, +-inf -> +-1;
    # 1 - e is exact for e >= 1/2 (Sterbenz), so the absolute error is a few units of x's type. Where
    # tanh(x) rounds to x itself (|x| < 2^-12 in float32, 2^-27 in float64: x^3 / 3 < half an ulp of x)
    # x is returned, so tiny values and the sign of zero stay exact.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    if x.dtype == tl.float64:
        t = (1.0 - e) / (1.0 + e)
        small = a < 7.450580596923828e-09  # 2^-27
    else:
        t = tl.math.div_rn(1.0 - e, 1.0 + e)
        small = a < 0.000244140625  # 2^-12
    return tl.where(small, x, tl.where(x < 0, -t, t))


@triton.jit
def _adaptor_kernel(g_ptr, rms_ptr, w_ptr, b_ptr, thr_ptr, out_ptr, TOTAL, D, S, C, SC, SS,
                    MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # g_ptr: (N, C, S) data (g's dtype), element (n, c, s) at n * D + c * SC + s * SS
    # rms_ptr: [N] ACC (ones without normalisation); w_ptr: [C, C] ACC; b_ptr: [C] ACC
    # thr_ptr: [N] ACC thresholds (MODE 0); out_ptr: [N, D] contiguous, uint8 mask (MODE 0) or
    # M in g's dtype (MODE 1 = _GRAD_WRITE_M)
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inb = i < TOTAL
    n = i // D
    r = i - n * D
    o = r // S
    s = r - o * S
    rms = tl.load(rms_ptr + n, mask=inb, other=1.0)
    pre = tl.load(b_ptr + o, mask=inb, other=0.0)
    src = n * D + s * SS
    for c in range(C):
        x = _load(g_ptr, src + c * SC, inb, ACC)
        if ACC == tl.float64:
            x = x / rms
        else:
            x = tl.math.div_rn(x, rms)
        x = _round_to(x, g_ptr.dtype.element_ty)  # the reference divides in g's dtype
        pre += tl.load(w_ptr + o * C + c, mask=inb, other=0.0) * x
    m = _round_to(_tanh(pre), g_ptr.dtype.element_ty)
    if MODE == 1:  # _GRAD_WRITE_M
        _store(out_ptr, i, m, inb)
    else:
        t = tl.load(thr_ptr + n, mask=inb, other=0.0)
        tl.store(out_ptr + i, (m <= t).to(tl.uint8), mask=inb)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _acc(dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _sample_major_format(t):
    # csrc/saliency_mask.cpp's sample_major_format and jsigr_fast.ops._sample_major_format
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class _Rows:
    """``t`` as N rows of D contiguous features (sample-major), and helpers for outputs."""

    def __init__(self, t, name, op):
        if t.dim() < 1:
            raise RuntimeError(f"{op}: {name} must have a batch dimension, got a 0-d tensor")
        if not t.is_floating_point():
            raise RuntimeError(f"{op}: {name} must be floating point, got {t.dtype}")
        self.fmt = _sample_major_format(t)
        self.t = t.contiguous(memory_format=self.fmt)
        self.N = t.shape[0]
        self.D = t.numel() // self.N if self.N else 0
        self.total = self.N * self.D
        self.acc, self.acc_dtype = _acc(t.dtype)

    def empty(self, dtype, fmt=None):
        return torch.empty(self.t.shape, dtype=dtype, device=self.t.device,
                           memory_format=self.fmt if fmt is None else fmt)

    def flat(self, x):
        """[N, D] view of a sample-major tensor with this layout (element n * D + d)."""
        return x.as_strided((self.N, self.D), (self.D, 1))

    def canon(self, x):
        return x.contiguous(memory_format=self.fmt)

    def splits(self):
        # enough programs to fill a GPU when N is small; each still covers >= 4 blocks
        return max(1, min(triton.cdiv(self.D, _REDUCE_BLOCK * 4), max(1, 2048 // max(self.N, 1))))


def _rule_k(quantile, D, op):
    q = float(quantile)
    if not (q == q and 0.0 <= q <= 1.0):
        raise RuntimeError(f"{op}: quantile must be in [0, 1], got {q}")
    # features penalised per sample: the count of selective_mask itself (and of the C++ ops' twin,
    # csrc/quantile_rule.h), not D - int(q * D), which float rounding of q * D can leave one short
    return D - quantile_kept(q, D)


def _beta_thresholds(R, beta):
    # beta rounded to the dtype as `M <= beta` rounds a Python float: a cast from float64 (for
    # bfloat16 / half via float32, like c10's conversions; out-of-range values become +-inf, where
    # torch.full(..., dtype=half) would raise), then held in the accumulator type
    full = torch.full((R.N,), float(beta), dtype=torch.float64, device=R.t.device)
    return full.to(R.t.dtype).to(R.acc_dtype)


def _compare(R, src, mode, peak, thr, out):
    grid = (triton.cdiv(R.total, _APPLY_BLOCK),)
    _mask_kernel[grid](src, peak, thr, out, R.total, R.D, MODE=mode, ACC=R.acc, BLOCK=_APPLY_BLOCK)


def _peak(R):
    """[N] accumulator-type ``max(max_d |g|, tiny)``, NaN when the sample has a NaN."""
    splits = R.splits()
    key = torch.int64 if R.acc_dtype == torch.float64 else torch.int32
    part = torch.empty((R.N, splits), dtype=key, device=R.t.device)
    _abs_max_kernel[(R.N, splits)](R.t, part, R.D, splits, ACC=R.acc, BLOCK=_REDUCE_BLOCK)
    peak = part.amax(dim=1).view(R.acc_dtype)
    return peak.clamp_min(torch.finfo(R.t.dtype).tiny)  # clamp_min keeps NaN, as in gradient_saliency


def _on_data_device(fn):
    """Launch on the device of the first tensor argument (Triton launches on the current CUDA
    device, which need not be the data's); a no-op for CPU tensors (the interpreter)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        ctx = torch.cuda.device(t.device) if t is not None and t.is_cuda else contextlib.nullcontext()
        with ctx:
            return fn(*args, **kwargs)

    return wrapper


def _mask_by_rule(R, op, beta, quantile, m_source):
    """The bool mask of R's shape. ``m_source(need_m)`` gives ``(src, mode, peak, M)``: the compare
    kernel's source tensor, mode and peak, and (need_m, the quantile rule) the sample-major tensor of M
    whose per-sample k-th smallest values are the thresholds."""
    mask = R.empty(torch.bool)
    if R.total == 0:
        return mask
    if quantile is None:
        src, mode, peak, _ = m_source(need_m=False)
        thr = _beta_thresholds(R, beta)
    else:
        k = _rule_k(quantile, R.D, op)
        if k <= 0 or k >= R.D:
            return mask.fill_(k > 0)
        src, mode, peak, M = m_source(need_m=True)
        thr = R.flat(M).kthvalue(k, dim=1).values.to(R.acc_dtype)
    _compare(R, src, mode, peak, thr, mask.view(torch.uint8))
    return mask


@_on_data_device
def gradient_saliency_mask(g: torch.Tensor, beta: float, quantile: float | None = None) -> torch.Tensor:
    """``jsigr_fast::gradient_saliency_mask``: ``M = |g| / max(max_d |g|, tiny)`` per sample, then
    ``M <= beta`` (beta rounded to g's dtype) or, with ``quantile=q``, ``M <= t_n`` with ``t_n`` the
    ``k``-th smallest M of sample n, ``k = D - floor(q D)``. Bool tensor of g's shape (and of its
    memory format when contiguous or channels-last); bit-identical to
    ``selective_mask(gradient_saliency(g), beta=beta, quantile=quantile) != 0``."""
    op = "jsigr_fast::gradient_saliency_mask"
    R = _Rows(g, "g", op)
    if quantile is not None:
        _rule_k(quantile, R.D, op)  # argument check first, as the C++ op

    def source(need_m):
        peak = _peak(R)
        if not need_m:
            return R.t, _GRAD_MASK, peak, None
        M = R.empty(R.t.dtype)
        _compare(R, R.t, _GRAD_WRITE_M, peak, peak, M)  # writes M, the reference's values exactly
        return M, _THRESH_MASK, peak, M

    return _mask_by_rule(R, op, beta, quantile, source)


@_on_data_device
def threshold_mask(saliency: torch.Tensor, beta: float, quantile: float | None = None) -> torch.Tensor:
    """``jsigr_fast::threshold_mask``: the rule of :func:`gradient_saliency_mask` on a given map M,
    bit-identical to ``selective_mask(M, beta=beta, quantile=quantile) != 0``."""
    op = "jsigr_fast::threshold_mask"
    R = _Rows(saliency, "saliency", op)
    if quantile is not None:
        _rule_k(quantile, R.D, op)

    def source(need_m):
        return R.t, _THRESH_MASK, R.t, R.t  # peak unused in this mode: any valid pointer

    return _mask_by_rule(R, op, beta, quantile, source)


def _adaptor_params(R, g, weight, bias, op):
    """(C, S, [C, C] weight, [C] bias) in the accumulator type, checked as the C++ op checks them."""
    if g.dim() < 2:
        raise RuntimeError(f"{op}: g must have shape (N, C, *) or (N, D), got {list(g.shape)}")
    C = 1 if g.dim() == 2 else g.shape[1]  # SaliencyAdaptor: (N, D) inputs are one channel
    S = R.D // C if C else 0
    w = weight
    square = w.dim() >= 2 and w.shape[0] == C and w.shape[1] == C
    if not (square and (w.dim() == 2 or (w.dim() == 4 and w.shape[2] == 1 and w.shape[3] == 1))):
        raise RuntimeError(f"{op}: weight must be a 1x1 convolution's [C, C, 1, 1] (or [C, C]) with C = {C}, "
                           f"got {list(w.shape)}")
    if w.device != g.device or not w.is_floating_point():
        raise RuntimeError(f"{op}: weight must be a floating tensor on g's device")
    if bias is None:
        b = torch.zeros(C, dtype=R.acc_dtype, device=g.device)
    else:
        if not (bias.dim() == 1 and bias.numel() == C and bias.device == g.device and bias.is_floating_point()):
            raise RuntimeError(f"{op}: bias must be a floating [{C}] tensor on g's device, got {list(bias.shape)}")
        b = bias.to(R.acc_dtype).contiguous()
    return C, S, w.reshape(C, C).to(R.acc_dtype).contiguous(), b


def _rms(R):
    """[N] accumulator-type ``sqrt(mean(g^2) + tiny)`` per sample, rounded in g's dtype at each step as
    the reference (``g.pow(2).mean() + tiny``, then ``sqrt``) and the C++ kernel round it."""
    splits = R.splits()
    part = torch.empty((R.N, splits), dtype=torch.float64, device=R.t.device)
    _sq_norm_kernel[(R.N, splits)](R.t, R.t, part, R.D, splits, ACC=R.acc, BLOCK=_REDUCE_BLOCK, HAS_MASK=False)
    ms = (part.sum(dim=1) / R.D).to(R.t.dtype)
    return (ms + torch.finfo(R.t.dtype).tiny).sqrt().to(R.acc_dtype)


@_on_data_device
def adaptor_saliency_mask(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, beta: float,
                          quantile: float | None = None, normalize: bool = True) -> torch.Tensor:
    """``jsigr_fast::adaptor_saliency_mask``: ``M = tanh(conv1x1(g / rms(g)) + b)`` (``rms`` per sample
    when ``normalize``; ``(N, D)`` inputs are one channel), then the rule of :func:`threshold_mask`.
    Contiguous bool mask of g's shape. Agrees with the reference except at features whose M lies
    within rounding of the threshold (another summation order, another tanh)."""
    op = "jsigr_fast::adaptor_saliency_mask"
    R = _Rows(g, "g", op)
    k = None if quantile is None else _rule_k(quantile, R.D, op)
    C, S, W, b = _adaptor_params(R, g, weight, bias, op)
    mask = R.empty(torch.bool, torch.contiguous_format)
    if R.total == 0:
        return mask
    if k is not None and (k <= 0 or k >= R.D):
        return mask.fill_(k > 0)
    # channel / spatial strides of the (N, C, S) data: NCHW, or channels-last(3d) read in place
    SC, SS = (S, 1) if R.fmt == torch.contiguous_format else (1, C)
    rms = _rms(R) if normalize else torch.ones(R.N, dtype=R.acc_dtype, device=g.device)
    grid = (triton.cdiv(R.total, _APPLY_BLOCK),)

    def launch(thr, out, mode):
        _adaptor_kernel[grid](R.t, rms, W, b, thr, out, R.total, R.D, S, C, SC, SS,
                              MODE=mode, ACC=R.acc, BLOCK=_APPLY_BLOCK)

    if k is None:
        launch(_beta_thresholds(R, beta), mask.view(torch.uint8), _GRAD_MASK)
        return mask
    M = R.empty(R.t.dtype, torch.contiguous_format)
    launch(rms, M, _GRAD_WRITE_M)  # thr unused in this mode: any valid pointer
    thr = R.flat(M).kthvalue(k, dim=1).values.to(R.acc_dtype)
    _compare(R, M, _THRESH_MASK, M, thr, mask.view(torch.uint8))
    return mask


def _check_mask(mask, R, op):
    if mask.dtype != torch.bool:
        raise RuntimeError(f"{op}: mask must be bool, got {mask.dtype}")
    if mask.shape != R.t.shape:
        raise RuntimeError(f"{op}: mask must have g's shape {tuple(R.t.shape)}, got {tuple(mask.shape)}")
    if mask.device != R.t.device:
        raise RuntimeError(f"{op}: mask and g must be on the same device")
    return R.canon(mask).view(torch.uint8)


@_on_data_device
def masked_sq_norm_bool(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``jsigr_fast::masked_sq_norm_bool``: ``out[n] = sum_d [mask[n, d]] g[n, d]^2``, shape [N], g's dtype
    (fp32 partial sums — fp64 for fp64 g — added in fp64 across the slices of a sample)."""
    op = "jsigr_fast::masked_sq_norm_bool"
    R = _Rows(g, "g", op)
    m = _check_mask(mask, R, op)
    if R.total == 0:
        return torch.zeros((R.N,), dtype=g.dtype, device=g.device)
    splits = R.splits()
    part = torch.empty((R.N, splits), dtype=torch.float64, device=g.device)
    _sq_norm_kernel[(R.N, splits)](R.t, m, part, R.D, splits, ACC=R.acc, BLOCK=_REDUCE_BLOCK)
    return part.sum(dim=1).to(g.dtype)


@_on_data_device
def masked_sq_norm_bool_backward(grad_out: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``jsigr_fast::masked_sq_norm_bool_backward``: ``grad_g = [mask] (2 grad_out[n]) g``, g's shape,
    dtype and (sample-major) memory format."""
    op = "jsigr_fast::masked_sq_norm_bool_backward"
    R = _Rows(g, "g", op)
    m = _check_mask(mask, R, op)
    if grad_out.dim() != 1 or grad_out.shape[0] != R.N:
        raise RuntimeError(f"{op}: grad_out must have shape [{R.N}], got {tuple(grad_out.shape)}")
    if grad_out.device != g.device:
        raise RuntimeError(f"{op}: grad_out and g must be on the same device")
    go = grad_out.to(g.dtype).contiguous()
    out = R.empty(g.dtype)
    if R.total == 0:
        return out
    grid = (triton.cdiv(R.total, _APPLY_BLOCK),)
    _sq_norm_backward_kernel[grid](go, R.t, m, out, R.total, R.D, ACC=R.acc, BLOCK=_APPLY_BLOCK)
    return out
