"""The fused loss head jsigr_fast::cross_entropy_cotangent (+ cross_entropy_cotangent_backward) against
independent oracles.

``loss[n] = logsumexp(z_n) - z_n[y_n]`` and ``cot[n] = softmax(z_n) - onehot(y_n)`` (csrc/ops.cpp,
csrc/cross_entropy_cotangent.cpp). The oracles (tests/loss_head_oracles.py) are plain Python float64
per row (max shift, math.fsum of the exponentials, logs); the derivatives are checked against explicit
float64 Jacobians written from the softmax derivative ``d p_k / d z_j = p_k (delta_kj - p_j)``, against
finite differences (gradcheck, gradgradcheck in float64) and with torch.library.opcheck.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import jsigr_fast
from jsigr_fast import ops
from jsigr_fast._extension import has_kernel
from loss_head_oracles import (DTYPES, UNIT, _ce_oracle, _logits, _softmax_row, _tols, _vjp_oracle,
                               check_special_values)

_OPS = ("cross_entropy_cotangent", "cross_entropy_cotangent_backward")
pytestmark = pytest.mark.skipif(
    not (jsigr_fast.extension_loaded() and all(hasattr(torch.ops.jsigr_fast, n) and has_kernel(n, "cpu")
                                               for n in _OPS)),
    reason=f"compiled loss-head ops not available: {jsigr_fast.extension_error() or 'older build of _C'}")
O = torch.ops.jsigr_fast


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------
# forward values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K", [(1, 1), (5, 1), (1, 2), (4, 7), (3, 10), (2, 33), (3, 1000)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_match_float64_oracle(dtype, N, K):
    z, y = _logits(N, K, dtype, seed=N * 1000 + K)
    with _OpLog() as log:
        loss, cot = ops.cross_entropy_cotangent(z, y)
    assert "jsigr_fast.cross_entropy_cotangent" in log.names  # the wrapper runs the compiled op
    assert loss.dtype == cot.dtype == dtype and loss.shape == (N,) and cot.shape == (N, K) and cot.is_contiguous()
    el, ec = _ce_oracle(z, y)
    tol = _tols(dtype)
    np.testing.assert_allclose(loss.double().numpy(), el, **tol)
    np.testing.assert_allclose(cot.double().numpy(), ec, **tol)
    # softmax - onehot: every row sums to zero up to rounding
    assert (cot.double().sum(1).abs() <= 4 * K * UNIT[dtype] + 1e-12).all()


def test_single_class_is_exactly_zero():
    for dtype in DTYPES:
        z = torch.tensor([[3.5], [-1e3], [0.0]], dtype=dtype)
        loss, cot = ops.cross_entropy_cotangent(z, torch.zeros(3, dtype=torch.long))
        assert torch.equal(loss, torch.zeros(3, dtype=dtype)) and torch.equal(cot, torch.zeros(3, 1, dtype=dtype))


@pytest.mark.parametrize("offset", [1e3, -1e3, 1e4, 3e4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_are_stable(dtype, offset):
    # exp(z) overflows every dtype here: the row maximum must be shifted out. Accuracy: logits of
    # magnitude |z| carry an absolute uncertainty of a few ulp(|z|) through logsumexp.
    z, y = _logits(4, 10, dtype, seed=int(abs(offset)), offset=offset)
    z[0, 3] = z[0].max() + 200  # one dominant class (even at bfloat16's ulp(3e4) = 128): p = 1, the rest 0
    y[0] = 3
    loss, cot = ops.cross_entropy_cotangent(z, y)
    assert torch.isfinite(loss).all() and torch.isfinite(cot).all()
    el, ec = _ce_oracle(z, y)
    zmax = z.double().abs().max().item()
    # the math runs in float (double for float64): a couple of its roundings at |z|, then one to the dtype
    atol = 2 * zmax * (UNIT[torch.float64] if dtype == torch.float64 else UNIT[torch.float32])
    np.testing.assert_allclose(loss.double().numpy(), el, rtol=2 * UNIT[dtype], atol=atol)
    np.testing.assert_allclose(cot.double().numpy(), ec, rtol=2 * UNIT[dtype], atol=atol)
    assert loss[0] == 0 or loss[0].abs() <= atol  # the dominant class is the target: CE = 0


def test_large_logits_as_accurate_as_aten():
    # log s and m are kept apart (csrc/sample_ops_kernels.h): rounding m + log s at |z| ~ 1e3 would cost
    # ~ulp(|z|) = 6e-5 of absolute accuracy in float32, 100x worse than F.cross_entropy / torch.softmax
    z, y = _logits(6, 10, torch.float32, seed=5, offset=1e3)
    el, ec = _ce_oracle(z, y)
    loss, cot = ops.cross_entropy_cotangent(z, y)
    aten_loss = F.cross_entropy(z, y, reduction="none").double().numpy()
    aten_cot = (torch.softmax(z, 1) - F.one_hot(y, 10).float()).double().numpy()
    # flash-attention style rule: at most twice ATen's error (plus float32 noise)
    assert np.abs(loss.double().numpy() - el).max() <= 2 * np.abs(aten_loss - el).max() + 1e-6
    assert np.abs(cot.double().numpy() - ec).max() <= 2 * np.abs(aten_cot - ec).max() + 1e-6


def test_special_values_as_aten():
    check_special_values(ops.cross_entropy_cotangent)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_logits(layout):
    z, y = _logits(5, 9, torch.float32, seed=3)
    if layout == "transposed":
        zz = z.t().contiguous().t()
    else:
        big = torch.full((5, 18), 1e4)
        big[:, ::2] = z
        zz = big[:, ::2]
    assert not zz.is_contiguous()
    loss, cot = ops.cross_entropy_cotangent(zz, y)
    ref_loss, ref_cot = ops.cross_entropy_cotangent(z, y)
    assert torch.equal(loss, ref_loss) and torch.equal(cot, ref_cot)
    el, ec = _ce_oracle(z, y)
    np.testing.assert_allclose(loss.double().numpy(), el, **_tols(torch.float32))
    # the backward (C++ op) sees the same values
    zg = zz.detach().requires_grad_(True)
    w = torch.randn(5, 9, generator=torch.Generator().manual_seed(4))
    (grad,) = torch.autograd.grad(ops.cross_entropy_cotangent(zg, y), zg, (torch.ones(5), w))
    np.testing.assert_allclose(grad.double().numpy(), _vjp_oracle(z, y, torch.ones(5), w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_integer_target_dtypes(tdtype):
    z, y = _logits(4, 7, torch.float64, seed=9)
    loss, cot = ops.cross_entropy_cotangent(z, y.to(tdtype))
    el, ec = _ce_oracle(z, y)
    np.testing.assert_allclose(loss.numpy(), el, **_tols(torch.float64))
    np.testing.assert_allclose(cot.numpy(), ec, **_tols(torch.float64))
    zg = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops.cross_entropy_cotangent(t, y.to(tdtype)), (zg,))


def test_empty_batch():
    loss, cot = ops.cross_entropy_cotangent(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert loss.shape == (0,) and cot.shape == (0, 5)
    g = O.cross_entropy_cotangent_backward(torch.zeros(0), torch.zeros(0, 5), torch.zeros(0, 5),
                                           torch.zeros(0, dtype=torch.long))
    assert g.shape == (0, 5)


# ------------------------------------------------------------------------------------------------
# derivatives
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["loss", "cot", "both"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_explicit_jacobian(dtype, which):
    # the final backward (no graph) runs the C++ op; a backward with create_graph runs torch ops:
    # both against the same float64 Jacobian
    N, K = 3, 11
    z, y = _logits(N, K, dtype, seed=17)
    gen = torch.Generator().manual_seed(18)
    a = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype) if which in ("loss", "both") else None
    b = torch.randn(N, K, generator=gen, dtype=torch.float64).to(dtype) if which in ("cot", "both") else None
    expect = _vjp_oracle(z, y, a, b)
    scale = np.abs(expect).max()
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else \
        dict(rtol=2 * UNIT[dtype] if dtype != torch.float32 else 1e-5, atol=4 * UNIT[dtype] * scale + 1e-7)
    for create_graph in (False, True):
        zg = z.clone().requires_grad_(True)
        loss, cot = ops.cross_entropy_cotangent(zg, y)
        outs = [o for o, w in ((loss, a), (cot, b)) if w is not None]
        ws = [w for w in (a, b) if w is not None]
        with _OpLog() as log:
            (grad,) = torch.autograd.grad(outs, zg, ws, create_graph=create_graph)
        assert ("jsigr_fast.cross_entropy_cotangent_backward" in log.names) is (not create_graph), log.names
        assert grad.dtype == dtype and grad.shape == (N, K)
        np.testing.assert_allclose(grad.detach().double().numpy(), expect, **tol)


@pytest.mark.parametrize("which", ["loss", "cot", "both", "none"])
def test_backward_op_matches_explicit_jacobian(which):
    z, y = _logits(4, 6, torch.float64, seed=19)
    gen = torch.Generator().manual_seed(20)
    a = torch.randn(4, generator=gen, dtype=torch.float64) if which in ("loss", "both") else None
    b = torch.randn(4, 6, generator=gen, dtype=torch.float64) if which in ("cot", "both") else None
    got = O.cross_entropy_cotangent_backward(a, b, z, y)
    np.testing.assert_allclose(got.numpy(), _vjp_oracle(z, y, a, b), rtol=1e-12, atol=1e-14)
    # non-contiguous cotangents and logits
    if b is not None:
        got2 = O.cross_entropy_cotangent_backward(a, b.t().contiguous().t(), z.t().contiguous().t(), y.int())
        assert torch.equal(got, got2)


@pytest.mark.parametrize("N,K", [(1, 1), (1, 3), (4, 5), (3, 17)])
def test_gradcheck_gradgradcheck(N, K):
    z, y = _logits(N, K, torch.float64, seed=N + 7 * K)
    z.requires_grad_(True)
    f = lambda t: ops.cross_entropy_cotangent(t, y)  # noqa: E731
    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradgradcheck(f, (z,))
    assert torch.autograd.gradcheck(lambda t: f(t)[0], (z,))  # one output unused: None cotangent
    assert torch.autograd.gradcheck(lambda t: f(t)[1], (z,))


def test_hessian_vector_product():
    # d^2 sum_n loss_n / dz^2 is block diagonal with blocks diag(p) - p p^T
    z, y = _logits(3, 6, torch.float64, seed=23)
    v = torch.randn(3, 6, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    zg = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ops.cross_entropy_cotangent(zg, y)[0].sum(), zg, create_graph=True)
    (hv,) = torch.autograd.grad(g, zg, v)
    for n in range(3):
        _, _, p = _softmax_row(z[n].tolist())
        p = np.array(p)
        H = np.diag(p) - np.outer(p, p)
        np.testing.assert_allclose(hv[n].numpy(), H @ v[n].numpy(), rtol=1e-12, atol=1e-14)
    # the cotangent output's Jacobian-vector product reaches the same matrix: cot = grad of the loss
    zg = z.clone().requires_grad_(True)
    (jtv,) = torch.autograd.grad(ops.cross_entropy_cotangent(zg, y)[1], zg, v)
    torch.testing.assert_close(jtv, hv, rtol=1e-12, atol=1e-14)


def test_opcheck():
    z, y = _logits(3, 5, torch.float64, seed=29)
    torch.library.opcheck(O.cross_entropy_cotangent.default, (z.clone().requires_grad_(True), y))
    torch.library.opcheck(O.cross_entropy_cotangent.default, (z.float(), y.int()))
    torch.library.opcheck(O.cross_entropy_cotangent.default, (z[:, :1].clone().requires_grad_(True), y * 0))
    a = torch.randn(3, dtype=torch.float64)
    b = torch.randn(3, 5, dtype=torch.float64)
    for ga, gb in ((a, b), (None, b), (a, None), (None, None)):
        torch.library.opcheck(O.cross_entropy_cotangent_backward.default, (ga, gb, z, y))
    torch.library.opcheck(O.cross_entropy_cotangent_backward.default, (a.float(), b.float(), z.float(), y.int()))


# ------------------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [5, -1, 1000])
def test_target_out_of_range(bad):
    z = torch.randn(3, 5)
    y = torch.tensor([0, bad, 2])
    with pytest.raises(RuntimeError, match=rf"target {bad} of sample 1 is out of range \[0, 5\)"):
        ops.cross_entropy_cotangent(z, y)
    with pytest.raises(RuntimeError, match=rf"target {bad} of sample 1 is out of range"):
        O.cross_entropy_cotangent_backward(torch.ones(3), None, z, y)


def test_bad_shapes_and_dtypes():
    z = torch.randn(3, 5)
    cases = [
        (lambda: ops.cross_entropy_cotangent(torch.randn(3), torch.zeros(3, dtype=torch.long)),
         r"logits must have shape \(N, K\) with K >= 1, got \[3\]"),
        (lambda: ops.cross_entropy_cotangent(torch.randn(3, 2, 2), torch.zeros(3, dtype=torch.long)),
         r"logits must have shape \(N, K\)"),
        (lambda: ops.cross_entropy_cotangent(torch.randn(3, 0), torch.zeros(3, dtype=torch.long)),
         r"logits must have shape \(N, K\) with K >= 1"),
        (lambda: ops.cross_entropy_cotangent(torch.ones(3, 5, dtype=torch.int64), torch.zeros(3, dtype=torch.long)),
         "logits must be floating point"),
        (lambda: ops.cross_entropy_cotangent(z, torch.zeros(2, dtype=torch.long)), r"target must have shape \[3\]"),
        (lambda: ops.cross_entropy_cotangent(z, torch.zeros(3, 1, dtype=torch.long)), r"target must have shape \[3\]"),
        (lambda: ops.cross_entropy_cotangent(z, torch.zeros(3)), "target must be an integer tensor"),
        (lambda: ops.cross_entropy_cotangent(z, torch.zeros(3, dtype=torch.bool)), "target must be an integer tensor"),
        (lambda: O.cross_entropy_cotangent_backward(torch.ones(2), None, z, torch.zeros(3, dtype=torch.long)),
         r"grad_loss must have shape \[3\]"),
        (lambda: O.cross_entropy_cotangent_backward(None, torch.ones(3, 4), z, torch.zeros(3, dtype=torch.long)),
         "grad_cot must have logits' shape"),
    ]
    for call, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            call()


# ------------------------------------------------------------------------------------------------
# the GPU kernels (csrc/cuda/cross_entropy_cotangent.cu and kernels/loss_head.py), on a GPU only
# ------------------------------------------------------------------------------------------------
def _gpu_impls():
    from importlib.util import find_spec

    return ["cuda", "triton"] if find_spec("triton") is not None else ["cuda"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", _gpu_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_kernels_match_oracles(impl, dtype):
    before = ops.gpu_kernels()
    ops.use_gpu_kernels(impl)
    try:
        for N, K in ((1, 1), (5, 10), (3, 1000), (2, 21843)):  # up to ImageNet-21k's classes
            z, y = _logits(N, K, dtype, seed=N + K)
            loss, cot = O.cross_entropy_cotangent(z.cuda(), y.cuda())
            el, ec = _ce_oracle(z, y)
            np.testing.assert_allclose(loss.cpu().double().numpy(), el, **_tols(dtype))
            np.testing.assert_allclose(cot.cpu().double().numpy(), ec, **_tols(dtype))
            gen = torch.Generator().manual_seed(K)
            a = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
            b = torch.randn(N, K, generator=gen, dtype=torch.float64).to(dtype)
            for ga, gb in ((a, b), (a, None), (None, b)):
                grad = O.cross_entropy_cotangent_backward(None if ga is None else ga.cuda(),
                                                          None if gb is None else gb.cuda(), z.cuda(), y.cuda())
                expect = _vjp_oracle(z, y, ga, gb)
                tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else \
                    dict(rtol=2 * UNIT[dtype] if dtype != torch.float32 else 1e-5,
                         atol=4 * UNIT[dtype] * np.abs(expect).max() + 1e-7)
                np.testing.assert_allclose(grad.cpu().double().numpy(), expect, **tol)
        check_special_values(lambda z, y: tuple(t.cpu() for t in O.cross_entropy_cotangent(z.cuda(), y.cuda())))
    finally:
        ops._apply_gpu_kernels(before)
