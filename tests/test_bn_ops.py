"""The fused train-mode batch-norm ops against their plain-PyTorch references and ATen.

Ops: jsigr_fast::batch_norm_train / batch_norm_backward / batch_norm_double_backward (csrc/batch_norm*.cpp).
References: jsigr_fast.reference.batch_norm_*_ref, themselves checked here against F.batch_norm and
against autograd (so the closed-form double backward is tested against the derivative of the backward).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast import ops
from jsigr_fast.reference import batch_norm_backward_ref, batch_norm_double_backward_ref, batch_norm_train_ref
from oracles import DispatchedOps, graph_nodes
from bn_oracles import CASES, _assert_all_close, _inputs, check_double_backward_from_grad_x

pytestmark = pytest.mark.skipif(not jsigr_fast.extension_loaded(),
                                reason=f"compiled extension not loaded: {jsigr_fast.extension_error()}")
O = torch.ops.jsigr_fast

# ----------------------------------------------------------------------------------------------
# the references themselves
# ----------------------------------------------------------------------------------------------
def test_reference_forward_is_f_batch_norm():
    d = _inputs((3, 4, 2, 3), "contiguous")
    y, mean, invstd = batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5)
    torch.testing.assert_close(y, F.batch_norm(d["x"], None, None, d["w"], d["b"], True, 0.1, 1e-5), rtol=1e-13, atol=0)
    torch.testing.assert_close(mean, d["x"].mean((0, 2, 3)), rtol=1e-13, atol=0)
    torch.testing.assert_close(invstd, (d["x"].var((0, 2, 3), unbiased=False) + 1e-5).rsqrt(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("affine", [True, False])
def test_reference_backward_and_double_backward_are_the_derivatives(affine):
    # backward_ref = VJP of forward_ref (autograd), double_backward_ref = VJP of backward_ref (autograd)
    d = _inputs((3, 4, 2, 3), "contiguous", affine=affine)
    x = d["x"].requires_grad_(True)
    w = d["w"].requires_grad_(True) if affine else None
    y, mean, invstd = batch_norm_train_ref(x, w, d["b"], 1e-5)
    wrt = [x] + ([w] if affine else [])
    auto = torch.autograd.grad((y, mean, invstd), wrt, (d["gy"], d["gm"], d["gs"]))
    mine = batch_norm_backward_ref(d["gy"], x.detach(), d["w"], mean.detach(), invstd.detach(), d["gm"], d["gs"])
    _assert_all_close(auto, [mine[0]] + ([mine[1]] if affine else []), rtol=1e-12, atol=1e-12)

    ins = [d["gy"], x.detach(), d["w"], mean.detach(), invstd.detach(), d["gm"], d["gs"]]
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in ins]
    outs = batch_norm_backward_ref(*leaves)
    present = [t for t in leaves if t is not None]
    auto = torch.autograd.grad(outs, present, (d["u"], d["alpha"], d["beta"]))
    closed = batch_norm_double_backward_ref(d["u"], d["alpha"], d["beta"], *ins)
    closed = [c for c, t in zip(closed, leaves) if t is not None]
    _assert_all_close(auto, closed, rtol=1e-11, atol=1e-11)


# ----------------------------------------------------------------------------------------------
# values: kernels vs references, every layout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward_double_backward_values(shape, layout, dtype):
    d = _inputs(shape, layout, dtype)
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else {}
    y, mean, invstd = O.batch_norm_train(d["x"], d["w"], d["b"], 1e-5)
    ref = batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5)
    _assert_all_close((y, mean, invstd), ref, **tol)
    # outputs keep x's layout when it is channels-last, else contiguous
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last if y.dim() == 4 else torch.channels_last_3d)
    else:
        assert y.is_contiguous()

    args = (d["x"], d["w"], mean, invstd)
    _assert_all_close(O.batch_norm_backward(d["gy"], *args, d["gm"], d["gs"]),
                      batch_norm_backward_ref(d["gy"], *args, d["gm"], d["gs"]), **tol)
    _assert_all_close(O.batch_norm_backward(d["gy"], *args, None, None),
                      batch_norm_backward_ref(d["gy"], *args), **tol)
    _assert_all_close(O.batch_norm_backward(None, *args, d["gm"], d["gs"]),
                      batch_norm_backward_ref(torch.zeros_like(d["gy"]), *args, d["gm"], d["gs"]), **tol)
    full = (d["u"], d["alpha"], d["beta"], d["gy"], d["x"], d["w"], mean, invstd, d["gm"], d["gs"])
    _assert_all_close(O.batch_norm_double_backward(*full), batch_norm_double_backward_ref(*full), **tol)
    sparse = (None, d["alpha"], None, d["gy"], d["x"], None, mean, invstd, None, d["gs"])
    _assert_all_close(O.batch_norm_double_backward(*sparse), batch_norm_double_backward_ref(*sparse), **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_aten_and_large_mean(dtype):
    # mean/std = 1e3: the two-pass, shifted variance keeps float32 exact where E[x^2] - E[x]^2 would not
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64) + 1000.0).to(dtype)
    y, mean, invstd = O.batch_norm_train(x, None, None, 1e-5)
    torch.testing.assert_close(y, F.batch_norm(x.double(), None, None, None, None, True, 0.1, 1e-5).to(dtype),
                               **({"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {}))
    var = x.double().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(invstd.double(), (var + 1e-5).rsqrt(), rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_flash_attention_rule(dtype, layout):
    # |fused - ref32| <= 2 |torch_lowp - ref32| + tiny atol, for every output of every op, where
    # ref32 = reference on the float32 upcast and torch_lowp = ATen / autograd run in the low dtype.
    d = _inputs((4, 6, 5, 5), layout, dtype, seed=5)
    f32 = {k: (v.float() if v is not None else None) for k, v in d.items()}
    eps = 1e-5

    def check(got, ref32, lowp, what):
        for i, (a, r, p) in enumerate(zip(got, ref32, lowp)):
            err = (a.float() - r.float()).abs().max().item()
            base = (p.float() - r.float()).abs().max().item()
            atol = 1e-3 * r.float().abs().max().item() + 1e-6
            assert err <= 2 * base + atol, f"{what} output {i}: |fused-ref32| {err:.3g} > 2*{base:.3g} + {atol:.3g}"

    got = O.batch_norm_train(d["x"], d["w"], d["b"], eps)
    ref32 = batch_norm_train_ref(f32["x"], f32["w"], f32["b"], eps)
    lowp_y = F.batch_norm(d["x"], None, None, d["w"], d["b"], True, 0.1, eps)
    lowp_stats = torch.ops.aten.native_batch_norm(d["x"], d["w"], d["b"], None, None, True, 0.1, eps)
    check(got, ref32, (lowp_y, lowp_stats[1], lowp_stats[2]), "forward")

    _, mean, invstd = got
    # autograd of ATen's batch norm in the low dtype: first and second derivatives
    x = d["x"].clone().requires_grad_(True)
    w = d["w"].clone().requires_grad_(True)
    gy = d["gy"].clone().requires_grad_(True)
    with torch.enable_grad():
        y = F.batch_norm(x, None, None, w, d["b"], True, 0.1, eps)
        gx_l, gw_l = torch.autograd.grad(y, (x, w), gy, create_graph=True)
        dgy_l, dx_l, dw_l = torch.autograd.grad(gx_l, (gy, x, w), d["u"])
    got_b = O.batch_norm_backward(d["gy"], d["x"], d["w"], mean, invstd, None, None)
    ref_b = batch_norm_backward_ref(f32["gy"], f32["x"], f32["w"], ref32[1], ref32[2])
    check(got_b[:2], ref_b[:2], (gx_l, gw_l), "backward")
    # the double backward as the chain sees it (total derivative, through mean and invstd)
    xf = f32["x"].clone().requires_grad_(True)
    wf = f32["w"].clone().requires_grad_(True)
    gyf = f32["gy"].clone().requires_grad_(True)
    with torch.enable_grad():
        yf, mf, sf = batch_norm_train_ref(xf, wf, f32["b"], eps)
        gxf = batch_norm_backward_ref(gyf, xf, wf, mf, sf)[0]
        ref_dd = torch.autograd.grad(gxf, (gyf, xf, wf), f32["u"])
    xk = d["x"].clone().requires_grad_(True)
    wk = d["w"].clone().requires_grad_(True)
    gyk = d["gy"].clone().requires_grad_(True)
    with torch.enable_grad():
        yk = ops.batch_norm(xk, None, None, wk, d["b"], True, 0.1, eps)
        (gxk,) = torch.autograd.grad(yk, xk, gyk, create_graph=True)
        got_dd = torch.autograd.grad(gxk, (gyk, xk, wk), d["u"])
    check(got_dd, ref_dd, (dgy_l, dx_l, dw_l), "double backward")


# ----------------------------------------------------------------------------------------------
# derivatives: gradcheck / gradgradcheck (float64), opcheck
# ----------------------------------------------------------------------------------------------
GRAD_CASES = [((3, 2, 2, 3), "contiguous"), ((2, 3, 2, 2), "channels_last"), ((4, 3), "contiguous"),
              ((1, 2, 3, 1), "contiguous"), ((3, 2, 1, 1), "contiguous")]


# Each op twice: called as the registered op (torch.library's autograd wrapper around the formulas) and
# through its autograd.Function (ops.BatchNormTrain & co., the same formulas without the wrapper, which
# ops.batch_norm and the fused backend call).
ENTRIES = {"op": (lambda: O.batch_norm_train, lambda: O.batch_norm_backward, lambda: O.batch_norm_double_backward),
           "function": (lambda: ops.BatchNormTrain.apply, lambda: ops.BatchNormBackward.apply,
                        lambda: ops.BatchNormDoubleBackward.apply)}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("shape,layout", GRAD_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_gradcheck_gradgradcheck(shape, layout, affine, entry):
    d = _inputs(shape, layout, affine=affine)
    x = d["x"].requires_grad_(True)
    params = (d["w"].requires_grad_(True), d["b"].requires_grad_(True)) if affine else ()
    train = ENTRIES[entry][0]()

    def f(x, *p):
        return train(x, *(p if affine else (None, None)), 1e-5)

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("shape,layout", GRAD_CASES[:2])
def test_backward_and_double_backward_gradcheck(shape, layout, entry):
    _, backward, double_backward = (e() for e in ENTRIES[entry])
    d = _inputs(shape, layout)
    _, mean, invstd = batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5)
    ins = [t.clone().requires_grad_(True) for t in (d["gy"], d["x"], d["w"], mean, invstd, d["gm"], d["gs"])]
    assert torch.autograd.gradcheck(backward, ins)
    assert torch.autograd.gradgradcheck(backward, ins)  # third order: through the reference
    ins2 = [d["u"].clone().requires_grad_(True), d["alpha"].clone().requires_grad_(True), None] + ins
    assert torch.autograd.gradcheck(double_backward, ins2)


# ----------------------------------------------------------------------------------------------
# batch_norm_backward keeps its output grad_x, not its input grad_y, for the double backward
# (ops.BN_REBUILD_GRAD_Y): grad_y is rebuilt from grad_x, which the layer before keeps anyway
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("stats_grads", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_rebuild_grad_y_inverts_the_backward(shape, layout, stats_grads, affine):
    # oracle: the grad_y the backward was given (float64, the reference backward's outputs)
    d = _inputs(shape, layout, affine=affine)
    _, mean, invstd = batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5)
    gm, gs = (d["gm"], d["gs"]) if stats_grads else (None, None)
    gx, gw, gb = batch_norm_backward_ref(d["gy"], d["x"], d["w"], mean, invstd, gm, gs)
    got = ops.rebuild_grad_y(gx, gw, gb, d["x"], d["w"], mean, invstd, gm, gs)
    torch.testing.assert_close(got, d["gy"], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stats_grads", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_double_backward_from_grad_x_is_the_double_backward_at_the_true_grad_y(shape, layout, dtype, stats_grads,
                                                                                affine):
    # oracle: the closed-form reference (checked against autograd above) given the grad_y the backward was given;
    # the op sees only that backward's outputs (the reference's, not our kernel's)
    d = _inputs(shape, layout, dtype, affine=affine)
    _, mean, invstd = batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5)
    gm, gs = (d["gm"], d["gs"]) if stats_grads else (None, None)
    for cot in ((d["u"], d["alpha"], d["beta"]), (None, d["alpha"], None), (d["u"], None, None),
                (None, None, d["beta"])):
        got = check_double_backward_from_grad_x(O.batch_norm_double_backward_from_grad_x, d, mean, invstd, cot,
                                                d["w"], gm, gs)
        if layout == "channels_last":  # both x-shaped outputs keep x's layout, as the op given grad_y
            fmt = torch.channels_last if d["x"].dim() == 4 else torch.channels_last_3d
            assert all(t.is_contiguous(memory_format=fmt) for t in got[:2])


def test_double_backward_from_grad_x_low_precision_flash_attention_rule():
    # |op - ref32| <= 2 |plain - ref32| + tiny atol, plain = ATen's batch norm differentiated twice in bfloat16;
    # the op gets the bfloat16 grad_x of our backward (what the fused backend keeps) and its float32 [C] outputs
    d = _inputs((4, 6, 5, 5), "channels_last", torch.bfloat16, seed=5)
    f32 = {k: (v.float() if v is not None else None) for k, v in d.items()}
    x, w, gy = (d[k].clone().requires_grad_(True) for k in ("x", "w", "gy"))
    with torch.enable_grad():
        gx_l = torch.autograd.grad(F.batch_norm(x, None, None, w, d["b"], True, 0.1, 1e-5), x, gy,
                                   create_graph=True)[0]
        plain = torch.autograd.grad(gx_l, (gy, x), d["u"])
    _, mean, invstd = O.batch_norm_train(d["x"], d["w"], d["b"], 1e-5)
    gx, gw, gb = O.batch_norm_backward(d["gy"], d["x"], d["w"], mean, invstd, None, None)
    got = O.batch_norm_double_backward_from_grad_x(d["u"], None, None, gx, gw, gb, d["x"], d["w"], mean, invstd,
                                                   None, None)
    xf, wf, gyf = (f32[k].clone().requires_grad_(True) for k in ("x", "w", "gy"))
    with torch.enable_grad():  # the total derivative, as the chain sees it (through mean and invstd)
        yf, mf, sf = batch_norm_train_ref(xf, wf, f32["b"], 1e-5)
        ref = torch.autograd.grad(batch_norm_backward_ref(gyf, xf, wf, mf, sf)[0], (gyf, xf), f32["u"])
    # the op's d_x is the partial derivative (mean, invstd held): add the statistics' part as the chain does
    stats = torch.autograd.grad(batch_norm_train_ref(xf, wf, f32["b"], 1e-5)[1:], xf, (got[3], got[4]))[0]
    for a, r, p in ((got[0], ref[0], plain[0]), (got[1].float() + stats, ref[1], plain[1])):
        err, base = (a.float() - r).abs().max().item(), (p.float() - r).abs().max().item()
        assert err <= 2 * base + 1e-3 * r.abs().max().item() + 1e-6, (err, base)


def test_the_step_s_final_backward_runs_the_double_backward_from_grad_x(monkeypatch):
    # a create-graph VJP g through a batch norm, then a plain backward of <g, u>: that backward takes the
    # double backward straight from grad_x (one op, no rebuild_grad_y), values equal to keeping grad_y's
    monkeypatch.setitem(ops.BN_REBUILD_GRAD_Y, "cpu", True)
    d = _inputs((4, 5, 3, 3), "channels_last")

    def penalty_grads():
        x, w = d["x"].clone().requires_grad_(True), d["w"].clone().requires_grad_(True)
        with torch.enable_grad():
            y = ops.batch_norm(x, None, None, w, d["b"], True, 0.1, 1e-5)
            (g,) = torch.autograd.grad(y, x, d["gy"], create_graph=True)
            with DispatchedOps() as seen:
                grads = torch.autograd.grad((g * d["u"]).sum(), (x, w))
        return grads, seen.names

    got, names = penalty_grads()
    assert names.count("jsigr_fast.batch_norm_double_backward_from_grad_x.default") == 1
    assert "jsigr_fast.batch_norm_double_backward.default" not in names
    monkeypatch.setitem(ops.BN_REBUILD_GRAD_Y, "cpu", False)
    kept, names = penalty_grads()
    assert "jsigr_fast.batch_norm_double_backward.default" in names
    _assert_all_close(got, kept, rtol=1e-11, atol=1e-11)


def test_rebuild_grad_y_of_a_bfloat16_activation_holds_one_float32_temporary_less():
    # The rebuild computes in float32 (mean's dtype) for a bf16 activation; its second step runs in place, so
    # the call's peak allocation is 2 float32 activations (its result, and the float32 copy of x the CPU's
    # mixed-dtype addcmul makes), not 3 (measured from the profiler's allocation events), and its values are
    # still the rebuild formula's, in float32.
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from bench_memory import _allocation_events, allocation_peak

    from jsigr_fast.reference import _bn_view

    gen = torch.Generator().manual_seed(0)
    x, gx = (torch.randn(4, 8, 16, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    w, mean, invstd = (torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen),
                       torch.rand(8, generator=gen) + 0.5)
    gw, gb = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = ops.rebuild_grad_y(gx, gw, gb, x, w, mean, invstd)
    peak, _ = allocation_peak(_allocation_events(prof))
    assert got.dtype == torch.float32
    assert peak <= 2.1 * x.numel() * 4, peak / (x.numel() * 4)
    _, shape, m = _bn_view(x)
    ws = w * invstd
    slope = gw / m * invstd
    expected = ((gb / m - mean * slope).reshape(shape) + x.float() * slope.reshape(shape)
                + gx.float() / ws.reshape(shape))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _backward_graph(d, weight, *, rebuild, monkeypatch):
    """batch_norm_backward on a grad_y with a history (gy = 2 * leaf), recorded; returns the outputs, the
    leaves and a weak reference to grad_y (dropped here: only the graph can keep it alive)."""
    import gc
    import weakref

    monkeypatch.setitem(ops.BN_REBUILD_GRAD_Y, "cpu", rebuild)
    _, mean, invstd = batch_norm_train_ref(d["x"], weight, d["b"], 1e-5)
    leaf = d["gy"].clone().requires_grad_(True)
    x, w = d["x"].clone().requires_grad_(True), weight.clone().requires_grad_(True)
    gy = leaf * 2
    outs = O.batch_norm_backward(gy, x, w, mean, invstd, None, None)
    ref = weakref.ref(gy)
    del gy
    gc.collect()
    return outs, (leaf, x, w, mean, invstd), ref


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_double_backward_keeps_grad_x_not_grad_y(layout, monkeypatch):
    # the graph of the backward no longer holds grad_y (the memory it saves), and the double backward
    # through the rebuilt grad_y equals the closed-form reference's on the true grad_y
    d = _inputs((3, 5, 4, 7), layout)
    for rebuild in (False, True):
        (gx, gw, gb), (leaf, x, w, mean, invstd), alive = _backward_graph(d, d["w"], rebuild=rebuild,
                                                                           monkeypatch=monkeypatch)
        assert (alive() is not None) == (not rebuild)
        got = torch.autograd.grad((gx, gw), (leaf, x, w), (d["u"], d["alpha"]))
        dgy, dx, dw, *_ = batch_norm_double_backward_ref(d["u"], d["alpha"], None, 2 * d["gy"], d["x"], d["w"],
                                                          mean, invstd)
        # x reaches the backward directly and through no statistics here (mean, invstd passed as constants)
        _assert_all_close(got, (2 * dgy, dx, dw), rtol=1e-11, atol=1e-11)


def test_a_zero_weight_channel_keeps_grad_y(monkeypatch):
    # weight 0 (zero-init residual BN): grad_x is 0 there and says nothing of grad_y, whose sum against
    # the double backward's cotangent is that channel's weight gradient -> grad_y is kept, values exact
    d = _inputs((3, 5, 4, 7), "contiguous")
    w = d["w"].clone()
    w[2] = 0
    (gx, gw, gb), (leaf, x, wl, mean, invstd), alive = _backward_graph(d, w, rebuild=True, monkeypatch=monkeypatch)
    assert alive() is not None
    got = torch.autograd.grad((gx,), (leaf, x, wl), (d["u"],))
    dgy, dx, dw, *_ = batch_norm_double_backward_ref(d["u"], None, None, 2 * d["gy"], d["x"], w, mean, invstd)
    assert dw[2].abs() > 1e-3
    _assert_all_close(got, (2 * dgy, dx, dw), rtol=1e-11, atol=1e-11)


def test_third_order_through_the_rebuilt_grad_y(monkeypatch):
    # gradgradcheck (finite differences of the double backward) with the rebuild on: the rebuilt grad_y
    # carries grad_y's own derivatives (ops._GraphPlace), not the rebuild formula's
    calls = []
    real = ops.rebuild_grad_y
    monkeypatch.setattr(ops, "rebuild_grad_y", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setitem(ops.BN_REBUILD_GRAD_Y, "cpu", True)
    d = _inputs((3, 2, 2, 3), "contiguous")
    _, mean, invstd = batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5)
    ins = [t.clone().requires_grad_(True) for t in (d["gy"], d["x"], d["w"], mean, invstd, d["gm"], d["gs"])]
    assert torch.autograd.gradgradcheck(O.batch_norm_backward, ins)
    assert calls, "the rebuild did not run"


def test_opcheck():
    d = _inputs((3, 2, 2, 3), "contiguous")
    dc = _inputs((2, 3, 2, 2), "channels_last")
    _, mean, invstd = batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5)
    _, mean_c, invstd_c = batch_norm_train_ref(dc["x"], dc["w"], dc["b"], 1e-5)
    rg = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    torch.library.opcheck(O.batch_norm_train.default, (rg(d["x"]), rg(d["w"]), rg(d["b"]), 1e-5))
    torch.library.opcheck(O.batch_norm_train.default, (rg(dc["x"]), None, None, 1e-5))
    torch.library.opcheck(O.batch_norm_backward.default,
                          (rg(d["gy"]), rg(d["x"]), rg(d["w"]), rg(mean), rg(invstd), rg(d["gm"]), None))
    torch.library.opcheck(O.batch_norm_backward.default, (None, dc["x"], None, mean_c, invstd_c, dc["gm"], dc["gs"]))
    torch.library.opcheck(O.batch_norm_double_backward.default,
                          (rg(d["u"]), rg(d["alpha"]), None, rg(d["gy"]), rg(d["x"]), rg(d["w"]), rg(mean),
                           rg(invstd), None, rg(d["gs"])))
    gx, gw, gb = batch_norm_backward_ref(dc["gy"], dc["x"], dc["w"], mean_c, invstd_c, dc["gm"], None)
    # no derivative (the fused backend calls it where no graph is recorded): no requires_grad inputs
    torch.library.opcheck(O.batch_norm_double_backward_from_grad_x.default,
                          (dc["u"], None, dc["beta"], gx, gw, gb, dc["x"], dc["w"], mean_c, invstd_c, dc["gm"], None))


# ----------------------------------------------------------------------------------------------
# the F.batch_norm-compatible entry point: running statistics exactly as nn.BatchNorm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_running_stats_match_batchnorm_module(momentum, dtype):
    # outputs to rounding, running statistics bit for bit (momentum=None: cumulative average)
    torch.manual_seed(0)
    native = nn.BatchNorm2d(5, momentum=momentum).to(dtype).train()
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5)
        native.bias.uniform_(-0.5, 0.5)
    fused = nn.BatchNorm2d(5, momentum=momentum).to(dtype).train()
    fused.load_state_dict(native.state_dict())
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else {}
    for step in range(3):
        x = torch.randn(4, 5, 3, 3, dtype=dtype) * (step + 1) + step
        from jsigr_fast.fused import fused_batch_norm
        with fused_batch_norm():
            y = fused(x)
        torch.testing.assert_close(y, native(x), **tol)
    for k, v in native.state_dict().items():  # running statistics: bit-identical
        assert torch.equal(fused.state_dict()[k], v), k
    assert int(fused.num_batches_tracked) == 3


def test_frozen_running_stats_are_not_touched():
    from jsigr_fast.batchnorm import frozen_running_stats
    from jsigr_fast.fused import fused_batch_norm
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).double().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with frozen_running_stats(m), fused_batch_norm():
        m(torch.randn(4, 2, 5, 5, dtype=torch.float64)).sum().backward()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_running_stats_with_batch_and_instance_norm_restores_both():
    # one walk of the module tree finds both kinds: batch norm's flag and instance norm's buffers,
    # untouched inside and restored (the same objects) afterwards; an eval-mode layer is left alone
    from jsigr_fast.batchnorm import frozen_running_stats
    inorm = nn.InstanceNorm2d(3, track_running_stats=True)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), inorm, nn.BatchNorm2d(3).eval()).double().train()
    m[3].eval()
    mean, var = inorm.running_mean, inorm.running_var
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with frozen_running_stats(m):
        assert not m[1].track_running_stats and inorm.running_mean is None and m[3].track_running_stats
        m(torch.randn(4, 2, 5, 5, dtype=torch.float64)).sum().backward()
    assert m[1].track_running_stats and inorm.running_mean is mean and inorm.running_var is var
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_running_stats_walks_every_module_once():
    # its walk of the module tree (one Python frame, not modules()'s nested generators) reaches the batch
    # norms modules() reaches: nested, shared between parents, behind an empty (None) submodule slot
    from jsigr_fast.batchnorm import _walk, frozen_running_stats
    shared = nn.BatchNorm2d(3)
    inner = nn.Sequential(nn.Conv2d(3, 3, 1), shared)
    inner.register_module("empty", None)
    m = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Sequential(inner, nn.Sequential(shared)), shared, nn.BatchNorm2d(3))
    assert _walk(m) == list(m.modules())
    with frozen_running_stats(m):
        assert not shared.track_running_stats and not m[3].track_running_stats
    assert shared.track_running_stats and m[3].track_running_stats


def test_entry_point_falls_back_for_eval_and_checks_batch_size():
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    torch.testing.assert_close(ops.batch_norm(x, rm, rv, training=False), F.batch_norm(x, rm, rv, training=False),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ops.batch_norm(torch.randn(1, 4, 1, 1), None, None, training=True)


# ----------------------------------------------------------------------------------------------
# vmap (is_grads_batched), threads, the generic (non-AVX2) kernel build, errors
# ----------------------------------------------------------------------------------------------
def test_vmap_and_batched_vjp():
    d = _inputs((4, 3, 2, 3), "contiguous")
    xs = torch.stack([d["x"], d["gy"]])
    got = torch.vmap(lambda t: O.batch_norm_train(t, d["w"], d["b"], 1e-5))(xs)
    _assert_all_close(got, [torch.stack(t) for t in zip(*[batch_norm_train_ref(t, d["w"], d["b"], 1e-5) for t in xs])],
                      rtol=1e-12, atol=1e-12)
    # is_grads_batched vmaps the backward op; the result keeps its graph for the double backward
    x = d["x"].clone().requires_grad_(True)
    head = torch.randn(18, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cot = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.enable_grad():
        z = torch.tanh(ops.batch_norm(x, None, None, d["w"], d["b"], True)).flatten(1) @ head
        gb = torch.autograd.grad(z, x, cot, is_grads_batched=True, create_graph=True)[0]
        loops = torch.stack([torch.autograd.grad(z, x, c, create_graph=True)[0] for c in cot])
    torch.testing.assert_close(gb, loops, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(gb)
    torch.testing.assert_close(torch.autograd.grad((gb * w).sum(), x, retain_graph=True)[0],
                               torch.autograd.grad((loops * w).sum(), x)[0],
                               rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape,layout", [((16, 9, 16, 16), "contiguous"), ((64, 3, 16, 16), "channels_last")])
def test_parallel_paths_with_two_threads(shape, layout):
    # channels split across threads (NCHW), rows split across threads with per-thread partial sums
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        d = _inputs(shape, layout)
        y, mean, invstd = O.batch_norm_train(d["x"], d["w"], d["b"], 1e-5)
        _assert_all_close((y, mean, invstd), batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5), rtol=1e-11,
                          atol=1e-11)
        full = (d["u"], d["alpha"], d["beta"], d["gy"], d["x"], d["w"], mean, invstd, d["gm"], d["gs"])
        _assert_all_close(O.batch_norm_double_backward(*full), batch_norm_double_backward_ref(*full), rtol=1e-10,
                          atol=1e-10)
    finally:
        torch.set_num_threads(before)


_GENERIC_SCRIPT = r"""
import torch, jsigr_fast
from jsigr_fast.reference import batch_norm_train_ref, batch_norm_double_backward_ref
assert torch.ops.jsigr_fast.batch_norm_cpu_isa() == "generic", torch.ops.jsigr_fast.batch_norm_cpu_isa()
g = torch.Generator().manual_seed(0)
for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 1e-5)):
    for cl in (False, True):
        x = torch.randn(3, 5, 4, 7, generator=g, dtype=dtype) * 2 + 3
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        w, b, u, gy = torch.randn(5, dtype=dtype), torch.randn(5, dtype=dtype), torch.randn_like(x), torch.randn_like(x)
        y, m, s = torch.ops.jsigr_fast.batch_norm_train(x, w, b, 1e-5)
        for a, e in zip((y, m, s), batch_norm_train_ref(x, w, b, 1e-5)):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)
        args = (u, None, None, gy, x, w, m, s, None, None)
        for a, e in zip(torch.ops.jsigr_fast.batch_norm_double_backward(*args), batch_norm_double_backward_ref(*args)):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)
