"""Independent oracles of the selective-mask ops, shared by tests/test_mask_ops.py (the C++ / CUDA
ops) and tests/test_triton_mask.py (the Triton kernels): written from the definitions in float64 numpy,
never from the library.

* the rule (``M <= beta`` with beta rounded to the dtype, or the ``k = D - kept`` smallest values of
  each sample, ties at the k-th included) is a per-sample numpy loop with a sort; ``kept`` (the
  features left unpenalised) is the largest ``j`` in ``[0, D]`` with ``j / D <= q`` (Python's correctly
  rounded division), found by trying every ``j`` — not ``floor(q * D)``, whose rounded product falls
  just below an integer for many decimal ``q`` (0.29 * 100 = 28.999999999999996);
* the count of the quantile rule is also checked against exact rationals (``QUANTILE_COUNT_CASES``:
  ``q`` as the user meant it, e.g. ``Fraction("0.29")``, and ``floor(q D)`` in ``fractions.Fraction``);
* the adaptor's ``tanh(conv1x1(g / rms(g)) + b)`` is a float64 numpy einsum, and a finite-precision
  evaluation of it may disagree with the oracle's mask only at features within rounding of the threshold
  (``check_near_threshold``).
"""
import math
from fractions import Fraction

import numpy as np
import torch

# smallest positive normal number of each dtype (the clamp of the peak), written out independently
TINY = {torch.float64: 2.0 ** -1022, torch.float32: 2.0 ** -126, torch.bfloat16: 2.0 ** -126,
        torch.float16: 2.0 ** -14}
# unit roundoff (half an ulp at 1)
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _round(x, dtype):
    """float64 numpy values rounded to dtype (returned as float64)."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == torch.float64:
        return x.copy()
    if dtype == torch.float32:
        return x.astype(np.float32).astype(np.float64)
    if dtype == torch.float16:
        return x.astype(np.float16).astype(np.float64)
    return torch.from_numpy(x.copy()).to(torch.bfloat16).double().numpy()


def _rows(t):
    """(N, D) float64 numpy copy of t's exact values, features in logical (row-major) order."""
    return t.detach().double().reshape(t.shape[0], -1).numpy()


def _kept(quantile, D):
    """Features the quantile rule leaves unpenalised: the largest j in [0, D] with j / D <= q (the
    division correctly rounded, as Python's int / int is), by trying every j (j / D is non-decreasing)."""
    return sum(1 for j in range(1, D + 1) if j / D <= quantile)


# The quantile rule's count against exact arithmetic: (q as passed, q as the user meant it). The
# decimals are exact as Fraction(str); 1/3 is the rational 1/3 (Fraction("0.3333333333333333") is
# below it, and 1024 of 3072 features is what q = 1/3 asks for).
QUANTILE_COUNT_CASES = [(0.29, Fraction("0.29")), (0.57, Fraction("0.57")), (0.58, Fraction("0.58")),
                        (0.1, Fraction("0.1")), (0.3, Fraction("0.3")), (0.7, Fraction("0.7")),
                        (1 / 3, Fraction(1, 3)), (0.0, Fraction(0)), (1.0, Fraction(1))]
QUANTILE_COUNT_DS = [100, 7, 3 * 32 * 32]


def kept_exact(q_exact: Fraction, D: int) -> int:
    """floor(q D) in exact rational arithmetic: how many of D features q leaves unpenalised."""
    return math.floor(q_exact * D)


