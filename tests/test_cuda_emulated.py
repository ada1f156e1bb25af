"""The CUDA kernels of csrc/cuda/, *executed* on the CPU by the emulator of tests/cuda_emu/.

The CI machines have no GPU, so without this the .cu files would only be compile-checked
(tests/test_cuda_compile.py) until the first GPU session. The emulator runs each thread block's
threads as fibers with CUDA's barrier and warp-shuffle rules (and reports breaking them); see
tests/cuda_emu/cuda_emu.h for what it models and what it does not (timing, fast-math intrinsics,
races between unsynchronised threads).

First the emulator itself is tested on kernels with known answers and known bugs
(tests/cuda_emu/selftest.cu). Then every op's CUDA kernels run on the same oracles and references as
the CPU kernels and the GPU tests, in both thread orders (JSIGR_CUDA_EMU_ORDER), at shapes that
exercise several blocks, grid-stride loops, split reductions and partial warps. Then the library's
own tests run with the emulated kernels installed as the CPU kernels, and the emulated tests run
again under AddressSanitizer. On a GPU, the `-m gpu` tests run the kernels for real.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cuda_emu
from bn_oracles import CASES as BN_CASES
from bn_oracles import _assert_all_close, _inputs, _layout, check_double_backward_from_grad_x
from jsigr_fast import reference
from loss_head_oracles import DTYPES, UNIT, _ce_oracle, _logits, _tols, _vjp_oracle, check_special_values
from mask_oracles import (QUANTILE_COUNT_DS, _adaptor_oracle, _check_near_threshold, adaptor_bad_arguments,
                          adaptor_inputs, check_quantile_counts)

pytestmark = pytest.mark.skipif(cuda_emu.unavailable() is not None, reason=f"{cuda_emu.unavailable()}")


@pytest.fixture(scope="module")
def E():
    return cuda_emu.load()


@pytest.fixture(scope="module")
def selftest():
    return cuda_emu.load_selftest()


@pytest.fixture(params=["forward", "reverse"])
def order(request, monkeypatch):
    monkeypatch.setenv("JSIGR_CUDA_EMU_ORDER", request.param)
    return request.param


# ----------------------------------------------------------------------------------------------
# the emulator itself
# ----------------------------------------------------------------------------------------------
def test_emulator_runs_a_block_sum_in_either_thread_order(selftest, order):
    x = torch.randn(300, generator=torch.Generator().manual_seed(0))
    expect = torch.stack([x[:128].sum(), x[128:256].sum(), x[256:].sum()])
    torch.testing.assert_close(selftest.run(0, x), expect)


def test_emulator_exposes_a_missing_barrier(selftest, monkeypatch):
    # without the __syncthreads, thread 0 reads warp sums not yet written: the emulator's poisoned
    # shared memory (NaN) in index order; the reverse order happens to write them first
    x = torch.randn(300, generator=torch.Generator().manual_seed(0))
    expect = torch.stack([x[:128].sum(), x[128:256].sum(), x[256:].sum()])
    got = {}
    for order in ("forward", "reverse"):
        monkeypatch.setenv("JSIGR_CUDA_EMU_ORDER", order)
        got[order] = selftest.run(1, x)
    assert torch.isnan(got["forward"]).all()
    torch.testing.assert_close(got["reverse"], expect)


def _shuffle_oracle(x, kind, arg, width=32):
    """CUDA's documented shuffle rules (Programming Guide, "Warp Shuffle Functions"), per warp of 32
    lanes: the source lane, or the caller's own value when the source lies past its width segment."""
    out = x.clone()
    for t in range(len(x)):
        lane, base = t % 32, t - t % 32
        seg = lane // width * width
        if kind == "xor":
            src = lane ^ arg
            src = src if src < seg + width else None
        elif kind == "up":
            src = lane - arg if lane - arg >= seg else None
        elif kind == "down":
            src = lane + arg if lane + arg < seg + width else None
        else:
            src = seg + arg % width
        out[t] = x[base + src] if src is not None else x[t]
    return out


def test_emulator_shuffles_follow_cudas_rules(selftest):
    x = torch.randn(64, generator=torch.Generator().manual_seed(1))
    got = selftest.run(2, x)
    for row, (kind, arg, width) in enumerate([("xor", 5, 32), ("up", 3, 32), ("down", 6, 16), ("idx", 7, 8)]):
        assert torch.equal(got[row], _shuffle_oracle(x, kind, arg, width)), kind


