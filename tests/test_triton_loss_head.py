"""The Triton loss-head kernels (kernels/loss_head.py) against independent oracles, under TRITON_INTERPRET=1.

The checks run in a child pytest process with TRITON_INTERPRET=1 (tests/triton_testing.py says why):
``test_triton_loss_head_in_interpreter`` launches it; the child tests are skipped in the parent.

Values against the float64 oracles of tests/loss_head_oracles.py (the same ones the C++ op is held to,
with the same tolerances), derivatives against explicit float64 Jacobians, special values (±inf, NaN
logits) against ATen's ``F.cross_entropy`` / ``softmax`` in float64; rows wider than one block
(K = 4500 > 2048) take the kernels' loops. ``opcheck`` runs with the launchers registered as the
ops' CPU kernels, so the autograd and fake registrations of jsigr_fast.ops see their outputs.
"""
import os

import numpy as np
import pytest
import torch

import jsigr_fast
from loss_head_oracles import DTYPES, UNIT, _ce_oracle, _logits, _tols, _vjp_oracle, check_special_values
from triton_testing import child_only, parent_driver, ptx, ptx_test, run_in_interpreter


SHAPES = [(1, 1), (5, 1), (1, 2), (4, 7), (3, 10), (2, 33), (2, 1000), (2, 4500)]
WHICH = ["loss", "cot", "both", "none"]
OFFSETS = [1e3, -1e3, 3e4]


@parent_driver
def test_triton_loss_head_in_interpreter():
    # every child test must really run there: values and backward over their grids, large logits,
    # and 6 single tests; the only skips allowed are the two parent-only tests
    expected = len(SHAPES) * len(DTYPES) + len(WHICH) * len(DTYPES) + len(OFFSETS) * len(DTYPES) + 6
    run_in_interpreter(__file__, passed=expected, skipped=2)


@ptx_test
def test_triton_loss_head_compiles_for_sm90():
    """Both kernels compile to PTX for sm_90 without a GPU, for every dtype and every combination of
    the backward's optional cotangents (the interpreter accepts things the compiler rejects)."""
    import triton.language as tl

    from jsigr_fast.kernels import loss_head as lh

    for dt in ("fp32", "fp64", "bf16", "fp16"):
        blk = {"ACC": tl.float64 if dt == "fp64" else tl.float32, "BLOCK": 1024}
        code = ptx(lh._ce_forward_kernel, {"z_ptr": "*" + dt, "y_ptr": "*i64", "loss_ptr": "*" + dt,
                                           "cot_ptr": "*" + dt, "K": "i32"}, blk)
        assert "st.global" in code, dt
        for has_a in (False, True):
            for has_b in (False, True):
                ptx(lh._ce_backward_kernel, {"ga_ptr": "*" + dt, "gb_ptr": "*" + dt, "z_ptr": "*" + dt,
                                             "y_ptr": "*i64", "out_ptr": "*" + dt, "K": "i32"},
                    {"HAS_A": has_a, "HAS_B": has_b, **blk})


def _lh():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from jsigr_fast.kernels import loss_head

    return loss_head


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@child_only
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_match_float64_oracle(dtype, N, K):
    z, y = _logits(N, K, dtype, seed=N * 1000 + K)
    loss, cot = _lh().cross_entropy_cotangent(z, y)
    assert loss.dtype == cot.dtype == dtype and loss.shape == (N,) and cot.shape == (N, K) and cot.is_contiguous()
    el, ec = _ce_oracle(z, y)
    np.testing.assert_allclose(loss.double().numpy(), el, **_tols(dtype))
    np.testing.assert_allclose(cot.double().numpy(), ec, **_tols(dtype))
    assert (cot.double().sum(1).abs() <= 4 * K * UNIT[dtype] + 1e-12).all()


@child_only
def test_single_class_is_exactly_zero():
    for dtype in DTYPES:
        z = torch.tensor([[3.5], [-1e3], [0.0]], dtype=dtype)
        loss, cot = _lh().cross_entropy_cotangent(z, torch.zeros(3, dtype=torch.long))
        assert torch.equal(loss, torch.zeros(3, dtype=dtype)) and torch.equal(cot, torch.zeros(3, 1, dtype=dtype))


@child_only
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_are_stable(dtype, offset):
    # exp(z) overflows every dtype: the row maximum must be shifted out (tests/test_loss_head.py)
    z, y = _logits(4, 10, dtype, seed=int(abs(offset)), offset=offset)
    z[0, 3] = z[0].max() + 200
    y[0] = 3
    loss, cot = _lh().cross_entropy_cotangent(z, y)
    assert torch.isfinite(loss).all() and torch.isfinite(cot).all()
    el, ec = _ce_oracle(z, y)
    atol = 2 * z.double().abs().max().item() * (UNIT[torch.float64] if dtype == torch.float64 else UNIT[torch.float32])
    np.testing.assert_allclose(loss.double().numpy(), el, rtol=2 * UNIT[dtype], atol=atol)
    np.testing.assert_allclose(cot.double().numpy(), ec, rtol=2 * UNIT[dtype], atol=atol)


