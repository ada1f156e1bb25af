"""The compiled selective-mask ops and the bool-masked squared norm against independent oracles.

Ops (csrc/saliency_mask.cpp, kernels in csrc/sample_ops_kernels.h): jsigr_fast::gradient_saliency_mask,
threshold_mask, adaptor_saliency_mask, masked_sq_norm_bool (+ masked_sq_norm_bool_backward), and the
fused backend's ``make_mask`` that picks among them.

Oracles are written here from the definitions, never from the library:

* the rule (``M <= beta`` with beta rounded to the dtype, or the ``k = D - kept`` smallest values of
  each sample, ``kept`` the largest j with ``j / D <= q``, ties at the k-th included) is a per-sample
  numpy loop with a sort; the count ``kept`` is also checked against ``floor(q D)`` in exact rationals;
* ``M = |g| / max(max_d |g|, tiny)`` is computed in float64 from the dtype's exact values and rounded
  to the dtype once (numpy casts; torch's cast only for bfloat16, which numpy lacks). float64 holds the
  correctly rounded quotient, and rounding it again to a format of at most 24 bits gives the correctly
  rounded quotient in that format (53 >= 2 * 24 + 2), which is what one IEEE division in the dtype gives;
* the adaptor's ``tanh(conv1x1(g / rms(g)) + b)`` is a float64 numpy einsum;
* the squared norm is a float64 sum, its derivatives are checked by gradcheck / gradgradcheck.

The reference functions of jsigr_fast.saliency are also compared where the contract is bit-identity
with them (that contract is part of the ops' documentation).
"""
import math
import zlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import jsigr_fast
from jsigr_fast import fused, ops, reference
from jsigr_fast.saliency import SaliencyAdaptor, gradient_saliency, selective_mask
from mask_oracles import (QUANTILE_COUNT_CASES, QUANTILE_COUNT_DS, TINY, UNIT, _adaptor_oracle, _adaptor_params,
                          _check_near_threshold, _round, _rows, _rule_oracle, adaptor_bad_arguments, adaptor_inputs,
                          distinct_ranks, kept_exact)

pytestmark = pytest.mark.skipif(
    not (jsigr_fast.extension_loaded() and ops.mask_ops_compiled_available("cpu")),
    reason=f"compiled selective-mask ops not available: {jsigr_fast.extension_error() or 'older build of _C'}")