@pytest.mark.parametrize("case,x,message", [
    (3, torch.ones(100), r"__syncthreads \(line \d+\) reached by 100 threads while 28 have exited"),
    (4, torch.ones(1), r"threads wait at different __syncthreads"),
    (5, torch.ones(16), r"names lane 16 in its mask, but warp 0 has only 16 lanes"),
    (6, torch.ones(32), r"names lane 16 of warp 0 in its mask, but that lane has exited"),
    (7, torch.tensor([1.0, -1.0]), r"thread \(1,0,0\): device-side assert failed: x\[i\] >= 0.f"),
    (8, torch.ones(3), r"grid \(0,1,1\).*invalid configuration"),
    (9, torch.ones(3), r"block \(2048,1,1\).*invalid configuration"),
], ids=["early-return-before-barrier", "divergent-barrier", "partial-warp-mask", "exited-lane-in-mask",
        "device-assert", "empty-grid", "block-too-large"])
def test_emulator_reports_broken_rules(selftest, case, x, message):
    with pytest.raises(RuntimeError, match="CUDA emulation: kernel [a-z_]+_kernel.*" + message):
        selftest.run(case, x)


# ----------------------------------------------------------------------------------------------
# masked_sq_norm (csrc/cuda/masked_sq_norm.cu): warp + block reduction, atomics across blocks
# ----------------------------------------------------------------------------------------------
SQ_SHAPES = [(1, 7), (3, 1031), (2, 3, 40, 40), (5, 1, 1)]  # D = 4800: 4 blocks per row
SQ_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SQ_SHAPES, ids=str)
def test_masked_sq_norm(E, order, shape, dtype):
    gen = torch.Generator().manual_seed(len(shape))
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    m = torch.rand(shape, generator=gen, dtype=torch.float64)
    tol = SQ_TOL.get(dtype, dict(rtol=2e-2, atol=2e-2))
    go = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    for mask in (None, m):
        g_, m_ = g.to(dtype), None if mask is None else mask.to(dtype)
        want = (g_.double() * (1 if m_ is None else m_.double())).flatten(1).pow(2).sum(1)
        torch.testing.assert_close(E.masked_sq_norm(g_, m_).double(), want, **tol)
        want_bw = 2 * (1 if m_ is None else m_.double()) ** 2 * g_.double() * go.view(-1, *[1] * (g.dim() - 1))
        torch.testing.assert_close(E.masked_sq_norm_backward(go.to(dtype), g_, m_).double(), want_bw, **tol)


def test_masked_sq_norm_empty(E):
    assert E.masked_sq_norm(torch.zeros(0, 5), None).shape == (0,)
    assert E.masked_sq_norm(torch.zeros(3, 0), None).tolist() == [0.0, 0.0, 0.0]
    assert E.masked_sq_norm_backward(torch.zeros(0), torch.zeros(0, 5), None).shape == (0, 5)


# ----------------------------------------------------------------------------------------------
# batch norm (csrc/cuda/batch_norm.cu): NCHW and rows (channels-last) reductions, split grids,
# the finalize and apply kernels, forward / backward / double backward
# ----------------------------------------------------------------------------------------------
BN_EXTRA = [
    ((8, 3, 32, 32), "contiguous"),  # M = 8192: two splits per channel
    ((4, 40, 8, 8), "channels_last"),  # rows layout: two channel blocks (the second partial), two splits
    ((3, 70, 5, 7), "channels_last"),  # three channel blocks of 32
    ((2, 130, 2, 2), "contiguous"),  # finalize kernels: two blocks of 128 channels
]


def _bn_check(E, shape, layout, dtype):
    d = _inputs(shape, layout, dtype)
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else {}
    got = E.batch_norm_train(d["x"], d["w"], d["b"], 1e-5)
    _assert_all_close(got, reference.batch_norm_train_ref(d["x"], d["w"], d["b"], 1e-5), **tol)
    if layout == "channels_last":  # y keeps x's memory format
        assert got[0].is_contiguous(memory_format=torch.channels_last if d["x"].dim() == 4 else torch.channels_last_3d)
    else:
        assert got[0].is_contiguous()
    _, mean, invstd = got
    args = (d["x"], d["w"], mean, invstd)
    _assert_all_close(E.batch_norm_backward(d["gy"], *args, d["gm"], d["gs"]),
                      reference.batch_norm_backward_ref(d["gy"], *args, d["gm"], d["gs"]), **tol)
    _assert_all_close(E.batch_norm_backward(None, *args, d["gm"], None),
                      reference.batch_norm_backward_ref(torch.zeros_like(d["x"]), *args, d["gm"], None), **tol)
    full = (d["u"], d["alpha"], d["beta"], d["gy"], d["x"], d["w"], mean, invstd, d["gm"], d["gs"])
    _assert_all_close(E.batch_norm_double_backward(*full), reference.batch_norm_double_backward_ref(*full), **tol)
    sparse = (None, d["alpha"], None, d["gy"], d["x"], None, mean, invstd, None, d["gs"])
    _assert_all_close(E.batch_norm_double_backward(*sparse), reference.batch_norm_double_backward_ref(*sparse), **tol)
    # from the backward's outputs (grad_y rebuilt, never formed): the reference at the true grad_y is the oracle
    for cot, w, gm, gs in (((d["u"], d["alpha"], d["beta"]), d["w"], d["gm"], d["gs"]),
                           ((None, d["alpha"], None), None, None, d["gs"])):
        check_double_backward_from_grad_x(E.batch_norm_double_backward_from_grad_x, d, mean, invstd, cot, w, gm, gs)


