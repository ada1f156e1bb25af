"""grad_scale: PyTorch AMP's gradient-penalty recipe (scale the cotangents, unscale the input gradient)."""
import pytest
import torch
import torch.nn as nn

import jsigr_fast
from jsigr_fast.testing import tiny_input, tiny_model


@pytest.mark.parametrize("jacobian", ["projection", "exact", "hutchinson"])
def test_grad_scale_is_mathematically_a_no_op(jacobian):
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    y = torch.tensor([0, 1, 2, 3, 0])
    params = list(model.parameters())
    a = jsigr_fast.loss(model, x, y, jacobian=jacobian, generator=torch.Generator().manual_seed(0))
    ga = torch.autograd.grad(a, params)
    b = jsigr_fast.loss(model, x, y, jacobian=jacobian, generator=torch.Generator().manual_seed(0),
                        grad_scale=torch.tensor(1024.0, dtype=torch.float64))
    gb = torch.autograd.grad(b, params)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-15)


def test_grad_scale_rescues_fp16_underflow_under_autocast():
    # fp32 model and input under fp16 autocast (the AMP setting): the backward runs through fp16
    # activations, and with small weights the input gradient (~1e-8 per element) flushes to zero
    # there. With the cotangent scaled by 2^16 (GradScaler's initial scale) it survives and the
    # penalty matches the fp32 value.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight.mul_(1e-4)
        model[2].weight.mul_(1e-3)
    x = torch.rand(8, 16)
    y = torch.randint(0, 4, (8,))
    ref = float(jsigr_fast.input_gradient_penalty(model, x, y).detach())
    with torch.autocast("cpu", dtype=torch.float16):
        plain = float(jsigr_fast.input_gradient_penalty(model, x, y).detach())
        scaled = float(jsigr_fast.input_gradient_penalty(model, x, y, grad_scale=65536.0).detach())
    assert plain == 0.0  # underflow: without scaling the penalty silently vanishes
    assert scaled == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), torch.tensor([1.0, 2.0]), True, torch.tensor(True),
                                 torch.tensor(2 + 0j)])
def test_grad_scale_validation(bad):
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    with pytest.raises((ValueError, TypeError), match="grad_scale"):
        jsigr_fast.loss(model, x, torch.tensor([0, 1, 2, 3, 0]), grad_scale=bad)
