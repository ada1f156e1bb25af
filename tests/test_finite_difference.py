"""mode="fd" (Finlay & Oberman): convergence to the exact penalties and gradients, its documented
quantity under train-mode BatchNorm, and the absence of any double-backward node."""
import copy

import pytest
import torch
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast.testing import tiny_input, tiny_model
from oracles import batch_input_gradient, batch_jacobian, graph_node_names

Y = torch.tensor([0, 1, 2, 3, 0])


def _terms(model, x, mode, h=0.01, jacobian="projection", **kw):
    return jsigr_fast.loss(model, x, Y, jacobian=jacobian, generator=torch.Generator().manual_seed(0), mode=mode,
                           fd_step=h, return_terms=True, **kw)


@pytest.mark.parametrize("jacobian", ["projection", "hutchinson", "exact"])
@pytest.mark.parametrize("name", ["conv_tanh", "layernorm_silu", "groupnorm_gelu"])
def test_bias_is_first_order_in_the_step(name, jacobian):
    model, x = tiny_model(name), tiny_input(name)
    _, exact = _terms(model, x, "autograd", jacobian=jacobian)
    errs = []
    for h in (1e-2, 1e-3, 1e-4):
        _, fd = _terms(model, x, "fd", h, jacobian=jacobian)
        errs.append([abs(float(fd[k] / exact[k]) - 1) for k in ("sig", "jac")])
    for (a_sig, a_jac), (b_sig, b_jac) in zip(errs, errs[1:]):
        # O(h): ten times smaller step, about ten times smaller error (4x-25x allows for the O(h^2) part)
        assert 4 < a_sig / b_sig < 25 and 4 < a_jac / b_jac < 25, errs
    _, fd = _terms(model, x, "fd", 1e-7, jacobian=jacobian)
    for k in ("sig", "jac"):
        assert float(fd[k]) == pytest.approx(float(exact[k]), rel=1e-5)


@pytest.mark.parametrize("name", ["conv_tanh", "layernorm_silu", "conv_bn_eval"])
def test_parameter_gradient_converges_to_double_backprop(name):
    model, x = tiny_model(name), tiny_input(name)
    params = list(model.parameters())
    exact = torch.autograd.grad(_terms(model, x, "autograd")[0], params)
    fd = torch.autograd.grad(_terms(model, x, "fd", 1e-7)[0], params)
    for a, b in zip(exact, fd):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)


def test_masked_direction_gives_masked_penalty():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)  # a soft mask too
    exact = jsigr_fast.input_gradient_penalty(model, x, Y, mask=mask)
    fd = jsigr_fast.input_gradient_penalty(model, x, Y, mask=mask, mode="fd", fd_step=1e-7)
    assert float(fd.detach()) == pytest.approx(float(exact.detach()), rel=1e-5)


def test_train_mode_batchnorm_measures_the_documented_quantity():
    # Perturbing every sample at once moves the batch statistics too: the FD penalty converges to
    # mean_n (sum_m dl_n/dx_m . d_m)^2 with d_m = g_m/||g_m|| — not the exact path's mean_n ||g_n||^2.
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    n = x.shape[0]
    g = batch_input_gradient(model, x, Y).reshape(n, -1)
    d = g / g.norm(dim=1, keepdim=True)
    # Jacobian of the per-sample losses (N, N*D), built by a loop over samples
    m = copy.deepcopy(model)
    xg = x.clone().requires_grad_(True)
    losses = F.cross_entropy(m(xg), Y, reduction="none")
    rows = torch.stack([torch.autograd.grad(losses[i], xg, retain_graph=True)[0].reshape(n, -1) for i in range(n)])
    expect = torch.einsum("imd,md->i", rows, d).pow(2).mean()
    fd = jsigr_fast.input_gradient_penalty(model, x, Y, mode="fd", fd_step=1e-7).detach()
    assert float(fd) == pytest.approx(float(expect), rel=1e-5)
    exact = jsigr_fast.input_gradient_penalty(model, x, Y).detach()
    assert abs(float(fd) / float(exact) - 1) > 2e-5  # a different number (1.3e-4 here), well above the FD error


def test_hutchinson_fd_matches_batch_jacobian_product():
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    zeta = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    J = batch_jacobian(model, x)  # (N, K, N, D)
    expect = torch.einsum("mknd,nd->mk", J, zeta.reshape(x.shape[0], -1)).pow(2).sum(1).mean()
    got = jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", mode="fd", fd_step=1e-7,
                                   generator=torch.Generator().manual_seed(3))
    assert float(got.detach()) == pytest.approx(float(expect), rel=1e-5)


@pytest.mark.parametrize("jacobian", ["projection", "hutchinson"])
def test_fd_graph_has_no_double_backward(jacobian):
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    fd_names = graph_node_names(_terms(model, x, "fd", jacobian=jacobian)[0])
    exact_names = graph_node_names(_terms(model, x, "autograd", jacobian=jacobian)[0])
    assert any("BackwardBackward" in n for n in exact_names)  # the check can see double backward...
    assert not any("BackwardBackward" in n for n in fd_names), sorted(fd_names)  # ...and FD has none


def test_fd_running_stats_one_forward_and_inputs_untouched():
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    ref = copy.deepcopy(model)
    ref(x)
    x_before = x.clone()
    _terms(model, x, "fd", jacobian="hutchinson")[0].backward()
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(x, x_before) and not x.requires_grad


def test_fd_jsigr_module_and_errors():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    crit = jsigr_fast.JSIGR((2, 6, 6), discriminator=(4,), mode="fd").double().eval()
    a = crit(model, x, Y, generator=torch.Generator().manual_seed(0))
    b = jsigr_fast.loss(model, x, Y, saliency=lambda g, _: crit.adaptor(g), beta=crit.beta, mode="fd",
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        jsigr_fast.loss(model, x, Y, mode="finite")
    with pytest.raises(ValueError, match="fd_step must be > 0"):
        jsigr_fast.loss(model, x, Y, mode="fd", fd_step=0.0)
