"""Choosing the GPU implementation: ops.use_gpu_kernels("cuda" | "triton").

On any machine: which kernel the CUDA dispatch key of each op holds (read from the dispatcher's own
table, torch._C._dispatch_dump), before, after each switch and after undoing it. On a GPU (skipped
without one): the two implementations give the same results through the ops, for the batch-norm and
loss-head kernels to float tolerance and for the mask kernels bit for bit.
"""
from importlib.util import find_spec

import pytest
import torch

import jsigr_fast
from jsigr_fast import ops

pytestmark = [pytest.mark.skipif(not jsigr_fast.extension_loaded(), reason="extension not built"),
              pytest.mark.skipif(find_spec("triton") is None, reason="triton is not installed")]

ALL_TRITON_OPS = [op for names in ops.TRITON_OPS.values() for op in names if hasattr(torch.ops.jsigr_fast, op)]


def _cuda_entry(op):
    """The dispatcher's CUDA line for op ('' when it has no CUDA kernel)."""
    lines = [ln for ln in torch._C._dispatch_dump(f"jsigr_fast::{op}").splitlines() if ln.startswith("CUDA:")]
    return lines[0] if lines else ""


def _is_python(entry):
    # torch.library registrations are recorded at the Python caller (jsigr_fast/ops.py); compiled ones
    # at their .cu file
    return "ops.py" in entry and ".cu" not in entry


@pytest.fixture
def restore_mode():
    before = ops.gpu_kernels()
    yield
    ops._apply_gpu_kernels(before)


def test_switching_registers_and_restores(restore_mode):
    assert len(ALL_TRITON_OPS) == 11
    ops._apply_gpu_kernels(None)
    original = {op: _cuda_entry(op) for op in ALL_TRITON_OPS}
    compiled = {op for op, e in original.items() if e}
    assert compiled == set(ops._COMPILED_CUDA)  # with no Triton registered, CUDA entries are the build's own

    ops.use_gpu_kernels("triton")
    assert ops.gpu_kernels() == "triton"
    assert all(_is_python(_cuda_entry(op)) for op in ALL_TRITON_OPS)
    # an op without a Triton twin keeps what it had
    assert not _is_python(_cuda_entry("masked_sq_norm"))

    ops.use_gpu_kernels("cuda")
    assert ops.gpu_kernels() == "cuda"
    for op in ALL_TRITON_OPS:
        entry = _cuda_entry(op)
        assert (entry == original[op]) if op in compiled else _is_python(entry), (op, entry)

    ops.use_gpu_kernels("triton")
    ops.use_gpu_kernels("triton")  # idempotent: one registration per op, undone by one reset
    ops._apply_gpu_kernels(None)
    assert ops.gpu_kernels() is None
    assert {op: _cuda_entry(op) for op in ALL_TRITON_OPS} == original


def test_bad_choice_names_the_argument(restore_mode):
    with pytest.raises(ValueError, match=r"use_gpu_kernels: impl must be one of \('cuda', 'triton'\), got 'xla'"):
        ops.use_gpu_kernels("xla")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.use_gpu_kernels(None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_and_triton_kernels_agree(dtype, channels_last, restore_mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, 12, 12, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.cuda()
    w = (torch.rand(16, generator=gen) + 0.5).to(dtype).cuda()
    b = torch.randn(16, generator=gen).to(dtype).cuda()
    gy, u = torch.randn_like(x), torch.randn_like(x)
    g = torch.randn(8, 3, 40, 40, generator=gen).to(dtype).cuda()
    W = (torch.eye(3) + 0.3 * torch.randn(3, 3, generator=gen)).cuda()
    logits = (3 * torch.randn(64, 1000, generator=gen)).to(dtype).cuda()
    target = torch.randint(0, 1000, (64,), generator=gen).cuda()
    O = torch.ops.jsigr_fast

    def run():
        y, mean, invstd = O.batch_norm_train(x, w, b, 1e-5)
        gx = O.batch_norm_backward(gy, x, w, mean, invstd, None, None)
        dd = O.batch_norm_double_backward(u, None, None, gy, x, w, mean, invstd, None, None)
        masks = [O.gradient_saliency_mask(g, 0.2, None), O.gradient_saliency_mask(g, 0.2, 0.5),
                 O.threshold_mask(g.abs(), 0.5, None), O.adaptor_saliency_mask(g, W, None, 0.1, None, True)]
        norm = O.masked_sq_norm_bool(g, masks[0])
        loss, cot = O.cross_entropy_cotangent(logits, target)
        grad = O.cross_entropy_cotangent_backward(loss, cot, logits, target)
        return [y, gx[0], dd[0], dd[1], norm, loss, cot, grad], masks

    results = {}
    for impl in ("cuda", "triton"):
        ops.use_gpu_kernels(impl)
        results[impl] = run()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, c in zip(results["cuda"][0], results["triton"][0]):
        torch.testing.assert_close(a.float(), c.float(), **tol)
    for i, (a, c) in enumerate(zip(results["cuda"][1], results["triton"][1])):
        if i < 3:  # the exact masks: bit for bit
            assert torch.equal(a, c), i
        else:  # the adaptor: each within rounding of its threshold only (different tanh)
            assert (a != c).float().mean() < 1e-3
