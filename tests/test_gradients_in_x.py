"""The losses are differentiable in x when x requires grad (README: "returns a scalar differentiable
in the parameters, and in x"), with the gradient of the quantity they compute, and a caller's own
gradient hooks on x do not leak into that quantity. Oracles: central differences of the value in x
(where the value is a smooth function of x with the random draws fixed by the generator) and, for
mode="fd" (whose directions are held fixed, so the value's own difference quotient is not its
gradient), the fd formula written out with plain autograd."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast import finite_difference
from jsigr_fast.testing import tiny_input, tiny_model
from oracles import fd_penalty

Y = torch.tensor([0, 1, 2, 3, 0])
BACKENDS = ["reference"] + (["fused"] if "fused" in jsigr_fast.available_backends() else [])


def _check_against_central_differences(f, model, x0, t=1e-5):
    """Check d f / dx along a fixed random direction e against (f(x + t e) - f(x - t e)) / 2t; return
    (the gradient, e, the CE-only gradient) for the caller's check that the penalty's part is there."""
    x = x0.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(f(x), x)
    e = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=x0.dtype)
    with torch.no_grad():
        expected = (f(x0 + t * e) - f(x0 - t * e)) / (2 * t)
    torch.testing.assert_close((gx * e).sum(), expected, rtol=1e-6, atol=1e-12)
    x = x0.clone().requires_grad_(True)
    (ce_only,) = torch.autograd.grad(F.cross_entropy(model(x), Y), x)
    return float(((gx - ce_only) * e).sum().abs()), float(expected.abs())


def _gen():
    return torch.Generator().manual_seed(0)


# Hutchinson: every path (the bare estimator with one and with batched probes, the J-SIGR loss whose
# first probe rides on the training forward, plus its extra probes, and the jacobian_regularization wrapper)
HUTCHINSON_CALLS = {
    "jacobian_norm n_proj=1": lambda m, x, b: jsigr_fast.jacobian_norm(m, x, estimator="hutchinson", backend=b,
                                                                       generator=_gen()),
    "jacobian_norm n_proj=3": lambda m, x, b: jsigr_fast.jacobian_norm(m, x, estimator="hutchinson", n_proj=3,
                                                                       backend=b, generator=_gen()),
    "loss n_proj=1": lambda m, x, b: jsigr_fast.loss(m, x, Y, jacobian="hutchinson", saliency="none", backend=b,
                                                     generator=_gen()),
    "loss n_proj=3": lambda m, x, b: jsigr_fast.loss(m, x, Y, jacobian="hutchinson", saliency="none", n_proj=3,
                                                     backend=b, generator=_gen()),
    "jacobian_regularization": lambda m, x, b: jsigr_fast.jacobian_regularization(
        m, x, Y, estimator="hutchinson", backend=b, generator=_gen()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", sorted(HUTCHINSON_CALLS))
@pytest.mark.parametrize("name", ["conv_bn_train", "conv_tanh"])
def test_hutchinson_gradient_in_x_matches_central_differences(name, call, backend):
    # the estimator's forward-mode pass used to run on x.detach(): no gradient in x at all (bare
    # estimator), or only the CE part of it (in the loss), and the backends disagreed
    model, x0 = tiny_model(name), tiny_input(name)
    f = HUTCHINSON_CALLS[call]
    penalty_part, total = _check_against_central_differences(lambda xx: f(model, xx, backend), model, x0)
    # and the Jacobian term's part of it is not negligible (else a CE-only gradient would pass)
    if call.startswith("loss"):
        assert penalty_part > 1e-3 * total


@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("term", ["input_gradient", "projection", "hutchinson"])
def test_fd_gradient_in_x_is_the_formulas(term, backend, early, monkeypatch):
    # the perturbed forwards used to run on x.detach() + h d: the gradient in x kept only the
    # -l(x)/h half of each difference (at h = 0.01, ~1000x the right one)
    monkeypatch.setattr(finite_difference, "FREE_EARLY", early)
    base, x0 = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    h = 0.01
    x = x0.clone().requires_grad_(True)
    if term == "input_gradient":
        value = jsigr_fast.input_gradient_penalty(copy.deepcopy(base), x, Y, mode="fd", fd_step=h, backend=backend)
        kw = {"y": Y}
    else:
        value = jsigr_fast.jacobian_norm(copy.deepcopy(base), x, estimator=term, mode="fd", fd_step=h,
                                         backend=backend, generator=_gen())
        gen = _gen()
        if term == "projection":
            v = torch.randn(x0.shape[0], 4, generator=gen, dtype=x0.dtype)
            kw = {"v": v / v.norm(dim=1, keepdim=True)}
        else:
            kw = {"zeta": torch.randn(x0.shape, generator=gen, dtype=x0.dtype)}
    (gx,) = torch.autograd.grad(value, x)
    xo = x0.clone().requires_grad_(True)
    expected = fd_penalty(copy.deepcopy(base), xo, h, **kw)
    (gx_expected,) = torch.autograd.grad(expected, xo)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(gx, gx_expected, rtol=1e-8, atol=1e-12)


def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GELU(), nn.Dropout(0.3), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 4)).double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fd_replays_the_forwards_random_numbers(backend):
    # train-mode dropout: each perturbed forward used to draw its own masks, so the difference / h
    # measured the change of mask (100-10^5 x the penalty). With the unperturbed forward's random
    # numbers replayed, fd agrees with the exact penalty (same masks: same seed before each call)
    # to O(h), and the global stream runs on as after one forward.
    model, x = _dropout_model(), tiny_input("conv_tanh")
    calls = {
        "input_gradient": lambda mode: jsigr_fast.input_gradient_penalty(model, x, Y, mode=mode, fd_step=1e-5,
                                                                         backend=backend),
        "projection": lambda mode: jsigr_fast.jacobian_norm(model, x, estimator="projection", mode=mode, fd_step=1e-5,
                                                            backend=backend, generator=_gen()),
    }
    for name, call in calls.items():
        torch.manual_seed(7)
        exact = call("autograd")
        torch.manual_seed(7)
        fd = call("fd")
        after_fd = torch.rand(4)
        torch.manual_seed(7)
        model(x)
        after_forward = torch.rand(4)
        torch.testing.assert_close(fd, exact, rtol=1e-3, atol=0, msg=name)
        assert torch.equal(after_fd, after_forward), name


@pytest.mark.parametrize("mode", ["autograd", "fd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_on_x_run_only_in_the_callers_backward(backend, mode):
    # the penalties differentiate w.r.t. an alias of x: a hook on x (here scaling its gradient by 10)
    # used to run inside them and scale the input gradient, so the penalty came out 100x
    model, x0 = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    calls = [
        lambda x: jsigr_fast.input_gradient_penalty(copy.deepcopy(model), x, Y, mode=mode, backend=backend),
        lambda x: jsigr_fast.jacobian_norm(copy.deepcopy(model), x, estimator="projection", mode=mode,
                                           backend=backend, generator=_gen()),
        lambda x: jsigr_fast.loss(copy.deepcopy(model), x, Y, mode=mode, backend=backend, generator=_gen()),
    ]
    for call in calls:
        plain = x0.clone().requires_grad_(True)
        value = call(plain)
        value.backward()
        hooked = x0.clone().requires_grad_(True)
        runs = []
        hooked.register_hook(lambda g: runs.append(1) or g * 10)
        value_hooked = call(hooked)
        assert not runs
        torch.testing.assert_close(value_hooked, value, rtol=1e-12, atol=0)
        value_hooked.backward()
        assert len(runs) == 1
        torch.testing.assert_close(hooked.grad, 10 * plain.grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jarn_gradient_in_x_matches_central_differences(backend):
    # JARN ran its classifier on x.detach() (plus noise): never differentiable in x, unlike JSIGR.
    # Eval mode freezes the adaptor and discriminator, so the value is a fixed smooth function of x.
    model, x0 = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    crit = jsigr_fast.JARN(input_shape=x0.shape[1:], noise=0.0, backend=backend).double().eval()
    penalty_part, total = _check_against_central_differences(lambda xx: crit(model, xx, Y), model, x0)
    assert penalty_part > 1e-4 * total  # the adversarial term's part