@child_only
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in numpy
def test_special_values_as_aten():
    check_special_values(_lh().cross_entropy_cotangent)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@child_only
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_explicit_jacobian(dtype, which):
    for N, K in ((3, 11), (2, 4500)):
        z, y = _logits(N, K, dtype, seed=17 + K)
        gen = torch.Generator().manual_seed(18)
        a = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype) if which in ("loss", "both") else None
        b = torch.randn(N, K, generator=gen, dtype=torch.float64).to(dtype) if which in ("cot", "both") else None
        grad = _lh().cross_entropy_cotangent_backward(a, b, z, y)
        assert grad.dtype == dtype and grad.shape == (N, K)
        expect = _vjp_oracle(z, y, a, b)
        if which == "none":
            assert torch.equal(grad, torch.zeros(N, K, dtype=dtype))
            continue
        scale = np.abs(expect).max()
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else \
            dict(rtol=2 * UNIT[dtype] if dtype != torch.float32 else 1e-5, atol=4 * UNIT[dtype] * scale + 1e-7)
        np.testing.assert_allclose(grad.double().numpy(), expect, **tol)


@child_only
def test_layouts_and_target_dtypes():
    # non-contiguous logits and cotangents, any integer target dtype: the same values as contiguous int64
    lh = _lh()
    z, y = _logits(5, 9, torch.float32, seed=3)
    big = torch.full((5, 18), 1e4)
    big[:, ::2] = z
    b = torch.randn(5, 9, generator=torch.Generator().manual_seed(4))
    a = torch.randn(5, generator=torch.Generator().manual_seed(5))
    loss, cot = lh.cross_entropy_cotangent(z, y)
    grad = lh.cross_entropy_cotangent_backward(a, b, z, y)
    for zz in (z.t().contiguous().t(), big[:, ::2]):
        assert not zz.is_contiguous()
        for yy in (y.int(), y.to(torch.int16), y.to(torch.uint8)):
            l2, c2 = lh.cross_entropy_cotangent(zz, yy)
            assert torch.equal(l2, loss) and torch.equal(c2, cot)
            g2 = lh.cross_entropy_cotangent_backward(a[::1], b.t().contiguous().t(), zz, yy)
            assert torch.equal(g2, grad)
    np.testing.assert_allclose(grad.double().numpy(), _vjp_oracle(z, y, a, b), rtol=1e-5, atol=1e-6)


@child_only
def test_empty_batch():
    lh = _lh()
    loss, cot = lh.cross_entropy_cotangent(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert loss.shape == (0,) and cot.shape == (0, 5)
    g = lh.cross_entropy_cotangent_backward(torch.zeros(0), torch.zeros(0, 5), torch.zeros(0, 5),
                                            torch.zeros(0, dtype=torch.long))
    assert g.shape == (0, 5)


@child_only
def test_errors_name_the_argument():
    lh = _lh()
    z = torch.randn(3, 5)
    long0 = torch.zeros(3, dtype=torch.long)
    cases = [
        (lambda: lh.cross_entropy_cotangent(torch.randn(3), long0), r"logits must have shape \(N, K\) with K >= 1, got \[3\]"),
        (lambda: lh.cross_entropy_cotangent(torch.randn(3, 0), long0), r"logits must have shape \(N, K\) with K >= 1"),
        (lambda: lh.cross_entropy_cotangent(torch.ones(3, 5, dtype=torch.int64), long0), "logits must be floating point"),
        (lambda: lh.cross_entropy_cotangent(z, torch.zeros(2, dtype=torch.long)), r"target must have shape \[3\]"),
        (lambda: lh.cross_entropy_cotangent(z, torch.zeros(3)), "target must be an integer tensor"),
        (lambda: lh.cross_entropy_cotangent(z, torch.zeros(3, dtype=torch.bool)), "target must be an integer tensor"),
        (lambda: lh.cross_entropy_cotangent(z, torch.tensor([0, 5, 2])), r"a target is out of range \[0, 5\)"),
        (lambda: lh.cross_entropy_cotangent(z, torch.tensor([0, -1, 2])), r"a target is out of range \[0, 5\)"),
        (lambda: lh.cross_entropy_cotangent_backward(torch.ones(2), None, z, long0), r"grad_loss must have shape \[3\]"),
        (lambda: lh.cross_entropy_cotangent_backward(None, torch.ones(3, 4), z, long0), "grad_cot must have logits' shape"),
        (lambda: lh.cross_entropy_cotangent_backward(torch.ones(3), None, z, torch.tensor([0, 7, 2])),
         r"a target is out of range"),
    ]
    for call, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            call()


@child_only
@pytest.mark.skipif(not jsigr_fast.extension_loaded(), reason="the op schemas come from the extension")
def test_opcheck_with_the_launchers_as_cpu_kernels():
    import warnings

    from jsigr_fast import ops  # noqa: F401  (the autograd and fake registrations)

    lh = _lh()
    lib = torch.library.Library("jsigr_fast", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # overriding the C++ CPU kernels is the point
            for name in lh.__all__:
                torch.library.register_kernel(f"jsigr_fast::{name}", "cpu", getattr(lh, name), lib=lib)
        O = torch.ops.jsigr_fast
        z, y = _logits(3, 5, torch.float64, seed=29)
        torch.library.opcheck(O.cross_entropy_cotangent.default, (z.clone().requires_grad_(True), y))
        torch.library.opcheck(O.cross_entropy_cotangent.default, (z.float(), y.int()))
        a, b = torch.randn(3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
        for ga, gb in ((a, b), (None, b), (a, None), (None, None)):
            torch.library.opcheck(O.cross_entropy_cotangent_backward.default, (ga, gb, z, y))
        # the final backward (no graph) runs the Triton backward kernel through the op
        zg = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(O.cross_entropy_cotangent(zg, y), zg, (a, b))
        np.testing.assert_allclose(g.numpy(), _vjp_oracle(z, y, a, b), rtol=1e-12, atol=1e-14)
    finally:
        lib._destroy()
