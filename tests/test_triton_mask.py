"""The Triton selective-mask kernels (kernels/saliency_mask.py) against the references, under TRITON_INTERPRET=1.

The checks run in a child pytest process with TRITON_INTERPRET=1 (tests/triton_testing.py says why):
``test_triton_mask_kernels_in_interpreter`` launches it; the child tests are skipped in the parent.

Masks must be bit-identical to ``selective_mask(gradient_saliency(g)) != 0`` / ``selective_mask(M) != 0``
(jsigr_fast.reference); the adaptor's mask may differ from a float64 oracle (tests/mask_oracles.py)
only at features within rounding of the threshold, as the C++ op's; the norm agrees with a float64 sum to
the dtype's rounding; the backward is compared exactly with the same products in torch
(``where(mask, (2 grad_out) g, 0)`` in g's dtype) and to rounding with the float64 formula. Shapes are tiny (the interpreter runs each program in numpy),
plus one with D = 4800 so the reductions use several splits and the elementwise grid several programs.
"""
import math
import os
import re

import pytest
import torch

from jsigr_fast.reference import gradient_saliency_mask_ref, threshold_mask_ref
from jsigr_fast.saliency import SaliencyAdaptor, gradient_saliency
from mask_oracles import (QUANTILE_COUNT_DS, _adaptor_oracle, _adaptor_params, _check_near_threshold,
                          adaptor_bad_arguments, adaptor_inputs, check_quantile_counts)
from triton_testing import CHILD, child_only, parent_driver, ptx, ptx_test, run_in_interpreter


CASES = [((1, 7), "contiguous"), ((3, 5), "contiguous"), ((3, 1), "contiguous"), ((2, 3, 5, 7), "contiguous"),
         ((2, 3, 5, 7), "channels_last"), ((3, 2, 3, 3), "transposed"), ((2, 3, 2, 3, 3), "channels_last_3d"),
         ((2, 3, 40, 40), "channels_last")]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
QUANTILES = [0.0, 0.25, 0.5, 0.9, 0.999, 1.0]
# inf / inf = NaN in the interpreter's numpy division (the saliency of an infinite gradient entry)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@parent_driver
def test_triton_mask_kernels_in_interpreter():
    # every child test must really run there
    # 3 tests over CASES x DTYPES, 3 over DTYPES (special values, saliency values, empty), test_errors,
    # the quantile count, the adaptor over ADAPTOR_CASES x DTYPES x normalize, and its 2 tests over DTYPES
    expected = 3 * len(CASES) * len(DTYPES) + 3 * len(DTYPES) + 2 + 2 * len(ADAPTOR_CASES) * len(DTYPES) \
        + 2 * len(DTYPES)
    # the only skips allowed there are the two parent-only tests
    run_in_interpreter(__file__, passed=expected, skipped=2)


