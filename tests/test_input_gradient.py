"""The (masked) input-gradient penalty and double backprop against per-sample autograd oracles."""
import pytest
import torch
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast.testing import DETERMINISTIC_MODELS, INDEPENDENT_MODELS, tiny_input, tiny_model
from oracles import (batch_input_gradient, directional_fd, per_sample_input_gradients, random_direction)

BACKENDS = ["reference"] + (["fused"] if "fused" in jsigr_fast.available_backends() else [])


def _labels(n, k=4, seed=0):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [m for m in INDEPENDENT_MODELS if m != "dropout"])
def test_penalty_is_mean_of_per_sample_gradient_norms(name, backend):
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x.shape[0])
    g = per_sample_input_gradients(model, x, y)  # one sample at a time
    expect = g.reshape(x.shape[0], -1).pow(2).sum(1).mean()
    got = jsigr_fast.input_gradient_penalty(model, x, y, backend=backend)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=0)
    # Scaling asserted: the penalty uses the gradient of the per-sample losses (of their *sum*), no 1/2,
    # averaged over samples. The gradient of the batch-*mean* loss would be N times smaller per row.
    xg = x.clone().requires_grad_(True)
    (g_of_mean,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    n = x.shape[0]
    torch.testing.assert_close(got, n ** 2 * g_of_mean.reshape(n, -1).pow(2).sum(1).mean(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["conv_bn_train", "residual_bn"])
def test_train_mode_batchnorm_gradient_includes_batch_statistics_path(name):
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x.shape[0])
    expect_rows = batch_input_gradient(model, x, y)  # J^T r from the full batch Jacobian
    expect = expect_rows.reshape(x.shape[0], -1).pow(2).sum(1).mean()
    torch.testing.assert_close(jsigr_fast.input_gradient_penalty(model, x, y), expect, rtol=1e-10, atol=0)
    # ...which differs from the "hold the rest of the batch fixed" per-sample gradient
    iso = per_sample_input_gradients(model, x, y).reshape(x.shape[0], -1).pow(2).sum(1).mean()
    assert abs(float(expect - iso)) > 1e-8 * float(expect)


@pytest.mark.parametrize("mask_kind", ["float", "bool", "shared"])
def test_mask_selects_features(mask_kind):
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    y = _labels(x.shape[0])
    gen = torch.Generator().manual_seed(3)
    if mask_kind == "float":
        mask = torch.rand(x.shape, generator=gen, dtype=x.dtype)
    elif mask_kind == "bool":
        mask = torch.rand(x.shape, generator=gen) > 0.5
    else:
        mask = torch.rand(x.shape[1:], generator=gen) > 0.5
    g = per_sample_input_gradients(model, x, y)
    m = mask.expand(x.shape).to(x.dtype)
    expect = (m * g).reshape(x.shape[0], -1).pow(2).sum(1).mean()
    for backend in BACKENDS:
        got = jsigr_fast.input_gradient_penalty(model, x, y, mask=mask, backend=backend)
        torch.testing.assert_close(got, expect, rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DETERMINISTIC_MODELS)
def test_penalty_parameter_gradient_matches_finite_differences(name, backend):
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x.shape[0])
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    params = list(model.parameters())
    direction = random_direction(params)

    def value():
        return jsigr_fast.input_gradient_penalty(model, x, y, mask=mask, backend=backend)

    grads = torch.autograd.grad(value(), params, allow_unused=True)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)
    assert analytic == pytest.approx(directional_fd(value, params, direction), rel=1e-6, abs=1e-10)


def test_gradcheck_through_functional_call():
    # gradcheck w.r.t. every parameter at once of the penalty, as a function of the parameters.
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train", n=3)
    y = _labels(3)
    names = [n for n, _ in model.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def f(*ps):
        xg = x.clone().requires_grad_(True)
        z = torch.func.functional_call(model, dict(zip(names, ps)), (xg,))
        (g,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), xg, create_graph=True)
        return g.pow(2).sum() / 3

    assert torch.autograd.gradcheck(f, values)
    # and the library's penalty is that same function
    torch.testing.assert_close(jsigr_fast.input_gradient_penalty(model, x, y), f(*values).detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backprop_loss(backend):
    model, x = tiny_model("groupnorm_gelu"), tiny_input("groupnorm_gelu")
    y = _labels(x.shape[0])
    g = per_sample_input_gradients(model, x, y)
    ce = F.cross_entropy(model(x), y)
    got, terms = jsigr_fast.double_backprop(model, x, y, lambda_ig=2.5, backend=backend, return_terms=True)
    torch.testing.assert_close(got, ce + 2.5 * g.reshape(x.shape[0], -1).pow(2).sum(1).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(terms["ce"], ce.detach(), rtol=1e-12, atol=0)


def test_vector_inputs():
    model, x = tiny_model("mlp"), tiny_input("mlp")
    y = _labels(x.shape[0])
    g = per_sample_input_gradients(model, x, y)
    torch.testing.assert_close(jsigr_fast.input_gradient_penalty(model, x, y), g.pow(2).sum(1).mean(), rtol=1e-10, atol=0)