print("ok")
"""


def test_generic_kernel_build_in_subprocess():
    # ATEN_CPU_CAPABILITY=default forces the portable (non-AVX2) build of the kernels
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _GENERIC_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_errors_name_the_problem():
    x = torch.randn(3, 4, 2, 2)
    with pytest.raises(RuntimeError, match="weight must have shape \\[4\\]"):
        O.batch_norm_train(x, torch.ones(3), None, 1e-5)
    with pytest.raises(RuntimeError, match="x must be floating point"):
        O.batch_norm_train(torch.ones(3, 4, dtype=torch.int64), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="x must have shape"):
        O.batch_norm_train(torch.ones(3), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="at least one value per channel"):
        O.batch_norm_train(torch.ones(0, 4, 2, 2), None, None, 1e-5)
    m, s = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="grad_y must have x's shape"):
        O.batch_norm_backward(torch.ones(3, 4, 2, 1), x, None, m, s, None, None)
    with pytest.raises(RuntimeError, match="mean must have dtype"):
        O.batch_norm_backward(x, x, None, m.double(), s, None, None)
    with pytest.raises(RuntimeError, match="grad_weight must have shape \\[4\\]"):
        O.batch_norm_double_backward_from_grad_x(None, None, None, x, m[:3], m, x, None, m, s, None, None)
    with pytest.raises(RuntimeError, match="grad_x must have x's shape"):
        O.batch_norm_double_backward_from_grad_x(None, None, None, x[:2], m, m, x, None, m, s, None, None)


# ----------------------------------------------------------------------------------------------
# CUDA (skipped on CPU-only machines): the CUDA kernels (csrc/cuda/batch_norm.cu, or the Triton
# kernels registered in their place) against the same references
# ----------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_ops_match_references(shape, layout, dtype):
    d = {k: (v.cuda() if v is not None else None) for k, v in _inputs(shape, layout, dtype).items()}
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else {}
    got = O.batch_norm_train(d["x"], d["w"], d["b"], 1e-5)
    _assert_all_close(got, batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5), **tol)
    _, mean, invstd = got
    args = (d["x"], d["w"], mean, invstd)
    _assert_all_close(O.batch_norm_backward(d["gy"], *args, d["gm"], d["gs"]),
                      batch_norm_backward_ref(d["gy"], *args, d["gm"], d["gs"]), **tol)
    full = (d["u"], d["alpha"], d["beta"], d["gy"], d["x"], d["w"], mean, invstd, d["gm"], d["gs"])
    _assert_all_close(O.batch_norm_double_backward(*full), batch_norm_double_backward_ref(*full), **tol)
    sparse = (None, d["alpha"], None, d["gy"], d["x"], None, mean, invstd, None, d["gs"])
    _assert_all_close(O.batch_norm_double_backward(*sparse), batch_norm_double_backward_ref(*sparse), **tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_forward(dtype):
    d = _inputs((8, 6, 7, 7), "contiguous", dtype, seed=5)
    x, w, b = d["x"].cuda(), d["w"].cuda(), d["b"].cuda()
    got = O.batch_norm_train(x, w, b, 1e-5)
    ref = batch_norm_train_ref(x.float(), w.float(), b.float(), 1e-5)
    lowp = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    err = (got[0].float() - ref[0]).abs().max().item()
    assert err <= 2 * (lowp.float() - ref[0]).abs().max().item() + 1e-3 * ref[0].abs().max().item()


@pytest.mark.gpu
@needs_cuda
def test_cuda_fused_backend_equals_reference():
    import copy

    from jsigr_fast.testing import tiny_input, tiny_model
    model, x = tiny_model("residual_bn").cuda(), tiny_input("residual_bn").cuda()
    y = torch.arange(x.shape[0], device="cuda") % 4
    out = []
    for backend in ("reference", "fused"):
        m = copy.deepcopy(model)
        loss = jsigr_fast.loss(m, x, y, backend=backend, generator=torch.Generator("cuda").manual_seed(0))
        out.append([loss] + list(torch.autograd.grad(loss, list(m.parameters()))))
    scale = max(g.abs().max().item() for g in out[0][1:])
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12 * scale)


# ----------------------------------------------------------------------------------------------
# the rebuild checks of one block read together (ops.rebuild_checks_together): one host read
# ----------------------------------------------------------------------------------------------
def _bn_chain_vjp(weights, x):
    """x through batch norms with the given weights (tanh between), then the create-graph input gradient
    of a fixed cotangent and the gradient of its square in the weights: the double backward."""
    ws = [w.clone().requires_grad_(True) for w in weights]
    h = x.clone().requires_grad_(True)
    out = h
    for w in ws:
        out = torch.tanh(ops.batch_norm(out, None, None, w, None, True))
    cot = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (g,) = torch.autograd.grad(out, h, cot, create_graph=True)
    return g, torch.autograd.grad((g * g).sum(), ws)


@pytest.mark.parametrize("zero_channel", [False, True])
def test_rebuild_checks_of_a_block_are_read_once(zero_channel, monkeypatch):
    # oracle: the same chain with grad_y kept everywhere (rebuild off), float64; the decisions per batch
    # norm (a zero weight keeps grad_y, the others rebuild) as each backward node reports them
    monkeypatch.setitem(ops.BN_REBUILD_GRAD_Y, "cpu", True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=gen)
    weights = [torch.rand(3, dtype=torch.float64, generator=gen) + 0.5 for _ in range(4)]
    if zero_channel:
        weights[1][2] = 0
    with ops.rebuild_checks_together(), DispatchedOps() as together:
        g, dws = _bn_chain_vjp(weights, x)
    nodes = [n for n in graph_nodes(g) if type(n).__name__ == "BatchNormBackwardBackward"]
    assert sorted(n.rebuild for n in nodes) == ([False] + [True] * 3 if zero_channel else [True] * 4)
    # one read for the four checks (where one cannot rebuild, a tolist() says which: a second transfer on
    # a GPU, not an op here); alone, one per batch norm
    assert together.reads == 1
    with DispatchedOps() as alone:
        _bn_chain_vjp(weights, x)
    assert alone.reads == 4
    monkeypatch.setitem(ops.BN_REBUILD_GRAD_Y, "cpu", False)
    g_keep, dws_keep = _bn_chain_vjp(weights, x)
    torch.testing.assert_close(g, g_keep, rtol=1e-12, atol=1e-12)
    for a, b in zip(dws, dws_keep):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# ATen's first-order kernels inside the differentiable ops (ops.ATEN_BN_KERNELS)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,layout", GRAD_CASES[:3])
@pytest.mark.parametrize("affine", [True, False])
def test_aten_kernels_inside_the_ops_keep_their_derivatives(shape, layout, affine, monkeypatch):
    # oracles: finite differences (gradcheck, gradgradcheck: the double backward is still the fused one,
    # now fed ATen's statistics) and the reference formulas; and ATen's kernels are what ran
    monkeypatch.setitem(ops.ATEN_BN_KERNELS, "cpu", ("forward", "backward"))
    d = _inputs(shape, layout, affine=affine)
    x = d["x"].requires_grad_(True)
    params = (d["w"].requires_grad_(True), d["b"].requires_grad_(True)) if affine else ()

    def f(x, *p):
        return ops.BatchNormTrain.apply(x, *(p if affine else (None, None)), 1e-5)

    with DispatchedOps() as seen:
        out = f(x, *params)
        grads = torch.autograd.grad(out[0], (x, *params), d["gy"], create_graph=True)
    assert "aten.native_batch_norm.default" in seen.names
    assert "aten.native_batch_norm_backward.default" in seen.names
    ref = batch_norm_train_ref(d["x"], d["w"] if affine else None, d["b"] if affine else None, 1e-5)
    _assert_all_close(out, ref, rtol=1e-12, atol=1e-12)
    assert out[0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    ref_grads = batch_norm_backward_ref(d["gy"], d["x"], d["w"] if affine else None, ref[1], ref[2], None, None)
    _assert_all_close(grads, ref_grads[:len(grads)], rtol=1e-11, atol=1e-11)
    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_aten_backward_returns_the_statistics_sums_without_a_weight(monkeypatch):
    # the Hutchinson tangent reads sum(grad_y * xhat) and sum(grad_y) from the backward op even without
    # an affine weight: ATen's kernel gets a ones weight; and grad_mean / grad_invstd terms stay ours
    monkeypatch.setitem(ops.ATEN_BN_KERNELS, "cpu", ("backward",))
    d = _inputs((3, 4, 2, 5), "channels_last", affine=False)
    _, mean, invstd = batch_norm_train_ref(d["x"], None, None, 1e-5)
    gy = d["gy"].contiguous()  # a cotangent in the other layout than x
    with DispatchedOps() as seen:
        got = ops.BatchNormBackward.apply(gy, d["x"], None, mean, invstd, None, None)
    assert "aten.native_batch_norm_backward.default" in seen.names
    _assert_all_close(got, batch_norm_backward_ref(gy, d["x"], None, mean, invstd, None, None), rtol=1e-11,
                      atol=1e-11)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    with DispatchedOps() as seen:
        got = ops.BatchNormBackward.apply(gy, d["x"], None, mean, invstd, d["gm"], d["gs"])
    assert "aten.native_batch_norm_backward.default" not in seen.names
    _assert_all_close(got, batch_norm_backward_ref(gy, d["x"], None, mean, invstd, d["gm"], d["gs"]), rtol=1e-11,
                      atol=1e-11)


def test_the_backward_kernel_is_chosen_at_the_layers_forward(monkeypatch):
    # a loss call sets the policy for its forward and create-graph passes; the step's backward runs after
    # the call, and must run the kernel that forward planned (both ways round)
    d = _inputs((4, 3, 2, 3), "contiguous")
    for planned in ((), ("backward",)):
        monkeypatch.setitem(ops.ATEN_BN_KERNELS, "cpu", planned)
        x = d["x"].clone().requires_grad_(True)
        y = ops.batch_norm(x, None, None, d["w"], d["b"], True)
        monkeypatch.setitem(ops.ATEN_BN_KERNELS, "cpu", ("backward",) if not planned else ())
        with DispatchedOps() as seen:
            (gx,) = torch.autograd.grad(y, x, d["gy"])
        assert ("aten.native_batch_norm_backward.default" in seen.names) == bool(planned), seen.names
        _, mean, invstd = batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5)
        torch.testing.assert_close(gx, batch_norm_backward_ref(d["gy"], d["x"], d["w"], mean, invstd, None, None)[0],
                                   rtol=1e-11, atol=1e-11)