def distinct_ranks(N, D, seed=0):
    """(N, D) int64: each row a random permutation of 0..D-1 (distinct values, so a quantile mask
    penalises exactly D - kept features of each row: those of rank < D - kept)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(D, generator=gen) for _ in range(N)])


def check_quantile_counts(threshold_mask, gradient_saliency_mask, adaptor_saliency_mask, D):
    """Each mask op with every ``QUANTILE_COUNT_CASES`` q keeps exactly ``kept_exact`` of D distinct
    saliency values per sample, the most salient ones. ``adaptor_saliency_mask(g, weight, q)`` with
    one channel, weight 1, no normalisation: M = tanh(g), increasing in g."""
    ranks = distinct_ranks(2, D, seed=D)
    M = (ranks + 1).float() / D  # distinct saliency values, increasing with the rank
    g = (ranks + 1).float() * torch.tensor([1.0, -1.0])[ranks % 2]  # |g| / max|g| = M
    for q, q_exact in QUANTILE_COUNT_CASES:
        kept = kept_exact(q_exact, D)
        want = ranks < D - kept
        for name, mask in (("threshold_mask", threshold_mask(M, 0.5, q)),
                           ("gradient_saliency_mask", gradient_saliency_mask(g, 0.5, q)),
                           ("adaptor_saliency_mask", adaptor_saliency_mask(M, torch.ones(1, 1), q))):
            assert (~mask).sum(1).tolist() == [kept, kept], (name, q, D)
            assert torch.equal(mask, want), (name, q, D)


def _rule_oracle(M, beta, quantile, dtype):
    """The selection rule on an (N, D) float64 array of dtype values: per-sample loop with a sort."""
    N, D = M.shape
    out = np.zeros((N, D), dtype=bool)
    if quantile is None:
        b = _round([beta], dtype)[0]  # `M <= beta` compares in M's dtype
        for n in range(N):
            for d in range(D):
                out[n, d] = M[n, d] <= b
        return out
    k = D - _kept(quantile, D)
    for n in range(N):
        if k <= 0:
            continue
        if k >= D:
            out[n] = True
            continue
        s = np.sort(M[n])  # NaN sorts last, as torch.kthvalue orders it
        thresh = s[k - 1]
        out[n] = M[n] <= thresh
    return out


def _adaptor_oracle(g, W, b, normalize, dtype):
    """tanh(W @ (g / rms) + b) in float64 (rms = sqrt(mean(g^2) + tiny) per sample); returns (M, S)
    with S = 1 + |b_o| + sum_c |W_oc x_c| (the scale of the rounding error of a finite-precision evaluation)."""
    N = g.shape[0]
    C = 1 if g.dim() == 2 else g.shape[1]
    x = g.detach().double().reshape(N, C, -1).numpy()
    if normalize:
        rms = np.sqrt((x ** 2).mean(axis=(1, 2), keepdims=True) + TINY[dtype])
        x = x / rms
    W = W.detach().double().reshape(C, C).numpy()
    bb = np.zeros(C) if b is None else b.detach().double().numpy()
    pre = np.einsum("oc,ncs->nos", W, x) + bb[None, :, None]
    S = 1 + np.abs(bb)[None, :, None] + np.einsum("oc,ncs->nos", np.abs(W), np.abs(x))
    return np.tanh(pre).reshape(N, -1), S.reshape(N, -1)


def _adaptor_params(C, dtype, seed, bias=True, square=False):
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(C, C, generator=gen, dtype=torch.float64) * 0.7 + torch.eye(C, dtype=torch.float64)).to(dtype)
    b = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.2).to(dtype) if bias else None
    return (W if square else W.reshape(C, C, 1, 1)), b


def _ambiguous(M, S, beta, q, dtype):
    """Features whose decision a finite-precision evaluation of the adaptor may flip: those whose
    interval [M - delta, M + delta] meets the interval the threshold can move in. delta bounds
    |M_computed - M_oracle| per feature: a few roundings of the inputs and of the pre-activation (scaled by
    tanh' = 1 - M^2) plus the rounding of M itself. For the quantile rule the k-th smallest value of any
    M_computed within delta of M lies between the k-th smallest of M - delta and of M + delta."""
    delta = 6 * UNIT[dtype] * ((1 - M ** 2) * S + 1)
    N, D = M.shape
    if q is None:
        lo = hi = np.full(N, _round([beta], dtype)[0])
    else:
        k = D - _kept(q, D)
        if k <= 0 or k >= D:
            return np.zeros_like(M, dtype=bool)
        lo = np.sort(M - delta, axis=1)[:, k - 1]
        hi = np.sort(M + delta, axis=1)[:, k - 1]
    return (M + delta >= lo[:, None]) & (M - delta <= hi[:, None])


def _check_near_threshold(got, M, S, beta, q, dtype):
    """got (N, D) bool may differ from the float64 oracle's mask only at features whose M is within
    rounding of the threshold (see _ambiguous). Those must be a minority (in bfloat16, 8 bits, up to
    ~20% of a sample lies within rounding of a quantile threshold; in float32 / float64 a handful),
    or the check would have no teeth; the actual disagreements must be rare."""
    expect = _rule_oracle(M, beta, q, torch.float64)
    near = _ambiguous(M, S, beta, q, dtype)
    cap = M.size // 4 if dtype in (torch.bfloat16, torch.float16) else M.size // 50
    assert near.sum() <= max(4, cap), f"{int(near.sum())} of {M.size} features near the threshold"
    bad = got != expect
    assert not (bad & ~near).any(), f"{int((bad & ~near).sum())} disagreements away from the threshold"
    assert bad.sum() <= max(2, M.size // 100), f"{int(bad.sum())} disagreements"


def adaptor_inputs(shape, dtype, normalize, lay):
    """(g, W, b) of an adaptor-mask case: Gaussian g of ``shape`` (scaled by 1e-3 when normalising, so
    the normalised map must not depend on the gradient's scale) laid out by ``lay(t)``, and parameters
    a little away from the identity start, C = 1 for (N, D) shapes."""
    C = 1 if len(shape) == 2 else shape[1]
    W, b = _adaptor_params(C, dtype, seed=sum(shape))
    scale = 1e-3 if normalize else 1.0
    g = (torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * scale).to(dtype)
    return lay(g), W, b


def adaptor_bad_arguments():
    """[(args of adaptor_saliency_mask, message regex)]: the bad inputs every implementation (C++, CUDA,
    Triton) must reject with the same message naming the argument."""
    g = torch.randn(2, 3, 4, 4)
    cases = [((torch.ones(2, 3, dtype=torch.int64), torch.eye(1), None, 0.1),
              "adaptor_saliency_mask: g must be floating point"),
             ((g, torch.eye(3), None, 0.1, 1.5), r"quantile must be in \[0, 1\]"),
             ((g, torch.ones(2, 2, 1, 1), None, 0.1),
              r"weight must be a 1x1 convolution's \[C, C, 1, 1\].*C = 3.*\[2, 2, 1, 1\]"),
             ((g, torch.ones(3, 3, dtype=torch.int64), None, 0.1), "weight must be a floating tensor"),
             ((g, torch.eye(3), torch.ones(2), 0.1), r"bias must be a floating \[3\] tensor"),
             ((torch.randn(4), torch.eye(1), None, 0.1), r"g must have shape \(N, C, \*\) or \(N, D\)")]
    cases += [((g, torch.ones(w), None, 0.1), "weight must be a 1x1 convolution")
              for w in [(3, 3, 1, 2), (9, 1), (1, 9), (1, 1, 9, 1)]]
    return cases