O = torch.ops.jsigr_fast

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (shape, layout): batch 1, odd feature counts (tails of the 8-/4-lane vectors), > 512 features (tiles),
# 2-D, 3-D, 4-D, 5-D, channels-last, non-contiguous views
CASES = [
    ((1, 1), "contiguous"),
    ((1, 3), "contiguous"),
    ((4, 7), "contiguous"),
    ((5, 8), "transposed"),
    ((3, 33), "sliced"),
    ((2, 1031), "contiguous"),
    ((2, 1031), "sliced"),
    ((2, 3, 17), "contiguous"),
    ((2, 3, 5, 7), "contiguous"),
    ((2, 3, 5, 7), "channels_last"),
    ((2, 3, 5, 7), "transposed"),
    ((1, 5, 3, 3), "channels_last"),
    ((3, 1, 1, 1), "contiguous"),
    ((2, 2, 3, 4, 5), "contiguous"),
    ((2, 2, 3, 4, 5), "channels_last"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in CASES]

RULES = [(0.3, None), (0.25, None), (0.0, None), (1.0, None), (-0.5, None),
         (0.3, 0.0), (0.3, 0.29), (0.3, 0.5), (0.3, 0.9), (0.3, 1.0)]


# ------------------------------------------------------------------------------------------------
# oracles
# ------------------------------------------------------------------------------------------------
def _gradient_saliency_oracle(g, dtype):
    """M = |g| / max(max|g|, tiny), one rounding to dtype; (N, D) float64."""
    a = np.abs(_rows(g))
    M = np.empty_like(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        for n in range(a.shape[0]):
            peak = np.max(a[n]) if a.shape[1] else 0.0  # NaN propagates
            if not np.isnan(peak):
                peak = max(peak, TINY[dtype])
            M[n] = _round(a[n] / peak, dtype)
    return M





# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "transposed":  # a non-contiguous view with t's logical shape and values
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other element of a wider buffer whose other half is garbage
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), 7.0, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t


def _expected_format(t, layout):
    if layout == "channels_last":
        return torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _data(shape, kind, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":  # |g| in {0, .25, .5, .75, 1}: many exact ties, and values equal to beta
        return (torch.randint(-4, 5, shape, generator=gen).double() * 0.25).to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


class _OpLog(TorchDispatchMode):
    """Records the ops that reach the dispatcher (to check which kernel a wrapper runs)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------
# gradient_saliency_mask and threshold_mask: exact oracles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_saliency_mask_matches_oracle(dtype, shape, layout, kind):
    g = _layout(_data(shape, kind, dtype, seed=_seed(shape, kind)), layout)
    M = _gradient_saliency_oracle(g, dtype)
    for beta, q in RULES:
        mask = ops.gradient_saliency_mask(g, beta, q)
        assert mask.dtype == torch.bool and mask.shape == g.shape
        assert mask.is_contiguous(memory_format=_expected_format(g, layout)), (layout, mask.stride())
        expect = _rule_oracle(M, beta, q, dtype)
        got = mask.reshape(shape[0], -1).numpy()
        assert np.array_equal(got, expect), (beta, q, np.argwhere(got != expect)[:5])
        # documented: bit-identical to selective_mask(gradient_saliency(g)) != 0
        assert torch.equal(mask, selective_mask(gradient_saliency(g), beta=beta, quantile=q) != 0)


@pytest.mark.parametrize("kind", ["uniform", "ties"])
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_mask_matches_oracle(dtype, shape, layout, kind):
    gen = torch.Generator().manual_seed(_seed(shape, kind, "thr"))
    if kind == "ties":
        M0 = torch.randint(0, 5, shape, generator=gen).double() * 0.25
    else:
        M0 = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    Mt = _layout(M0.to(dtype), layout)
    Mv = _rows(Mt)
    for beta, q in RULES:
        mask = ops.threshold_mask(Mt, beta, q)
        assert mask.dtype == torch.bool and mask.shape == Mt.shape
        assert mask.is_contiguous(memory_format=_expected_format(Mt, layout))
        expect = _rule_oracle(Mv, beta, q, dtype)
        assert np.array_equal(mask.reshape(shape[0], -1).numpy(), expect), (beta, q)
        assert torch.equal(mask, selective_mask(Mt, beta=beta, quantile=q) != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_beta_is_rounded_to_the_dtype(dtype):
    # beta's nearest value v in the dtype lies above beta, so M = v passes `M <= beta` only because
    # beta is rounded to the dtype too (as `M <= beta` rounds the Python float).
    beta = next(b for b in (0.1, 0.3, 0.7, 0.2) if _round([b], dtype)[0] > b)
    v = _round([beta], dtype)[0]
    g = torch.tensor([[1.0, v, 0.0]], dtype=dtype)  # M = [1, v, 0] exactly
    assert ops.gradient_saliency_mask(g, beta).tolist() == [[False, True, True]]
    assert ops.threshold_mask(g, beta).tolist() == [[False, True, True]]
    # the next value of the dtype above v is excluded
    if dtype == torch.float32:
        up = float(np.nextafter(np.float32(v), np.float32(1)))
    elif dtype == torch.float16:
        up = float(np.nextafter(np.float16(v), np.float16(1)))
    else:  # bfloat16: the bit pattern of a positive value plus one
        up = float(torch.tensor([v], dtype=dtype).view(torch.int16).add(1).view(dtype))
    assert up > v and _round([up], dtype)[0] == up
    assert ops.threshold_mask(torch.tensor([[up, v]], dtype=dtype), beta).tolist() == [[False, True]]
    g2 = torch.tensor([[1.0, up, v]], dtype=dtype)
    assert ops.gradient_saliency_mask(g2, beta).tolist() == [[False, False, True]]


def test_beta_is_exact_in_float64():
    nxt = math.nextafter(0.1, 1.0)
    M = torch.tensor([[0.1, nxt, 0.0999999999]], dtype=torch.float64)
    assert ops.threshold_mask(M, 0.1).tolist() == [[True, False, True]]
    g = torch.tensor([[1.0, 0.1, nxt]], dtype=torch.float64)
    assert ops.gradient_saliency_mask(g, 0.1).tolist() == [[False, True, False]]


def test_beta_beyond_the_dtype_range():
    # 1e6 rounds to +inf in float16: every finite M passes; -1e6 -> -inf: none does
    M = torch.tensor([[0.0, 1.0, 65504.0]], dtype=torch.float16)
    assert ops.threshold_mask(M, 1e6).all()
    assert not ops.threshold_mask(M, -1e6).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantile_edges(dtype):
    # distinct values: exactly k = D - kept features per sample, the k smallest, kept = q D exactly for
    # these q (not floor(q * D): 0.29 * 100 = 28.999999999999996 would give k = 72, not 71)
    D = 100
    M = torch.stack([torch.randperm(D, generator=torch.Generator().manual_seed(s)) for s in range(3)]).to(dtype) / 128
    for q, kept in [(0.0, 0), (0.01, 1), (0.29, 29), (0.5, 50), (0.57, 57), (0.99, 99), (1.0, 100)]:
        k = D - kept
        mask = ops.threshold_mask(M, 0.5, q)
        assert mask.sum(1).tolist() == [k] * 3, q
        for n in range(3):
            assert torch.equal(mask[n], M[n] < (k / 128)), q  # values are j / 128, j = 0..99
        assert torch.equal(ops.gradient_saliency_mask(M, 0.5, q).sum(1), torch.full((3,), k))
    # D = 1: any q < 1 keeps the feature, q = 1 drops it
    one = torch.tensor([[0.7], [0.0]], dtype=dtype)
    for q, want in [(0.0, True), (0.5, True), (0.999, True), (1.0, False)]:
        assert ops.threshold_mask(one, 0.5, q).tolist() == [[want], [want]], q
        assert ops.gradient_saliency_mask(one, 0.5, q).tolist() == [[want], [want]], q
    # ties at the k-th smallest value are all included
    tied = torch.tensor([[0.1, 0.5, 0.5, 0.5, 0.9, 0.2]], dtype=dtype)
    assert ops.threshold_mask(tied, 0.0, 0.5).tolist() == [[True, True, True, True, False, True]]  # k = 3
    assert ops.threshold_mask(tied, 0.0, 5 / 6).tolist() == [[True, False, False, False, False, False]]  # k=1
    assert ops.threshold_mask(torch.full((2, 9), 0.5, dtype=dtype), 0.0, 0.6).all()


@pytest.mark.parametrize("D", QUANTILE_COUNT_DS)
@pytest.mark.parametrize("q,q_exact", QUANTILE_COUNT_CASES, ids=[f"q={q:.4g}" for q, _ in QUANTILE_COUNT_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_quantile_keeps_exactly_floor_q_d(dtype, q, q_exact, D):
    # mask_quantile=q leaves floor(q D) features of each sample unpenalised, floor(q D) in exact
    # arithmetic (0.29 of 100 features is 29; floor(0.29 * 100) in floating point was 28), in every
    # backend: the reference, the compiled ops, the fused backend's make_mask
    kept = kept_exact(q_exact, D)
    ranks = distinct_ranks(2, D, seed=D)
    want = ranks < D - kept  # the D - kept least salient are penalised
    M = ((ranks + 1).double() / D).to(dtype)  # distinct saliency values, increasing with the rank
    g = (ranks + 1).to(dtype) * torch.tensor([1.0, -1.0], dtype=dtype)[ranks % 2]  # |g| / max|g| = M
    x = torch.zeros(2, D, dtype=dtype)
    masks = {
        "selective_mask": selective_mask(M, quantile=q) != 0,
        "selective_mask(gradient_saliency)": selective_mask(gradient_saliency(g), quantile=q) != 0,
        "threshold_mask": ops.threshold_mask(M, 0.5, q),
        "gradient_saliency_mask": ops.gradient_saliency_mask(g, 0.5, q),
        # one channel (g is (N, D)), weight 1, no bias, no normalisation: M = tanh(g), increasing
        "adaptor_saliency_mask": ops.adaptor_saliency_mask((ranks + 1).to(dtype) / D, torch.ones(1, 1, dtype=dtype),
                                                           None, 0.5, q, normalize=False),
        "fused.make_mask(map)": fused.make_mask(M, None, x, beta=0.5, quantile=q),
        "fused.make_mask(gradient)": fused.make_mask("gradient", g, x, beta=0.5, quantile=q),
        "reference.make_mask(map)": reference.make_mask(M, None, x, beta=0.5, quantile=q) != 0,
    }
    for name, mask in masks.items():
        assert (~mask).sum(1).tolist() == [kept, kept], (name, q, D)
        assert torch.equal(mask, want), (name, q, D)


def test_quantile_count_matches_exact_arithmetic_for_every_percent():
    # the compiled count (csrc/quantile_rule.h) and the Python one (jsigr_fast.saliency.quantile_kept)
    # against floor(q D) in exact rationals, for q = i / 100 (the decimal as typed) and many D
    from fractions import Fraction

    from jsigr_fast.saliency import quantile_kept

    for D in [*range(1, 41), 99, 100, 101, 1000, 3072]:
        M = (torch.arange(D, dtype=torch.float64) + 1).unsqueeze(0)  # distinct: the mask penalises exactly k
        for i in range(101):
            q = i / 100
            kept = kept_exact(Fraction(i, 100), D)
            assert quantile_kept(q, D) == kept, (q, D)
            assert int(ops.threshold_mask(M, 0.5, q).sum()) == D - kept, (q, D)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_and_tiny_samples(dtype):
    # an all-zero sample: peak clamped to tiny, M = 0 everywhere
    g = torch.zeros(2, 7, dtype=dtype)
    g[1, 3] = 1.0
    assert ops.gradient_saliency_mask(g, 0.0)[0].all()
    assert not ops.gradient_saliency_mask(g, -0.01)[0].any()
    assert ops.gradient_saliency_mask(g, 0.0, 0.5)[0].all()  # all tied at 0
    assert ops.gradient_saliency_mask(g, 0.0).tolist()[1] == [True] * 3 + [False] + [True] * 3
    # a sample whose peak is below tiny (subnormal values): M = |g| / tiny, not |g| / max|g|
    sub = TINY[dtype] * np.array([0.5, 0.25, 0.0, -0.125])
    gs = torch.tensor(_round(sub, dtype)[None], dtype=torch.float64).to(dtype)
    assert (gs.double() != 0).sum() == 3, "the subnormals must be representable"
    M = _gradient_saliency_oracle(gs, dtype)
    assert np.array_equal(M[0], [0.5, 0.25, 0.0, 0.125])
    for beta, q in [(0.3, None), (0.125, None), (0.0, 0.5)]:
        assert np.array_equal(ops.gradient_saliency_mask(gs, beta, q).numpy(), _rule_oracle(M, beta, q, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_follow_the_reference(dtype):
    # Documented as bit-identical to selective_mask(gradient_saliency(g)) in every case; the kernels
    # state NaN propagates through the peak (as amax) and sorts last (as kthvalue).
    nan, inf = float("nan"), float("inf")
    g = torch.tensor([[1.0, nan, 0.1, 0.2], [inf, 1.0, 0.0, -inf], [0.5, 0.2, 0.1, 0.05]], dtype=dtype)
    M = _gradient_saliency_oracle(g, dtype)
    for beta, q in [(0.5, None), (0.3, 0.25), (0.3, 0.5), (0.3, 0.0), (0.3, 1.0)]:
        mask = ops.gradient_saliency_mask(g, beta, q)
        assert torch.equal(mask, selective_mask(gradient_saliency(g), beta=beta, quantile=q) != 0), (beta, q)
        assert np.array_equal(mask.numpy(), _rule_oracle(M, beta, q, dtype)), (beta, q)
    Mt = torch.tensor([[0.1, nan, 0.2, 0.3], [nan] * 4, [0.4, -inf, inf, 0.0]], dtype=dtype)
    for beta, q in [(0.5, None), (0.3, 0.25), (0.3, 0.5), (0.3, 0.75)]:
        mask = ops.threshold_mask(Mt, beta, q)
        assert np.array_equal(mask.numpy(), _rule_oracle(_rows(Mt), beta, q, dtype)), (beta, q)
        assert torch.equal(mask, selective_mask(Mt, beta=beta, quantile=q) != 0), (beta, q)


def test_many_chunks_with_two_threads():
    # D > 32768 splits each sample over several parallel tasks (the peak is combined across chunks);
    # the peak sits in the last chunk so a per-chunk peak would give a different mask.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gen = torch.Generator().manual_seed(11)
        g = torch.randn(3, 70001, generator=gen)
        g[:, -5] = 40.0
        M = _gradient_saliency_oracle(g, torch.float32)
        for beta, q in [(0.02, None), (0.3, 0.37)]:
            f32 = torch.float32
            assert np.array_equal(ops.gradient_saliency_mask(g, beta, q).numpy(), _rule_oracle(M, beta, q, f32))
            assert np.array_equal(ops.threshold_mask(g, beta, q).numpy(), _rule_oracle(_rows(g), beta, q, f32))
    finally:
        torch.set_num_threads(before)


def test_empty_batch():
    for fn in (lambda t, q: ops.gradient_saliency_mask(t, 0.3, q), lambda t, q: ops.threshold_mask(t, 0.3, q)):
        for q in (None, 0.5):
            out = fn(torch.zeros(0, 3, 4), q)
            assert out.dtype == torch.bool and out.shape == (0, 3, 4)
    out = ops.adaptor_saliency_mask(torch.zeros(0, 3, 4), torch.eye(3), None, 0.3, 0.5)
    assert out.dtype == torch.bool and out.shape == (0, 3, 4)
    assert ops.masked_sq_norm(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool)).shape == (0,)


# ------------------------------------------------------------------------------------------------
# adaptor_saliency_mask: float64 oracle, disagreement only within rounding of the threshold
# ------------------------------------------------------------------------------------------------


ADAPTOR_CASES = [
    ((3, 1000), "contiguous"),
    ((1, 1), "contiguous"),
    ((4, 7), "sliced"),
    ((2, 3, 17), "contiguous"),
    ((2, 3, 5, 7), "contiguous"),
    ((2, 3, 5, 7), "channels_last"),
    ((2, 3, 5, 7), "transposed"),
    ((1, 5, 3, 3), "channels_last"),
    ((2, 4, 2, 3, 3), "channels_last"),
]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape,layout", ADAPTOR_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in ADAPTOR_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adaptor_saliency_mask_matches_oracle(dtype, shape, layout, normalize):
    g, W, b = adaptor_inputs(shape, dtype, normalize, lambda t: _layout(t, layout))
    M, S = _adaptor_oracle(g, W, b, normalize, dtype)
    for beta, q in [(0.2, None), (-0.3, None), (0.3, 0.3), (0.3, 0.75), (0.3, 0.0), (0.3, 1.0)]:
        mask = ops.adaptor_saliency_mask(g, W, b, beta, q, normalize=normalize)
        assert mask.dtype == torch.bool and mask.shape == g.shape and mask.is_contiguous()
        _check_near_threshold(mask.reshape(shape[0], -1).numpy(), M, S, beta, q, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adaptor_agrees_with_the_module(dtype):
    # the documented equivalent: running SaliencyAdaptor, then selective_mask
    for shape in [(3, 257), (2, 3, 6, 5)]:
        C = 1 if len(shape) == 2 else shape[1]
        ad = SaliencyAdaptor(C)
        W, b = _adaptor_params(C, torch.float64, seed=7)
        with torch.no_grad():
            ad.conv.weight.copy_(W)
            ad.conv.bias.copy_(b)
        ad = ad.to(dtype)
        g = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 1e-2).to(dtype)
        M, S = _adaptor_oracle(g, ad.conv.weight, ad.conv.bias, True, dtype)
        with torch.no_grad():
            Mmod = ad(g)
        for beta, q in [(0.2, None), (0.3, 0.4)]:
            got = ops.adaptor_saliency_mask(g, ad.conv.weight, ad.conv.bias, beta, q)
            ref = selective_mask(Mmod, beta=beta, quantile=q) != 0
            bad = (got != ref).reshape(shape[0], -1).numpy()
            _check_near_threshold(got.reshape(shape[0], -1).numpy(), M, S, beta, q, dtype)
            _check_near_threshold(ref.reshape(shape[0], -1).numpy(), M, S, beta, q, dtype)
            assert bad.sum() <= max(2, bad.size // 100)


def test_adaptor_identity_no_bias_and_square_weight():
    # identity weight, no bias, one channel: M = tanh(g / rms) exactly representable decisions
    g = torch.tensor([[3.0, -1.0, 0.0, 1.0]], dtype=torch.float64)  # rms = sqrt(11 / 4)
    rms = math.sqrt(11 / 4)
    expect = [math.tanh(v / rms) <= 0.2 for v in [3.0, -1.0, 0.0, 1.0]]
    assert ops.adaptor_saliency_mask(g, torch.ones(1, 1, 1, 1, dtype=torch.float64), None, 0.2).tolist() == [expect]
    # [C, C] weight == [C, C, 1, 1] weight; normalize=False uses g as is
    g4 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    W, b = _adaptor_params(3, torch.float64, seed=1, square=True)
    a = ops.adaptor_saliency_mask(g4, W, b, 0.1, None, normalize=False)
    assert torch.equal(a, ops.adaptor_saliency_mask(g4, W.reshape(3, 3, 1, 1), b, 0.1, None, normalize=False))
    M, S = _adaptor_oracle(g4, W, b, False, torch.float64)
    _check_near_threshold(a.reshape(2, -1).numpy(), M, S, 0.1, None, torch.float64)


def test_adaptor_normalisation_is_scale_free():
    # g and g * 2^12 have the same g / rms(g) exactly (power-of-two scaling commutes with every rounding)
    g = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    W, b = _adaptor_params(2, torch.float32, seed=4)
    for q in (None, 0.5):
        a = ops.adaptor_saliency_mask(g, W, b, 0.1, q)
        assert torch.equal(a, ops.adaptor_saliency_mask(g * 4096.0, W, b, 0.1, q))
        # without normalisation the scale matters: tanh saturates for the big input
        assert not torch.equal(ops.adaptor_saliency_mask(g * 1e-3, W, b, 0.1, normalize=False),
                               ops.adaptor_saliency_mask(g * 4096.0, W, b, 0.1, normalize=False))


# ------------------------------------------------------------------------------------------------
# masked_sq_norm with a bool mask (masked_sq_norm_bool and its backward)
# ------------------------------------------------------------------------------------------------
def _sq_norm_oracle(g, m):
    gv, mv = _rows(g), m.reshape(m.shape[0], -1).numpy()
    return np.array([math.fsum(float(x) ** 2 for x, keep in zip(gv[n], mv[n]) if keep) for n in range(gv.shape[0])])


SQ_CASES = [((1, 1), "contiguous"), ((3, 7), "contiguous"), ((2, 33), "sliced"), ((2, 1031), "contiguous"),
            ((2, 3, 5, 7), "channels_last"), ((2, 3, 5, 7), "transposed"), ((2, 2, 3, 4, 5), "channels_last"),
            ((2, 3, 17), "contiguous")]


@pytest.mark.parametrize("shape,layout", SQ_CASES, ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in SQ_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_sq_norm_bool_values_and_gradient(dtype, shape, layout):
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    g = _layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype), layout)
    m = _layout(torch.rand(shape, generator=gen) > 0.4, layout)
    with _OpLog() as log:
        out = ops.masked_sq_norm(g.requires_grad_(True), m)
    assert "jsigr_fast.masked_sq_norm_bool" in log.names  # the one-byte kernel, not the float-mask one
    assert out.dtype == dtype and out.shape == (shape[0],)
    expect = _sq_norm_oracle(g, m)
    got = out.detach().double().numpy()
    # one rounding to the dtype of an (at least float-accurate) sum
    rtol = {torch.float64: 1e-13, torch.float32: 1e-6}.get(dtype, 2 * UNIT[dtype])
    np.testing.assert_allclose(got, expect, rtol=rtol, atol=1e-300)
    # backward: grad = [m] 2 w g, one rounding of an exact product -> bit-exact
    w = torch.randn(shape[0], generator=gen, dtype=torch.float64).to(dtype)
    with _OpLog() as log:
        (grad,) = torch.autograd.grad(out, g, w)
    assert "jsigr_fast.masked_sq_norm_bool_backward" in log.names
    exp_grad = _round(2.0 * w.double().numpy().reshape(-1, *[1] * (len(shape) - 1)) * g.detach().double().numpy()
                      * m.numpy(), dtype)
    assert np.array_equal(grad.double().numpy(), exp_grad)
    assert grad.is_contiguous(memory_format=_expected_format(g, layout))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_masked_sq_norm_bool_gradcheck_gradgradcheck(layout):
    gen = torch.Generator().manual_seed(21)
    g = _layout(torch.randn(3, 2, 4, 3, generator=gen, dtype=torch.float64), layout).requires_grad_(True)
    m = _layout(torch.rand(3, 2, 4, 3, generator=gen) > 0.5, layout)
    f = lambda t: ops.masked_sq_norm(t, m, compiled=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (g,))
    assert torch.autograd.gradgradcheck(f, (g,))
    # the backward op is differentiable in both grad_out and g
    go = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    bw = lambda a, t: O.masked_sq_norm_bool_backward(a, t, m.contiguous())  # noqa: E731
    assert torch.autograd.gradcheck(bw, (go, g))
    assert torch.autograd.gradgradcheck(bw, (go, g))


def test_masked_sq_norm_bool_equals_float_mask():
    gen = torch.Generator().manual_seed(22)
    for dtype, rtol in [(torch.float64, 1e-13), (torch.float32, 1e-6)]:
        g = torch.randn(4, 3, 9, 9, generator=gen, dtype=torch.float64).to(dtype)
        mb = torch.rand(4, 3, 9, 9, generator=gen) > 0.5
        gb = g.clone().requires_grad_(True)
        gf = g.clone().requires_grad_(True)
        ob = ops.masked_sq_norm(gb, mb)
        of = ops.masked_sq_norm(gf, mb.to(dtype))
        torch.testing.assert_close(ob, of, rtol=rtol, atol=0)
        w = torch.randn(4, generator=gen, dtype=dtype)
        (ob * w).sum().backward()
        (of * w).sum().backward()
        assert torch.equal(gb.grad, gf.grad)  # m * g * 2w with m in {0, 1}: exact either way


def test_masked_sq_norm_bool_mask_broadcast():
    gen = torch.Generator().manual_seed(23)
    g = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    shared = torch.rand(2, 5, generator=gen) > 0.5
    full = shared.expand(3, 2, 5)
    expect = _sq_norm_oracle(g, full)
    for m in (shared, shared[None], full):  # g.shape[1:], (1, ...), g's shape (expanded view)
        np.testing.assert_allclose(ops.masked_sq_norm(g, m).numpy(), expect, rtol=1e-13)
    with pytest.raises(ValueError, match="mask must have the input's shape"):
        ops.masked_sq_norm(g, torch.ones(2, 2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have the input's shape"):
        ops.masked_sq_norm(g, torch.ones(5, 2, dtype=torch.bool))


def test_masked_sq_norm_bool_op_errors():
    g = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        O.masked_sq_norm_bool(g, torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="mask must have g's shape"):
        O.masked_sq_norm_bool(g, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="g must be floating point"):
        O.masked_sq_norm_bool(torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        O.masked_sq_norm_bool_backward(torch.ones(2), g, torch.ones(3, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# fused.make_mask against reference.make_mask
# ------------------------------------------------------------------------------------------------
class _ScaledAdaptor(SaliencyAdaptor):  # a subclass: not the stock forward, so the module runs
    def forward(self, g, x=None):
        return super().forward(g, x) * 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["none", "gradient", "map", "callable", "adaptor", "adaptor2d", "subclass"])
def test_fused_make_mask_equals_reference(kind, dtype):
    gen = torch.Generator().manual_seed(31)
    shape = (3, 257) if kind == "adaptor2d" else (3, 3, 6, 6)
    g_hat = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1e-2).to(dtype)
    x = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    op = {"none": None, "gradient": "gradient", "map": None, "callable": None}.get(kind)
    expect_op = "jsigr_fast.gradient_saliency_mask" if kind in ("none", "gradient") else "jsigr_fast.threshold_mask"
    saliency = op
    if kind == "map":
        saliency = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    elif kind == "callable":
        saliency = lambda g, xx: (g * xx).abs()  # noqa: E731
    elif kind in ("adaptor", "adaptor2d", "subclass"):
        C = 1 if kind == "adaptor2d" else 3
        saliency = (_ScaledAdaptor if kind == "subclass" else SaliencyAdaptor)(C)
        W, b = _adaptor_params(C, torch.float64, seed=8)
        with torch.no_grad():
            saliency.conv.weight.copy_(W)
            saliency.conv.bias.copy_(b)
        saliency = saliency.to(dtype)
        if kind != "subclass":
            expect_op = "jsigr_fast.adaptor_saliency_mask"
    for beta, q in [(0.2, None), (0.3, 0.5), (0.3, 0.0), (0.3, 1.0)]:
        with _OpLog() as log:
            got = fused.make_mask(saliency, None if kind == "map" else g_hat, x, beta=beta, quantile=q)
        assert expect_op in log.names, log.names
        ref = reference.make_mask(saliency, None if kind == "map" else g_hat, x, beta=beta, quantile=q)
        assert got.dtype == torch.bool and ref.dtype == dtype and got.shape == ref.shape == shape
        if kind in ("adaptor", "adaptor2d"):
            M, S = _adaptor_oracle(g_hat, saliency.conv.weight, saliency.conv.bias, True, dtype)
            _check_near_threshold(got.reshape(3, -1).numpy(), M, S, beta, q, dtype)
            _check_near_threshold((ref != 0).reshape(3, -1).numpy(), M, S, beta, q, dtype)
            assert (got != (ref != 0)).sum() <= 2
        else:
            assert torch.equal(got, ref != 0), (beta, q)


# ------------------------------------------------------------------------------------------------
# argument errors, opcheck
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_q", [1.5, -0.1, float("nan"), float("inf")])
def test_quantile_out_of_range_is_rejected(bad_q):
    g = torch.randn(2, 3, 4, 4)
    calls = [lambda: ops.gradient_saliency_mask(g, 0.1, bad_q), lambda: ops.threshold_mask(g, 0.1, bad_q),
             lambda: ops.adaptor_saliency_mask(g, torch.eye(3), None, 0.1, bad_q)]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"quantile must be in \[0, 1\]"):
            call()


def test_bad_arguments_name_the_argument():
    with pytest.raises(RuntimeError, match="gradient_saliency_mask: g must be floating point"):
        ops.gradient_saliency_mask(torch.ones(2, 3, dtype=torch.int64), 0.1)
    with pytest.raises(RuntimeError, match="threshold_mask: saliency must be floating point"):
        ops.threshold_mask(torch.ones(2, 3, dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match="adaptor_saliency_mask: g must be floating point"):
        ops.adaptor_saliency_mask(torch.ones(2, 3, dtype=torch.int64), torch.eye(1), None, 0.1)
    with pytest.raises(RuntimeError, match="g must have a batch dimension"):
        ops.gradient_saliency_mask(torch.tensor(1.0), 0.1)
    with pytest.raises(RuntimeError, match="saliency must have a batch dimension"):
        ops.threshold_mask(torch.tensor(1.0), 0.1)
    for args, pattern in adaptor_bad_arguments():
        with pytest.raises(RuntimeError, match=pattern):
            ops.adaptor_saliency_mask(*args)


@pytest.mark.parametrize("wshape", [(9, 1), (1, 9), (1, 1, 9, 1)])
def test_adaptor_rejects_weight_with_right_numel_wrong_shape(wshape):
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.adaptor_saliency_mask(torch.randn(2, 3, 4, 4), torch.ones(wshape), None, 0.1)


def test_opcheck_mask_ops():
    gen = torch.Generator().manual_seed(41)
    g = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    gcl = g.contiguous(memory_format=torch.channels_last)
    gt = g.transpose(2, 3)
    W = torch.randn(3, 3, 1, 1, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    for t in (g, gcl, gt):
        torch.library.opcheck(O.gradient_saliency_mask.default, (t, 0.3, None))
        torch.library.opcheck(O.threshold_mask.default, (t.abs(), 0.3, 0.5))
        torch.library.opcheck(O.adaptor_saliency_mask.default, (t, W, b, 0.3, None, True))
    torch.library.opcheck(O.gradient_saliency_mask.default, (g.float(), 0.3, 0.25))
    torch.library.opcheck(O.adaptor_saliency_mask.default, (g[:, 0, 0], W[:1, :1, 0, 0], None, 0.3, 0.5, False))
    m = torch.rand(2, 3, 4, 5, generator=gen) > 0.5
    for t, mm in ((g, m), (gcl, m.contiguous(memory_format=torch.channels_last))):
        torch.library.opcheck(O.masked_sq_norm_bool.default, (t.clone().requires_grad_(True), mm))
        go = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(O.masked_sq_norm_bool_backward.default, (go, t.clone().requires_grad_(True), mm))


def test_fused_make_mask_accepts_an_integer_map_like_the_reference():
    # an integer saliency map is valid input to jsigr_fast.loss (the reference converts it); the
    # fused backend must give the same features rather than the kernel's "floating point" error
    from jsigr_fast import fused, reference

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 4, 4, generator=gen)
    M = torch.randperm(x.numel(), generator=gen).reshape(x.shape)  # distinct values: no ties at the quantile
    for beta, q in ((40.0, None), (0.5, 0.25)):
        want = reference.make_mask(M, None, x, beta=beta, quantile=q)
        got = fused.make_mask(M, None, x, beta=beta, quantile=q)
        assert got.dtype == torch.bool
        assert torch.equal(got, want.reshape(x.shape) != 0)
        assert 0 < int(got.sum()) < got.numel()


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the CUDA or Triton kernels of the mask ops against the same
# references on the host. The masks must be bit-identical; the norms equal to float tolerance.
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 1031), (2, 3, 40, 40), (4, 3, 224, 224)])
def test_cuda_mask_ops_match_the_host_reference(dtype, shape):
    from jsigr_fast import reference

    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(shape, generator=gen) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen)).to(dtype)
    g.view(-1)[::17] = 0  # ties at 0
    layouts = [g] + ([g.contiguous(memory_format=torch.channels_last)] if g.dim() == 4 else [])
    for host in layouts:
        dev = host.cuda()
        for beta, q in ((0.1, None), (0.5, None), (0.3, 0.25), (0.3, 0.9)):
            want = reference.gradient_saliency_mask_ref(host, beta, q)
            got = ops.gradient_saliency_mask(dev, beta, q)
            assert torch.equal(got.cpu(), want), (beta, q)
            M = host.abs().float().to(dtype)
            assert torch.equal(ops.threshold_mask(M.cuda(), beta, q).cpu(), reference.threshold_mask_ref(M, beta, q))
        m = want
        want_norm = (host.double() * m).flatten(1).pow(2).sum(1)
        got_norm = ops.masked_sq_norm(dev, m.cuda()).double().cpu()
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
        torch.testing.assert_close(got_norm, want_norm, rtol=tol, atol=tol)
        go = torch.randn(shape[0], generator=gen).to(dtype)
        got_bw = torch.ops.jsigr_fast.masked_sq_norm_bool_backward(go.cuda(), dev, m.cuda()).cpu()
        want_bw = torch.where(m, (2 * go.view(-1, *[1] * (len(shape) - 1))) * host, torch.zeros((), dtype=dtype))
        torch.testing.assert_close(got_bw, want_bw, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", [((3, 1000), "contiguous"), ((2, 3, 5, 7), "contiguous"),
                                          ((2, 3, 40, 40), "channels_last"), ((4, 3, 224, 224), "contiguous"),
                                          ((4, 3, 224, 224), "channels_last"), ((2, 4, 2, 3, 3), "channels_last")])
def test_cuda_adaptor_mask_matches_oracle(dtype, shape, layout):
    # the CUDA (or Triton) adaptor kernel: compiled for the GPU, with its own tanh and summation order
    assert ops.mask_ops_compiled_available("cuda")
    for normalize in (True, False):
        # the inputs depend on normalize (g scaled by 1e-3 when normalising): with the normalised
        # case's g un-normalised, pre ~ bias and every feature is within rounding of the threshold
        g, W, b = adaptor_inputs(shape, dtype, normalize, lambda t: _layout(t, layout))
        M, S = _adaptor_oracle(g, W, b, normalize, dtype)
        for beta, q in [(0.2, None), (-0.3, None), (0.3, 0.3), (0.3, 0.75), (0.3, 1.0)]:
            mask = ops.adaptor_saliency_mask(g.cuda(), W.cuda(), b.cuda(), beta, q, normalize=normalize, compiled=True)
            assert mask.is_cuda and mask.dtype == torch.bool and mask.shape == g.shape and mask.is_contiguous()
            _check_near_threshold(mask.cpu().reshape(shape[0], -1).numpy(), M, S, beta, q, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_bool_masked_norm_ignores_masked_out_non_finite_values(dtype):
    # the one-byte kernel selects (m ? g : +0), branch-free: a NaN/inf where the mask is off must not
    # reach the norm or its gradient (the float-mask product m * g would give NaN there)
    g = torch.tensor([[1.0, float("nan"), 2.0, float("inf"), -3.0] * 7], dtype=dtype)
    m = torch.isfinite(g)
    out = torch.ops.jsigr_fast.masked_sq_norm_bool(g, m)
    torch.testing.assert_close(out.double(), torch.tensor([14.0 * 7], dtype=torch.float64), rtol=1e-2, atol=0)
    bw = torch.ops.jsigr_fast.masked_sq_norm_bool_backward(torch.ones(1, dtype=dtype), g, m)
    assert torch.isfinite(bw).all()
    assert torch.equal(bw[~m], torch.zeros(int((~m).sum()), dtype=dtype))
    assert not torch.signbit(bw[~m]).any()  # +0, as the select writes
    torch.testing.assert_close(bw[m].double(), 2 * g[m].double(), rtol=1e-2, atol=0)


def test_bool_mask_in_any_layout_or_shared_gives_the_float_mask_value():
    # ops.masked_sq_norm hands a bool mask to the one-byte kernel in its own layout (expanded,
    # channels-last or NCHW); the kernel lays it out like g. Oracle: the float64 sum of (m g)^2.
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    shared = torch.rand(4, 5, 6, generator=gen) < 0.5
    full = torch.rand(3, 4, 5, 6, generator=gen) < 0.5
    for gg in (g, g.contiguous(memory_format=torch.channels_last)):
        for m in (shared, full, full.contiguous(memory_format=torch.channels_last), full.transpose(2, 3).contiguous().transpose(2, 3)):
            want = (gg * m).flatten(1).pow(2).sum(1)
            torch.testing.assert_close(ops.masked_sq_norm(gg, m), want, rtol=1e-12, atol=0)