@pytest.mark.parametrize("shape,layout", BN_CASES + BN_EXTRA, ids=[f"{s}-{lay}" for s, lay in BN_CASES + BN_EXTRA])
def test_batch_norm_float64(E, order, shape, layout):
    _bn_check(E, shape, layout, torch.float64)


@pytest.mark.parametrize("shape,layout", BN_EXTRA[:2] + [((3, 5, 4, 7), "transposed")], ids=str)
def test_batch_norm_float32(E, shape, layout):
    _bn_check(E, shape, layout, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_batch_norm_low_precision_flash_attention_rule(E, dtype):
    d = _inputs((8, 6, 7, 7), "contiguous", dtype, seed=5)
    got = E.batch_norm_train(d["x"], d["w"], d["b"], 1e-5)
    ref = reference.batch_norm_train_ref(d["x"].float(), d["w"].float(), d["b"].float(), 1e-5)
    plain = F.batch_norm(d["x"], None, None, d["w"], d["b"], True, 0.1, 1e-5)
    err = (got[0].float() - ref[0]).abs().max().item()
    assert err <= 2 * (plain.float() - ref[0]).abs().max().item() + 1e-3 * ref[0].abs().max().item()


# ----------------------------------------------------------------------------------------------
# the selective mask and the bool-masked norm (csrc/cuda/saliency_mask.cu)
# ----------------------------------------------------------------------------------------------
MASK_SHAPES = [(1, 7), (3, 1031), (2, 3, 40, 40), (2, 3, 64, 64)]  # D = 12288: 6 split blocks per sample
MASK_RULES = [(0.1, None), (0.5, None), (0.0, None), (0.3, 0.25), (0.3, 0.9), (0.3, 0.0), (0.3, 1.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_mask_ops(E, order, shape, dtype):
    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(shape, generator=gen) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen)).to(dtype)
    g.view(-1)[::17] = 0  # ties at 0
    g.view(-1)[5] = torch.finfo(dtype).tiny / 4 if dtype != torch.bfloat16 else 0  # a denormal where there is one
    for host in [g] + ([_layout(g, "channels_last")] if g.dim() == 4 else []):
        for beta, q in MASK_RULES:
            want = reference.gradient_saliency_mask_ref(host, beta, q)
            got = E.gradient_saliency_mask(host, beta, q)
            assert torch.equal(got, want), (beta, q)
            assert got.is_contiguous(memory_format=torch.channels_last) == (host.dim() == 4 and
                                                                           not host.is_contiguous())
            M = host.abs().float().to(dtype)
            assert torch.equal(E.threshold_mask(M, beta, q), reference.threshold_mask_ref(M, beta, q)), (beta, q)
        m = reference.gradient_saliency_mask_ref(host, 0.3, 0.25)
        want_norm = (host.double() * m).flatten(1).pow(2).sum(1)
        tol = SQ_TOL.get(dtype, dict(rtol=1e-2, atol=1e-2))
        torch.testing.assert_close(E.masked_sq_norm_bool(host, m).double(), want_norm, **tol)
        go = torch.randn(shape[0], generator=gen).to(dtype)
        got_bw = E.masked_sq_norm_bool_backward(go, host, m)
        want_bw = torch.where(m, (2 * go.view(-1, *[1] * (len(shape) - 1))) * host, torch.zeros((), dtype=dtype))
        assert torch.equal(got_bw, want_bw)  # exact products, as the CPU kernel (mul.rn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_nan_and_inf_as_the_reference(E, dtype):
    g = torch.tensor([[1.0, float("nan"), -2.0, 0.5], [float("inf"), 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                     dtype=torch.float64).to(dtype)
    for beta, q in ((0.3, None), (1.0, None), (0.3, 0.5)):
        assert torch.equal(E.gradient_saliency_mask(g, beta, q), reference.gradient_saliency_mask_ref(g, beta, q))


@pytest.mark.parametrize("D", QUANTILE_COUNT_DS)
def test_mask_quantile_keeps_exactly_floor_q_d(E, D):
    # mask_quantile=q leaves floor(q D) features per sample unpenalised, floor(q D) in exact arithmetic
    # (0.29 of 100 is 29; floor(0.29 * 100) in floating point was 28): the count of the CUDA ops' host code
    check_quantile_counts(E.threshold_mask, E.gradient_saliency_mask,
                          lambda M, w, q: E.adaptor_saliency_mask(M, w, None, 0.5, q, False), D)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", [((3, 1000), "contiguous"), ((2, 3, 5, 7), "contiguous"),
                                          ((2, 3, 20, 20), "channels_last"), ((2, 4, 2, 3, 3), "channels_last")],
                         ids=str)
def test_adaptor_mask(E, order, shape, layout, dtype):
    for normalize in (True, False):
        g, W, b = adaptor_inputs(shape, dtype, normalize, lambda t: _layout(t, layout))
        M, S = _adaptor_oracle(g, W, b, normalize, dtype)
        for beta, q in [(0.2, None), (-0.3, None), (0.3, 0.3), (0.3, 0.75), (0.3, 1.0)]:
            mask = E.adaptor_saliency_mask(g, W, b, beta, q, normalize)
            assert mask.dtype == torch.bool and mask.shape == g.shape and mask.is_contiguous()
            _check_near_threshold(mask.reshape(shape[0], -1).numpy(), M, S, beta, q, dtype)


def test_adaptor_mask_rejects_bad_arguments_like_the_cpu_kernel(E):
    for args, message in adaptor_bad_arguments():
        args = args + (None,) * (5 - len(args)) + (True,)  # quantile=None, normalize=True
        with pytest.raises(RuntimeError, match=message):
            E.adaptor_saliency_mask(*args)


# ----------------------------------------------------------------------------------------------
# the loss head (csrc/cuda/cross_entropy_cotangent.cu): one warp per row, xor-shuffle reductions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_cotangent(E, order, dtype):
    for N, K in ((1, 1), (5, 10), (9, 33), (3, 1000), (2, 5000)):  # N = 5, 9: a partial last block
        z, y = _logits(N, K, dtype, seed=N + K)
        loss, cot = E.cross_entropy_cotangent(z, y)
        el, ec = _ce_oracle(z, y)
        np.testing.assert_allclose(loss.double().numpy(), el, **_tols(dtype))
        np.testing.assert_allclose(cot.double().numpy(), ec, **_tols(dtype))
        gen = torch.Generator().manual_seed(K)
        a = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
        b = torch.randn(N, K, generator=gen, dtype=torch.float64).to(dtype)
        for ga, gb in ((a, b), (a, None), (None, b)):
            grad = E.cross_entropy_cotangent_backward(ga, gb, z, y)
            expect = _vjp_oracle(z, y, ga, gb)
            tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else \
                dict(rtol=2 * UNIT[dtype] if dtype != torch.float32 else 1e-5,
                     atol=4 * UNIT[dtype] * np.abs(expect).max() + 1e-7)
            np.testing.assert_allclose(grad.double().numpy(), expect, **tol)


def test_cross_entropy_special_values(E):
    check_special_values(E.cross_entropy_cotangent)  # -inf, +inf, NaN, huge logits, every dtype


def test_cross_entropy_target_out_of_range_is_a_device_assert(E):
    z, y = _logits(3, 5, torch.float32, seed=0)
    y[1] = 7
    for op in (lambda: E.cross_entropy_cotangent(z, y), lambda: E.cross_entropy_cotangent_backward(None, z, z, y)):
        with pytest.raises(RuntimeError, match=r"ce_\w+_kernel .*device-side assert failed: t >= 0 && t < K"):
            op()


@pytest.mark.parametrize("op", ["masked_sq_norm", "batch_norm_train", "gradient_saliency_mask",
                                "cross_entropy_cotangent"])
def test_every_op_runs_through_the_emulated_launch(E, monkeypatch, op):
    # the comparisons above would be vacuous if these ops did not reach the emulator: an unknown
    # thread order makes every emulated launch fail
    monkeypatch.setenv("JSIGR_CUDA_EMU_ORDER", "bogus")
    x = torch.randn(4, 3)
    call = {"masked_sq_norm": lambda: E.masked_sq_norm(x, None),
            "batch_norm_train": lambda: E.batch_norm_train(x, None, None, 1e-5),
            "gradient_saliency_mask": lambda: E.gradient_saliency_mask(x, 0.3, None),
            "cross_entropy_cotangent": lambda: E.cross_entropy_cotangent(x, torch.zeros(4, dtype=torch.long))}[op]
    with pytest.raises(RuntimeError, match="CUDA emulation: JSIGR_CUDA_EMU_ORDER must be"):
        call()


# ----------------------------------------------------------------------------------------------
# the library on the CUDA kernels: the emulated kernels installed as the CPU kernels of
# torch.ops.jsigr_fast, and the op, fused-backend and regularizer tests run through them (so the
# fused backend's autograd rules, layouts and dtypes meet the CUDA kernels' actual outputs)
# ----------------------------------------------------------------------------------------------
LIBRARY_TESTS = ["test_fused_backend.py", "test_fused_layers.py", "test_jsigr_loss.py", "test_finite_difference.py",
                 "test_masked_sq_norm.py", "test_loss_head.py", "test_mask_ops.py", "test_bn_ops.py",
                 "test_jacobian.py", "test_input_gradient.py", "test_hutchinson_probes.py", "test_errors.py"]
# By design, not a difference to fix: the CPU loss head checks the targets on the host, with a
# message; the CUDA kernel asserts on the device, as ATen's nll_loss does (a host check would
# synchronise every call). test_cross_entropy_target_out_of_range_is_a_device_assert covers it.
LIBRARY_DESELECT = "not test_target_out_of_range"  # (test_loss_head.py; the name is unique)


@pytest.mark.slow
@pytest.mark.skipif(cuda_emu.asan(), reason="runs in the plain build")
def test_library_runs_on_the_cuda_kernels():
    tests = Path(__file__).resolve().parent
    code = (
        "import json, sys, pytest, cuda_emu\n"
        "calls = cuda_emu.install_as_cpu_kernels()\n"
        f"rc = pytest.main(['-q', '-p', 'no:cacheprovider', '-m', 'not slow', '--tb=short', '-k', "
        f"{LIBRARY_DESELECT!r}, *{[str(tests / f) for f in LIBRARY_TESTS]!r}])\n"
        "print('EMU_CALLS ' + json.dumps(calls))\n"
        "sys.exit(int(rc))\n")
    env = dict(os.environ)
    env.pop("JSIGR_CUDA_EMU_ORDER", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=tests, env=env, capture_output=True, text=True, timeout=3000)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    calls = json.loads(out.split("EMU_CALLS ", 1)[1].splitlines()[0])
    assert set(calls) == set(cuda_emu.OPS), f"ops never reached through the emulator: {set(cuda_emu.OPS) - set(calls)}"


# ----------------------------------------------------------------------------------------------
# out-of-bounds accesses: the same kernels built with AddressSanitizer, in a subprocess that
# preloads libasan (ASan must be the first library loaded)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(cuda_emu.asan(), reason="this process is the run under AddressSanitizer")
def test_kernels_under_address_sanitizer(tmp_path):
    preload = cuda_emu.asan_preload()
    if preload is None:
        pytest.skip("the C++ compiler has no libasan.so")
    tests = Path(__file__).resolve().parent

    def run(args, cwd, name):
        # ASan writes its report to <name>.<pid> (pytest would capture stderr in the child, and lose
        # it when ASan aborts the process)
        env = dict(os.environ, JSIGR_CUDA_EMU_ASAN="1", LD_PRELOAD=preload,
                   ASAN_OPTIONS=f"detect_leaks=0:log_path={tmp_path / name}")
        env.pop("JSIGR_CUDA_EMU_ORDER", None)
        r = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=3000)
        reports = "\n".join(p.read_text() for p in sorted(tmp_path.glob(name + ".*")))
        return r, reports

    # the check has teeth: an off-by-one read one element past x (selftest.cu case 10) is reported
    r, reports = run(["-c", "import cuda_emu, torch; cuda_emu.load_selftest().run(10, torch.ones(256))"], tests,
                     "selftest")
    assert r.returncode != 0, "the out-of-bounds read went unreported:\n" + r.stderr[-3000:]
    assert "heap-buffer-overflow" in reports and "off_by_one_kernel" in reports, reports[-3000:] + r.stderr[-3000:]
    # every emulated kernel test, in index order, with every global and shared access checked
    r, reports = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                      "-k", "not reverse and not address_sanitizer"], tests.parent, "kernels")
    assert r.returncode == 0 and "ERROR: AddressSanitizer" not in reports, \
        (reports[:6000] or "(no ASan report)") + "\n" + (r.stdout + r.stderr)[-3000:]