@ptx_test
def test_triton_kernels_compile_for_sm90():
    """Every kernel compiles to PTX for sm_90 without a GPU (the interpreter accepts things the
    compiler rejects, e.g. non-constexpr globals), and the mask kernels use the IEEE division and
    an unflushed comparison: div.rn, setp.le without .ftz."""
    import triton.language as tl

    from jsigr_fast.kernels import saliency_mask as tm

    for dt in ("fp32", "fp64", "bf16", "fp16"):
        acc = tl.float64 if dt == "fp64" else tl.float32
        accp, key = ("*fp64", "*i64") if dt == "fp64" else ("*fp32", "*i32")
        blk = {"ACC": acc, "BLOCK": 1024}
        ptx(tm._abs_max_kernel, {"g_ptr": "*" + dt, "part_ptr": key, "D": "i32", "SPLITS": "i32"}, blk)
        for mode in (0, 1, 2):
            code = ptx(tm._mask_kernel, {"src_ptr": "*" + dt, "peak_ptr": accp, "thr_ptr": accp,
                                         "out_ptr": "*" + dt if mode == 1 else "*u8", "TOTAL": "i64", "D": "i32"},
                       {"MODE": mode, **blk})
            assert ".ftz" not in code, (dt, mode)
            if mode != 2:
                assert ("div.rn.f64" if dt == "fp64" else "div.rn.f32") in code, (dt, mode)
            if mode != 1:
                assert ("setp.le.f64" if dt == "fp64" else "setp.le.f32") in code, (dt, mode)
        for has_mask in (True, False):
            ptx(tm._sq_norm_kernel, {"g_ptr": "*" + dt, "m_ptr": "*u8", "part_ptr": "*fp64", "D": "i32",
                                     "SPLITS": "i32"}, {"HAS_MASK": has_mask, **blk})
        for mode in (0, 1):
            code = ptx(tm._adaptor_kernel, {"g_ptr": "*" + dt, "rms_ptr": accp, "w_ptr": accp, "b_ptr": accp,
                                            "thr_ptr": accp, "out_ptr": "*u8" if mode == 0 else "*" + dt,
                                            "TOTAL": "i64", "D": "i32", "S": "i32", "C": "i32", "SC": "i32",
                                            "SS": "i32"}, {"MODE": mode, **blk})
            # no flushed division or comparison (fp64's libdevice exp tests its range with abs.ftz.f32 on
            # the high word: not a flush of our values)
            assert not re.search(r"(div|setp)\.[\w.]*ftz", code), (dt, mode)
            assert ("div.rn.f64" if dt == "fp64" else "div.rn.f32") in code, (dt, mode)
            if mode == 0:
                assert ("setp.le.f64" if dt == "fp64" else "setp.le.f32") in code, (dt, mode)
        ptx(tm._sq_norm_backward_kernel, {"go_ptr": "*" + dt, "g_ptr": "*" + dt, "m_ptr": "*u8", "out_ptr": "*" + dt,
                                          "TOTAL": "i32", "D": "i32"}, blk)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def _lay(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


def _expected_format(t):
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _data(shape, layout, dtype, seed=0):
    """Gaussian data with ties (a quarter of the entries on a coarse grid), zeros and negative zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3.0
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    x = torch.where(u < 0.25, (x * 4).round() / 4, x)
    x = torch.where(u > 0.95, torch.zeros_like(x), x)
    x = torch.where((u > 0.9) & (u <= 0.95), torch.full_like(x, -0.0), x)
    return _lay(x.to(dtype), layout)


def _betas(M):
    """Fixed betas and betas on / next to values of M: exactly a value, the float64 midpoint to the
    next value of the dtype (where the rounding of beta decides), and just above / below a value."""
    betas = [0.0, -0.0, 0.1, 0.5, 1.0, -0.5, 1e10, float("nan")]
    flat = M.flatten()
    finite = flat[torch.isfinite(flat) & (flat > 0)]
    if finite.numel():
        for j in {0, finite.numel() // 3, finite.numel() // 2, finite.numel() - 1}:
            v = finite[j]
            nxt = torch.nextafter(v, torch.tensor(2.0, dtype=v.dtype))
            a, b = float(v), float(nxt)
            betas += [a, (a + b) / 2, a + (b - a) / 3, a * (1 - 1e-12), math.nextafter((a + b) / 2, 3.0)]
    return betas


def _assert_same_mask(got, ref, like, what):
    assert got.dtype == torch.bool and got.shape == like.shape, what
    assert torch.equal(got, ref), f"{what}: {(got != ref).sum().item()} of {got.numel()} features differ"
    if got.numel():
        assert got.is_contiguous(memory_format=_expected_format(like)), what


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------
@child_only
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_mask_matches_reference(shape, layout, dtype):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from jsigr_fast.kernels import saliency_mask as tm

    g = _data(shape, layout, dtype)
    for beta in _betas(gradient_saliency(g)):
        _assert_same_mask(tm.gradient_saliency_mask(g, beta), gradient_saliency_mask_ref(g, beta), g, f"beta={beta!r}")
    for q in QUANTILES:
        _assert_same_mask(tm.gradient_saliency_mask(g, 0.1, q), gradient_saliency_mask_ref(g, 0.1, q), g, f"q={q}")


@child_only
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_mask_matches_reference(shape, layout, dtype):
    from jsigr_fast.kernels import saliency_mask as tm

    M = _data(shape, layout, dtype, seed=1)
    if M.numel() > 4:  # a NaN and an inf in the map (NaN sorts last in kthvalue and compares False)
        flat = M.view(-1) if M.is_contiguous() else None
        if flat is not None:
            flat[1] = float("nan")
            flat[-2] = float("inf")
    for beta in _betas(M):
        _assert_same_mask(tm.threshold_mask(M, beta), threshold_mask_ref(M, beta), M, f"beta={beta!r}")
    for q in QUANTILES:
        _assert_same_mask(tm.threshold_mask(M, 0.1, q), threshold_mask_ref(M, 0.1, q), M, f"q={q}")


def _special(dtype):
    """(6, 8) rows: all zeros; a NaN; +-inf; only subnormals; a huge dynamic range (M subnormal in
    float32 / bfloat16); ordinary values with ties."""
    fi = torch.finfo(dtype)
    sub = fi.tiny / 4  # a subnormal of the dtype
    big = min(fi.max / 4, 1e30)
    rows = [
        [0.0, -0.0, 0.0, 0.0, -0.0, 0.0, 0.0, 0.0],
        [1.0, -2.0, float("nan"), 0.5, 0.0, 3.0, -1.0, 0.25],
        [1.0, float("inf"), -2.0, float("-inf"), 0.0, 0.5, 7.0, -0.0],
        [sub, -sub, sub * 2, 0.0, -sub * 3, sub, sub * 4, -0.0],
        [big, -big / 3, 1e-10, -1e-12, 0.0, big * 1e-30, 3e-9, 1.0],
        [0.5, -0.5, 0.25, 0.5, -1.0, 1.0, 0.75, -0.75],
    ]
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


@child_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    from jsigr_fast.kernels import saliency_mask as tm

    g = _special(dtype)
    M = gradient_saliency(g)
    fi = torch.finfo(dtype)
    # fi.tiny / 8 rounds to a subnormal beta; for bfloat16, 1 + 2^-8 + 2^-40 rounds to 1 only through
    # float32 (double rounding), as `M <= beta` does it
    betas = _betas(M) + [fi.tiny / 8, float(fi.max) * 4, -float("inf"), float("inf"), 1 + 2 ** -8 + 2 ** -40]
    for beta in betas:
        _assert_same_mask(tm.gradient_saliency_mask(g, beta), gradient_saliency_mask_ref(g, beta), g, f"beta={beta!r}")
        _assert_same_mask(tm.threshold_mask(M, beta), threshold_mask_ref(M, beta), M, f"threshold beta={beta!r}")
    for q in QUANTILES + [0.1, 0.6]:
        _assert_same_mask(tm.gradient_saliency_mask(g, 0.1, q), gradient_saliency_mask_ref(g, 0.1, q), g, f"q={q}")
        _assert_same_mask(tm.threshold_mask(M, 0.1, q), threshold_mask_ref(M, 0.1, q), M, f"threshold q={q}")


@child_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_saliency_values_are_the_references(dtype):
    """The M that the quantile path writes (and the beta path compares) is gradient_saliency(g) bit for
    bit: one IEEE division by the NaN-propagating, tiny-clamped peak, rounded to the dtype."""
    from jsigr_fast.kernels import saliency_mask as tm

    for g in (_special(dtype), _data((3, 2, 5, 7), "channels_last", dtype, seed=2)):
        R = tm._Rows(g, "g", "test")
        peak = tm._peak(R)
        M = R.empty(g.dtype)
        tm._compare(R, R.t, tm._GRAD_WRITE_M, peak, peak, M)
        torch.testing.assert_close(M, gradient_saliency(g), rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# adaptor mask: float64 oracle, disagreement only within rounding of the threshold
# ----------------------------------------------------------------------------------------------
# 2-D (one channel), batch 1, 3-D, NCHW, channels-last read in place, a transposed view (copied),
# channels-last-3d, and one with several programs (D = 4800)
ADAPTOR_CASES = [((3, 1000), "contiguous"), ((1, 1), "contiguous"), ((2, 3, 17), "contiguous"),
                 ((2, 3, 5, 7), "contiguous"), ((2, 3, 5, 7), "channels_last"), ((2, 3, 5, 7), "transposed"),
                 ((1, 5, 3, 3), "channels_last"), ((2, 4, 2, 3, 3), "channels_last_3d"),
                 ((2, 3, 40, 40), "channels_last")]
ADAPTOR_RULES = [(0.2, None), (-0.3, None), (0.3, 0.3), (0.3, 0.75), (0.3, 0.0), (0.3, 1.0)]


if CHILD:  # a jit function needs module-level names; triton only in the child
    import triton
    import triton.language as tl

    from jsigr_fast.kernels.saliency_mask import _tanh

    @triton.jit
    def _tanh_probe(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n)
        tl.store(y_ptr + i, _tanh(x), mask=i < n)


def _adaptor_check(tm, g, W, b, normalize, dtype):
    M, S = _adaptor_oracle(g, W, b, normalize, dtype)
    for beta, q in ADAPTOR_RULES:
        mask = tm.adaptor_saliency_mask(g, W, b, beta, q, normalize)
        assert mask.dtype == torch.bool and mask.shape == g.shape and mask.is_contiguous()
        _check_near_threshold(mask.reshape(g.shape[0], -1).numpy(), M, S, beta, q, dtype)


@child_only
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape,layout", ADAPTOR_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptor_mask_matches_oracle(dtype, shape, layout, normalize):
    from jsigr_fast.kernels import saliency_mask as tm

    g, W, b = adaptor_inputs(shape, dtype, normalize, lambda t: _lay(t, layout))
    _adaptor_check(tm, g, W, b, normalize, dtype)


@child_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptor_mask_module_weights_and_forms(dtype):
    """A SaliencyAdaptor's own float32 parameters on data of every dtype, no bias, a square [C, C]
    weight, and the scale-free normalisation (g and 4096 g give the same mask)."""
    from jsigr_fast.kernels import saliency_mask as tm

    torch.manual_seed(0)
    ad = SaliencyAdaptor(3)
    g = _data((2, 3, 6, 5), "contiguous", dtype, seed=5)
    _adaptor_check(tm, g, ad.conv.weight.detach(), ad.conv.bias.detach(), True, dtype)
    W, _ = _adaptor_params(3, dtype, seed=6, square=True)
    _adaptor_check(tm, g, W, None, False, dtype)
    if dtype != torch.float16:  # 4096 g overflows float16's g^2
        for q in (None, 0.5):
            a = tm.adaptor_saliency_mask(g, W, None, 0.1, q, True)
            assert torch.equal(a, tm.adaptor_saliency_mask(g * 4096.0, W, None, 0.1, q, True))


@child_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptor_tanh_is_accurate(dtype):
    """_tanh (exp-based, one formula for the interpreter and the GPU) against float64 tanh over the
    whole range, NaN and +-inf included: absolute error within a few units of the dtype."""
    import triton

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.cat([torch.linspace(-20, 20, 4001, dtype=torch.float64), torch.tensor([1e-30, -1e-30, 0.0, -0.0]),
                   torch.logspace(-14, 0, 200, dtype=torch.float64), -torch.logspace(-14, 0, 200, dtype=torch.float64),
                   torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=torch.float64)]).to(acc)
    y = torch.empty_like(x)
    _tanh_probe[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    ref = torch.tanh(x.double())
    unit = torch.finfo(acc).eps / 2
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=4 * unit, equal_nan=True)
    assert torch.equal(torch.signbit(y[:-1]), torch.signbit(x[:-1]))  # odd, -0 kept
    tiny = x.abs() < (7e-9 if acc == torch.float64 else 2e-4)  # where tanh(x) rounds to x: exactly x
    assert tiny.sum() >= 4 and torch.equal(y[tiny], x[tiny])


# ----------------------------------------------------------------------------------------------
# bool-masked squared norm and its backward
# ----------------------------------------------------------------------------------------------
_NORM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@child_only
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sq_norm_bool_and_backward(shape, layout, dtype):
    from jsigr_fast.kernels import saliency_mask as tm

    g = _data(shape, layout, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    mask = _lay(torch.rand(g.shape, generator=gen) < 0.6, layout)
    if g.numel() > 3 and g.is_contiguous():  # non-finite values where the mask is off must not leak
        mask.view(-1)[:2] = False
        g.view(-1)[0], g.view(-1)[1] = float("nan"), float("inf")
    n = g.shape[0]
    bshape = (n,) + (1,) * (g.dim() - 1)
    m64 = mask.to(torch.float64)
    g64 = torch.where(mask, g.double(), torch.zeros((), dtype=torch.float64))

    out = tm.masked_sq_norm_bool(g, mask)
    ref = (g64 * g64).reshape(n, -1).sum(1)
    assert out.dtype == dtype and out.shape == (n,)
    torch.testing.assert_close(out.double(), ref, rtol=_NORM_RTOL[dtype], atol=0)

    grad_out = torch.randn(n, generator=gen, dtype=torch.float64)
    for go in (grad_out.to(dtype), grad_out):  # grad_out in g's dtype, and float64 (cast to g's dtype first)
        got = tm.masked_sq_norm_bool_backward(go, g, mask)
        assert got.dtype == dtype and got.shape == g.shape
        assert got.is_contiguous(memory_format=_expected_format(g))
        go_t = go.to(dtype).view(bshape)
        exact = torch.where(mask, (2 * go_t) * g, torch.zeros((), dtype=dtype))  # the same two roundings
        torch.testing.assert_close(got, exact, rtol=0, atol=0, equal_nan=True)
        formula = 2 * m64 * g64 * go_t.double()
        torch.testing.assert_close(got.double(), formula, rtol=_NORM_RTOL[dtype], atol=0)


# ----------------------------------------------------------------------------------------------
# edge cases and errors
# ----------------------------------------------------------------------------------------------
@child_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(dtype):
    from jsigr_fast.kernels import saliency_mask as tm

    for shape in ((0, 5), (3, 0), (2, 0, 4)):
        g = torch.zeros(shape, dtype=dtype)
        mask = torch.zeros(shape, dtype=torch.bool)
        C = 1 if len(shape) == 2 else shape[1]
        for q in (None, 0.5):
            assert tm.gradient_saliency_mask(g, 0.1, q).shape == shape
            assert tm.threshold_mask(g, 0.1, q).shape == shape
            assert tm.adaptor_saliency_mask(g, torch.eye(C), None, 0.1, q).shape == shape
        out = tm.masked_sq_norm_bool(g, mask)
        assert out.shape == (shape[0],) and out.dtype == dtype and not out.any()
        assert tm.masked_sq_norm_bool_backward(torch.ones(shape[0], dtype=dtype), g, mask).shape == shape


@child_only
def test_quantile_keeps_exactly_floor_q_d():
    # mask_quantile=q leaves floor(q D) features per sample unpenalised, floor(q D) in exact arithmetic
    # (0.29 of 100 is 29; floor(0.29 * 100) in floating point was 28), as the reference and the C++ ops
    from jsigr_fast.kernels import saliency_mask as tm

    for D in QUANTILE_COUNT_DS:
        check_quantile_counts(tm.threshold_mask, tm.gradient_saliency_mask,
                              lambda M, w, q: tm.adaptor_saliency_mask(M, w, None, 0.5, q, normalize=False), D)


@child_only
def test_errors():
    from jsigr_fast.kernels import saliency_mask as tm

    g = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="quantile"):
        tm.gradient_saliency_mask(g, 0.1, 1.5)
    with pytest.raises(RuntimeError, match="quantile"):
        tm.threshold_mask(g, 0.1, float("nan"))
    with pytest.raises(RuntimeError, match="floating"):
        tm.threshold_mask(torch.ones(2, 5, dtype=torch.int64), 0.1)
    with pytest.raises(RuntimeError, match="batch dimension"):
        tm.gradient_saliency_mask(torch.tensor(1.0), 0.1)
    with pytest.raises(RuntimeError, match="bool"):
        tm.masked_sq_norm_bool(g, torch.ones(2, 5))
    with pytest.raises(RuntimeError, match="shape"):
        tm.masked_sq_norm_bool(g, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="grad_out"):
        tm.masked_sq_norm_bool_backward(torch.ones(3), g, torch.ones(2, 5, dtype=torch.bool))
    # the adaptor's arguments, with the C++ op's messages
    for args, pattern in adaptor_bad_arguments():
        with pytest.raises(RuntimeError, match=pattern):
            tm.adaptor_saliency_mask(*args)
