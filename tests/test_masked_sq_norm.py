"""The compiled per-sample masked squared norm against its plain-PyTorch expression."""
import pytest
import torch

import jsigr_fast
from jsigr_fast import ops
from jsigr_fast.reference import masked_sq_norm_ref

pytestmark = pytest.mark.skipif(not jsigr_fast.extension_loaded(),
                                reason=f"compiled extension not loaded: {jsigr_fast.extension_error()}")

SHAPES = [(1, 1), (1, 7), (3, 5), (2, 3, 5, 7), (4, 1, 1, 1), (5, 3, 32, 32), (2, 4099)]


def _expr(g, m):
    # The definition, written independently of the library: sum over features of (m * g)^2.
    v = g.double() if m is None else (m.double() * g.double())
    return (v * v).reshape(v.shape[0], -1).sum(1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "float", "bool", "shared"])
def test_values_float64(shape, mask_kind):
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "float":
        mask = torch.rand(shape, dtype=torch.float64)
    elif mask_kind == "bool":
        mask = torch.rand(shape) > 0.4
    else:
        mask = torch.rand(shape[1:]) > 0.4
    out = ops.masked_sq_norm(g, mask, compiled=True)
    expect_mask = None if mask is None else (mask if mask_kind != "shared" else mask.expand(shape)).double()
    torch.testing.assert_close(out, _expr(g, expect_mask), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_values_float32_default_tolerance(shape):
    torch.manual_seed(1)
    g = torch.randn(shape)
    m = (torch.rand(shape) > 0.3).float()
    torch.testing.assert_close(ops.masked_sq_norm(g, m, compiled=True), _expr(g, m).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_flash_attention_rule(dtype):
    # |kernel - ref32| <= 2 * |torch_lowp - ref32| (+ tiny atol), for the value and the gradient.
    torch.manual_seed(2)
    g32 = torch.randn(6, 3, 16, 16)
    m32 = (torch.rand_like(g32) > 0.5).float()
    g_low, m_low = g32.to(dtype), m32.to(dtype)
    ref = _expr(g_low.float(), m_low.float())
    kernel = ops.masked_sq_norm(g_low, m_low, compiled=True).float()
    plain = masked_sq_norm_ref(g_low, m_low).float()
    atol = 1e-3 * ref.abs().max()
    assert ((kernel - ref).abs() <= 2 * (plain - ref).abs() + atol).all()

    gk = g_low.clone().requires_grad_(True)
    gp = g_low.clone().requires_grad_(True)
    w = torch.randn(6)
    (ops.masked_sq_norm(gk, m_low, compiled=True).float() * w).sum().backward()
    (masked_sq_norm_ref(gp, m_low).float() * w).sum().backward()
    ref_grad = 2 * m32 * m32 * g_low.float() * w.view(-1, 1, 1, 1)
    gatol = 1e-3 * ref_grad.abs().max()
    assert ((gk.grad.float() - ref_grad).abs() <= 2 * (gp.grad.float() - ref_grad).abs() + gatol).all()


def test_gradient_matches_closed_form():
    torch.manual_seed(3)
    g = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    m = torch.rand(4, 2, 3, 3, dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((ops.masked_sq_norm(g, m, compiled=True) * w).sum(), g)
    torch.testing.assert_close(grad, 2 * m * m * g.detach() * w.view(-1, 1, 1, 1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("mask_kind", ["none", "float"])
def test_gradcheck_and_gradgradcheck(mask_kind):
    torch.manual_seed(4)
    g = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    m = None if mask_kind == "none" else torch.rand(3, 2, 4, dtype=torch.float64)
    f = lambda t: ops.masked_sq_norm(t, m, compiled=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (g,))
    assert torch.autograd.gradgradcheck(f, (g,))


def test_backward_op_gradcheck():
    # The backward op is itself differentiable in grad_out and g.
    torch.manual_seed(5)
    go = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    m = torch.rand(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.jsigr_fast.masked_sq_norm_backward(a, b, m), (go, g))


@pytest.mark.parametrize("mask_kind", ["none", "float"])
def test_opcheck(mask_kind):
    torch.manual_seed(6)
    g = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    m = None if mask_kind == "none" else torch.rand(3, 2, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.jsigr_fast.masked_sq_norm.default, (g, m))
    go = torch.randn(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.jsigr_fast.masked_sq_norm_backward.default, (go, g.detach(), m))


def test_non_contiguous_and_channels_last():
    torch.manual_seed(7)
    base = torch.randn(4, 3, 8, 10, dtype=torch.float64)
    g_t = base.transpose(2, 3)  # non-contiguous view
    g_cl = base.contiguous(memory_format=torch.channels_last)
    m = torch.rand(4, 3, 10, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.masked_sq_norm(g_t, m, compiled=True), _expr(g_t, m), rtol=1e-12, atol=0)
    torch.testing.assert_close(ops.masked_sq_norm(g_cl, None, compiled=True), _expr(base, None), rtol=1e-12, atol=0)
    # channels_last gradient keeps the right values
    gc = g_cl.clone().requires_grad_(True)
    ops.masked_sq_norm(gc, None, compiled=True).sum().backward()
    torch.testing.assert_close(gc.grad, 2 * base, rtol=0, atol=0)


def test_empty_batch_and_large_row():
    assert ops.masked_sq_norm(torch.zeros(0, 3), None, compiled=True).shape == (0,)
    g = torch.full((2, 150_528), 0.5)  # one ImageNet sample per row
    torch.testing.assert_close(ops.masked_sq_norm(g, None, compiled=True), torch.full((2,), 0.25 * 150_528))


def test_compiled_equals_reference_path():
    torch.manual_seed(8)
    g = torch.randn(5, 7, dtype=torch.float64)
    m = torch.rand(5, 7) > 0.5
    torch.testing.assert_close(ops.masked_sq_norm(g, m, compiled=True), ops.masked_sq_norm(g, m, compiled=False),
                               rtol=1e-13, atol=0)


def test_errors_name_the_problem():
    g = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mask must have the input's shape"):
        ops.masked_sq_norm(g, torch.ones(2, 4))
    with pytest.raises(TypeError, match="mask must be bool or floating point"):
        ops.masked_sq_norm(g, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="g must be floating point"):
        torch.ops.jsigr_fast.masked_sq_norm(torch.ones(3, 4, dtype=torch.int64), None)
    with pytest.raises(RuntimeError, match="mask must have g's shape"):
        torch.ops.jsigr_fast.masked_sq_norm(g, torch.ones(3, 5))


def test_parallel_path_with_two_threads():
    # at::parallel_for splits samples across threads: the result must not depend on the split.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        g = torch.randn(37, 3, 11, 13, dtype=torch.float64)
        m = torch.rand_like(g)
        torch.testing.assert_close(ops.masked_sq_norm(g, m, compiled=True), _expr(g, m), rtol=1e-12, atol=0)
    finally:
        torch.set_num_threads(before)
