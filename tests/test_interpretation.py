"""SmoothGrad targets and Interpretation Regularization (Noack et al.) against closed forms."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast.testing import tiny_input, tiny_model
from oracles import batch_jacobian, directional_fd, random_direction


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()


def test_smoothgrad_on_linear_model_is_the_weight_row_thresholded():
    # The true-class logit of a linear model has the constant gradient W[y]: SmoothGrad of any noise
    # level returns it exactly; then values within mean +- phi*std are zeroed (Noack et al. Sec. 3.1).
    model = _linear()
    x = torch.rand(3, 12, dtype=torch.float64)
    y = torch.tensor([2, 0, 3])
    W = model[1].weight.detach().numpy()
    for phi in (None, 0.5, 1.0):
        got = jsigr_fast.smoothgrad(model, x, y, n_samples=7, sigma=0.3, phi=phi).numpy()
        for i in range(3):
            row = W[y[i]].copy()
            if phi is not None:
                mu, sd = row.mean(), row.std()
                row[(row >= mu - phi * sd) & (row <= mu + phi * sd)] = 0
            np.testing.assert_allclose(got[i], row, rtol=1e-12, atol=1e-15)


def test_smoothgrad_zero_noise_is_the_class_gradient():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    y = torch.tensor([0, 1, 2, 3, 0])
    J = batch_jacobian(model, x)
    expect = torch.stack([J[i, y[i], i] for i in range(5)]).reshape(x.shape)
    got = jsigr_fast.smoothgrad(model, x, y, n_samples=3, sigma=0.0, phi=None)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-15)


def test_smoothgrad_noise_averages_out():
    # For logit_c = 0.5 * a_c * ||x||^2 the gradient a_c x is linear in x, so the noise mean is
    # exactly the gradient at x in expectation; with many samples it is within a few standard errors.
    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))

        def forward(self, x):
            return 0.5 * self.a * x.flatten(1).pow(2).sum(1, keepdim=True)

    model = Quad()
    x = torch.rand(2, 50, dtype=torch.float64)
    y = torch.tensor([1, 2])
    got = jsigr_fast.smoothgrad(model, x, y, n_samples=400, sigma=0.1, phi=None,
                                generator=torch.Generator().manual_seed(0))
    a = model.a.detach()[y].view(-1, 1)
    scale = 0.1 * (x.amax(1) - x.amin(1)).view(-1, 1)
    se = a.abs() * scale / 20  # std of the mean of 400 draws
    assert ((got - a * x).abs() < 5 * se).all()


def test_interpretation_regularization_value():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    y = torch.tensor([0, 1, 2, 3, 0])
    targets = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    J = batch_jacobian(model, x)
    jc = torch.stack([J[i, y[i], i] for i in range(5)])
    t = targets.reshape(5, -1)
    cos = ((jc * t).sum(1) / (jc.norm(dim=1) * t.norm(dim=1))).mean()
    expect = F.cross_entropy(model(x), y) - 3.0 * cos + 0.15 * jc.norm(dim=1).mean()
    got, terms = jsigr_fast.interpretation_regularization(model, x, y, targets, return_terms=True)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=0)
    torch.testing.assert_close(terms["cos"], cos.detach(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["conv_tanh", "conv_bn_train"])
def test_interpretation_regularization_parameter_gradient(name):
    model, x = tiny_model(name), tiny_input(name)
    y = torch.tensor([0, 1, 2, 3, 0])
    targets = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    params = list(model.parameters())
    direction = random_direction(params)

    def value():
        return jsigr_fast.interpretation_regularization(model, x, y, targets, lambda_d=1.0, lambda_m=0.5)

    grads = torch.autograd.grad(value(), params, allow_unused=True)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)
    assert analytic == pytest.approx(directional_fd(value, params, direction), rel=1e-6, abs=1e-10)
