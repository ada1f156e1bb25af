"""The Triton batch-norm kernels (kernels/batch_norm.py) against the references, under TRITON_INTERPRET=1.

The checks run in a child pytest process with TRITON_INTERPRET=1 (tests/triton_testing.py says why):
``test_triton_kernels_in_interpreter`` launches it; the child tests are skipped in the parent.
Shapes are tiny (the interpreter runs each program in numpy).
"""
import os

import pytest
import torch

from jsigr_fast.reference import batch_norm_backward_ref, batch_norm_double_backward_ref, batch_norm_train_ref
from triton_testing import child_only, parent_driver, ptx, ptx_test, run_in_interpreter


CASES = [((3, 5, 4, 7), "contiguous"), ((3, 5, 4, 7), "channels_last"), ((6, 5), "contiguous"),
         ((1, 3, 2, 2), "contiguous"), ((2, 3, 37), "contiguous"), ((2, 3, 4, 5), "transposed")]


@parent_driver
def test_triton_kernels_in_interpreter():
    # every child test must really run there: the only skips allowed are the two parent-only tests
    expected = 4 * len(CASES) + 1
    run_in_interpreter(__file__, passed=expected, skipped=2)


@ptx_test
def test_triton_bn_kernels_compile_for_sm90():
    """Every mode of the reduce and apply kernels compiles to PTX for sm_90 without a GPU, for every
    dtype and both layouts (the interpreter accepts things the compiler rejects)."""
    import triton.language as tl

    from jsigr_fast.kernels import batch_norm as tb

    for dt in ("fp32", "fp64", "bf16", "fp16"):
        acc, accp = (tl.float64, "*fp64") if dt == "fp64" else (tl.float32, "*fp32")
        for rows in ((False, True) if dt == "fp32" else (False,)):
            for mode, k in tb._K.items():
                ptx(tb._bn_reduce_kernel, {"a_ptr": "*" + dt, "b_ptr": "*" + dt, "c_ptr": "*" + dt, "shift_ptr": accp,
                                           "partial_ptr": "*fp64", "M": "i32", "C": "i32", "S": "i32",
                                           "SPLITS": "i32"},
                    {"MODE": mode, "K": k, "ROWS": rows, "ACC": acc, "BLOCK": 1024})
            for mode in range(7):
                code = ptx(tb._bn_apply_kernel, {"a_ptr": "*" + dt, "b_ptr": "*" + dt, "c_ptr": "*" + dt,
                                                 "out0_ptr": "*" + dt, "out1_ptr": "*" + dt, "k_ptr": accp,
                                                 "TOTAL": "i64", "C": "i32", "S": "i32"},
                           {"MODE": mode, "ROWS": rows, "ACC": acc, "BLOCK": 1024})
                assert code.count("st.global") >= (2 if mode >= 3 else 1), (dt, rows, mode)


def _inputs(shape, layout, dtype):
    g = torch.Generator().manual_seed(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(s, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    def lay(t):
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "transposed":
            return t.transpose(2, 3).contiguous().transpose(2, 3)
        return t

    c = shape[1]
    return (lay(rnd(*shape, scale=2.0, shift=3.0)), lay(rnd(*shape)), lay(rnd(*shape)), rnd(c, scale=0.5, shift=1.0),
            rnd(c), rnd(c).to(acc), rnd(c).to(acc), rnd(c).to(acc))


@child_only
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ops_match_references(shape, layout, dtype):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from jsigr_fast.kernels import batch_norm as tb

    x, gy, u, w, b, gm, gs, al = _inputs(shape, layout, dtype)
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else {}
    got = tb.batch_norm_train(x, w, b, 1e-5)
    ref = batch_norm_train_ref(x, w, b, 1e-5)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, **tol)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    _, mean, invstd = ref
    for args in ((gy, x, w, mean, invstd, gm, gs), (gy, x, None, mean, invstd, None, None),
                 (None, x, w, mean, invstd, gm, gs)):
        expect = batch_norm_backward_ref(*((torch.zeros_like(x),) + args[1:] if args[0] is None else args))
        for a, e in zip(tb.batch_norm_backward(*args), expect):
            torch.testing.assert_close(a, e, **tol)
    for args in ((u, al, gm, gy, x, w, mean, invstd, gm, gs), (None, al, None, gy, x, None, mean, invstd, None, gs)):
        for a, e in zip(tb.batch_norm_double_backward(*args), batch_norm_double_backward_ref(*args)):
            torch.testing.assert_close(a, e, **tol)


@child_only
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_double_backward_from_grad_x_matches_the_reference_at_the_true_grad_y(shape, layout, dtype):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from jsigr_fast.kernels import batch_norm as tb

    x, gy, u, w, b, gm, gs, al = _inputs(shape, layout, dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else {}
    _, mean, invstd = batch_norm_train_ref(x, w, b, 1e-5)
    for weight, p, q in ((w, gm, gs), (None, None, None)):
        gx, gw, gb = batch_norm_backward_ref(gy, x, weight, mean, invstd, p, q)
        for cot in ((u, al, gm), (None, al, None)):
            rest = (x, weight, mean, invstd, p, q)
            got = tb.batch_norm_double_backward_from_grad_x(*cot, gx, gw, gb, *rest)
            for a, e in zip(got, batch_norm_double_backward_ref(*cot, gy, *rest)):
                torch.testing.assert_close(a, e, **tol)


@child_only
def test_bfloat16_rounds_once():
    from jsigr_fast.kernels import batch_norm as tb

    x, gy, u, w, b, *_ = _inputs((4, 3, 3, 3), "contiguous", torch.bfloat16)
    y, mean, invstd = tb.batch_norm_train(x, w, b, 1e-5)
    y32, m32, s32 = batch_norm_train_ref(x.float(), w.float(), b.float(), 1e-5)
    assert y.dtype == torch.bfloat16 and mean.dtype == torch.float32
    torch.testing.assert_close(y, y32.to(torch.bfloat16), rtol=0, atol=float(y32.abs().max()) * 2 ** -7)
    torch.testing.assert_close(mean, m32)
    torch.testing.assert_close(invstd, s32)
