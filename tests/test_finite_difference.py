"""mode="fd" (Finlay & Oberman): convergence to the exact penalties and gradients, its documented
quantity under train-mode BatchNorm, and the absence of any double-backward node."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast.testing import TINY_MODELS, tiny_input, tiny_model
from oracles import batch_input_gradient, batch_jacobian, fd_penalty, graph_node_names

Y = torch.tensor([0, 1, 2, 3, 0])
BACKENDS = ["reference"] + (["fused"] if "fused" in jsigr_fast.available_backends() else [])


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
    # Under train-mode BatchNorm every sample's logits move with every sample's step. fd steps along
    # the unit directions zeta_m/||zeta_m|| and scales sample n by ||zeta_n||^2; the cross terms
    # (m != n) then carry ||zeta_n||^2/||zeta_m||^2, still unbiased for sum_m ||J_nm||_F^2 (a unit
    # vector u uniform on the sphere has E||J u||^2 = ||J||_F^2 / D).
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    n = x.shape[0]
    zeta = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype).reshape(n, -1)
    norms = zeta.norm(dim=1, keepdim=True)
    J = batch_jacobian(model, x)  # (N, K, N, D)
    expect = (norms[:, 0] ** 2 * torch.einsum("mknd,nd->mk", J, zeta / norms).pow(2).sum(1)).mean()
    got = jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", mode="fd", fd_step=1e-7,
                                   generator=torch.Generator().manual_seed(3))
    assert float(got.detach()) == pytest.approx(float(expect), rel=1e-5)
    plain = torch.einsum("mknd,nd->mk", J, zeta).pow(2).sum(1).mean()  # the same zeta, stepped along itself
    assert abs(float(got.detach()) / float(plain) - 1) > 1e-4  # a different number: the test can tell


@pytest.mark.parametrize("jacobian", ["projection", "hutchinson"])
def test_fd_graph_has_no_double_backward(jacobian):
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    fd_names = graph_node_names(_terms(model, x, "fd", jacobian=jacobian)[0])
    exact_names = graph_node_names(_terms(model, x, "autograd", jacobian=jacobian)[0])
    assert any("BackwardBackward" in n for n in exact_names)  # the check can see double backward...
    assert not any("BackwardBackward" in n for n in fd_names), sorted(fd_names)  # ...and FD has none


@pytest.mark.parametrize("backend", BACKENDS)
def test_fd_running_stats_one_forward_and_inputs_untouched(backend):
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    ref = copy.deepcopy(model)
    ref(x)
    x_before = x.clone()
    _terms(model, x, "fd", jacobian="hutchinson", backend=backend)[0].backward()
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        # one plain forward's update (a second one would move the mean by 10 %); the fused
        # kernel's sums round differently from ATen's, hence not bit-equal
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert torch.equal(x, x_before) and not x.requires_grad


FD_KINDS = ["loss_projection", "loss_hutchinson", "loss_exact", "input_gradient_penalty", "jacobian_projection",
            "double_backprop"]


def _fd_run(model, x, backend, kind):
    """One fd regularizer's value, parameter gradients and buffers (running stats) afterwards."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(5)  # dropout masks
    y = torch.arange(x.shape[0]) % 4
    if kind.startswith("loss_"):
        out = jsigr_fast.loss(model, x, y, jacobian=kind[5:], n_proj=2, generator=gen, mode="fd", backend=backend)
    elif kind == "input_gradient_penalty":
        out = jsigr_fast.input_gradient_penalty(model, x, y, mode="fd", backend=backend)
    elif kind == "jacobian_projection":
        out = jsigr_fast.jacobian_norm(model, x, estimator="projection", generator=gen, mode="fd", backend=backend)
    else:
        out = jsigr_fast.double_backprop(model, x, y, mode="fd", backend=backend)
    params = [p for p in model.parameters() if p.requires_grad]
    return out.detach(), torch.autograd.grad(out, params), [b.clone() for b in model.buffers()]


# fd refuses the exact estimator under train-mode BatchNorm (test_fd_refuses_the_exact_estimator_...)
FD_CASES = [(n, k) for k in FD_KINDS for n in TINY_MODELS
            if not (k == "loss_exact" and n in ("conv_bn_train", "residual_bn", "residual_bn_relu"))]


@pytest.mark.skipif("fused" not in jsigr_fast.available_backends(), reason="fused backend unavailable")
@pytest.mark.parametrize("name, kind", FD_CASES)
def test_fd_fused_layer_rules_equal_native_layers(name, kind):
    # The same finite differences, once through ATen's layers and once through the fused backend's
    # (fused BatchNorm, conv and ReLU rules, channels-last activations): equal up to float64
    # rounding, amplified by 1/fd_step in the differences.
    model, x = tiny_model(name), tiny_input(name)
    ref = _fd_run(copy.deepcopy(model), x, "reference", kind)
    got = _fd_run(copy.deepcopy(model), x, "fused", kind)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=0)
    scale = max(g.abs().max().item() for g in ref[1])
    for i, (a, b) in enumerate(zip(ref[1], got[1])):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10 * scale, msg=lambda m, i=i: f"grad {i}: {m}")
    for a, b in zip(ref[2], got[2]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


@pytest.mark.skipif("fused" not in jsigr_fast.available_backends(), reason="fused backend unavailable")
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("layouts", [(), ("channels_last",), ("contiguous",), ("channels_last", "contiguous")])
def test_fd_fused_backend_picks_the_batch_norm_kernels(layouts, channels_last, monkeypatch):
    # fd's passes are first-order blocks: batch norm runs the fused op, except on the activation layouts
    # fused.FIRST_ORDER_ATEN_BN lists for the device, where ATen's runs (faster there, exact to first order)
    from jsigr_fast import fused

    monkeypatch.setitem(fused.CHANNELS_LAST, "cpu", channels_last)  # the activations' layout after the first conv
    monkeypatch.setitem(fused.FIRST_ORDER_ATEN_BN, "cpu", layouts)
    aten_bn = ("channels_last" if channels_last else "contiguous") in layouts
    model, x = tiny_model("residual_bn"), tiny_input("residual_bn")
    out = jsigr_fast.loss(model, x, Y, mode="fd", backend="fused", generator=torch.Generator().manual_seed(0))
    names = graph_node_names(out)
    assert ("BatchNormTrainBackward" in names) != aten_bn, sorted(names)  # the fused op's node (ops.BatchNormTrain)
    assert any("NativeBatchNorm" in n for n in names) == aten_bn, sorted(names)
    assert not any("BackwardBackward" in n for n in names), sorted(names)


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


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("estimator", ["projection", "hutchinson", "exact"])
def test_jacobian_regularization_fd_converges_to_autograd(estimator, squared):
    # Jakubovitz & Giryes' CE + lambda_j * R with R by finite differences: value and parameter
    # gradients tend to the double-backprop ones as the step shrinks (same random draws).
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    params = list(model.parameters())

    def run(mode, h=0.01):
        out, terms = jsigr_fast.jacobian_regularization(
            model, x, Y, lambda_j=0.5, squared=squared, estimator=estimator, n_proj=2, mode=mode, fd_step=h,
            generator=torch.Generator().manual_seed(0), return_terms=True)
        return terms, torch.autograd.grad(out, params)

    exact, g_exact = run("autograd")
    rough, _ = run("fd", 1e-2)
    fine, g_fine = run("fd", 1e-7)
    assert float(rough["jac"]) != pytest.approx(float(exact["jac"]), rel=1e-5)  # the O(h) bias is visible...
    assert float(fine["jac"]) == pytest.approx(float(exact["jac"]), rel=1e-5)  # ...and vanishes with h
    torch.testing.assert_close(fine["ce"], exact["ce"], rtol=1e-12, atol=0)
    for a, b in zip(g_exact, g_fine):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)


def test_jacobian_regularization_fd_updates_running_stats_once():
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    ref = copy.deepcopy(model)
    ref(x)
    jsigr_fast.jacobian_regularization(model, x, Y, estimator="projection", n_proj=2, mode="fd",
                                       generator=torch.Generator().manual_seed(0)).backward()
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_fd_gradient_on_relu_networks_carries_the_kinks():
    # The documented ReLU behaviour. The fd parameter gradient differentiates l(x + h d) - l(x); a
    # ReLU unit whose sign differs at the two ends adds an O(1/h) term (its kink) that double
    # backprop (ReLU'' = 0) does not have. Oracle for "no kink crossed": the hidden layer's sign
    # pattern at x and at x + h d, with d = g / ||g|| from an independent input gradient.
    def rel_err(a, b):
        a, b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
        return float((b - a).norm() / a.norm())

    seen = {"clean": 0, "flipped": 0}
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 256), nn.ReLU(), nn.Linear(256, 4)).double()
        x = torch.rand(64, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
        y = torch.arange(64) % 4
        params = list(model.parameters())
        exact = torch.autograd.grad(jsigr_fast.input_gradient_penalty(model, x, y, backend="reference"), params)
        g = batch_input_gradient(model, x, y)
        d = g / g.norm(dim=1, keepdim=True)
        for h in (1e-2, 1e-3, 1e-4):
            fd = torch.autograd.grad(jsigr_fast.input_gradient_penalty(model, x, y, mode="fd", fd_step=h,
                                                                       backend="reference"), params)
            flips = int(((model[0](x) > 0) != (model[0](x + h * d) > 0)).sum())
            err = rel_err(exact, fd)
            if flips == 0:  # smooth along every segment: O(h), as for tanh
                assert err < h, (seed, h, err)
                seen["clean"] += 1
            else:  # a crossed kink dominates, at any h
                assert err > 0.5, (seed, h, flips, err)
                seen["flipped"] += 1
            if h == 1e-2:  # the default step crosses kinks on this batch
                assert flips > 0
    assert seen["clean"] >= 3 and seen["flipped"] >= 5, seen  # both cases were exercised


def test_hutchinson_fd_steps_a_unit_distance():
    # fd_step is the perturbation's norm for every term. For Hutchinson that means stepping along
    # zeta/||zeta|| (and scaling by ||zeta||^2): stepping along zeta itself moves the input by
    # h sqrt(D), 0.34 here at h = 0.01, and its bias was 7.9e-4 on this model (8e-6 now).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)).double()
    x = torch.rand(5, 2, 24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # D = 1152

    def jac(mode, h=0.01):
        return float(jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", mode=mode, fd_step=h,
                                              generator=torch.Generator().manual_seed(3)).detach())

    exact = jac("autograd")
    assert abs(jac("fd") / exact - 1) < 1e-4
    assert jac("fd", 1e-7) == pytest.approx(exact, rel=1e-6)  # same draws: the same estimate as h -> 0


@pytest.mark.parametrize("how", ["autocast", "input"])
def test_fd_in_half_precision_warns(how):
    model, x = tiny_model("conv_tanh", dtype=torch.float32), tiny_input("conv_tanh", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32: no warning
        jsigr_fast.input_gradient_penalty(model, x, Y, mode="fd")
    if how == "input":
        model, x = model.bfloat16(), x.bfloat16()
    with pytest.warns(RuntimeWarning, match="mode='fd' with torch.bfloat16 forwards"), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
        jsigr_fast.loss(model, x, Y, mode="fd", generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="mode='fd'"), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
        jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", mode="fd")


def test_fd_refuses_the_exact_estimator_on_coupled_models():
    # Under train-mode BatchNorm fd's K class directions measure sum_k ||J^T e_k||^2, not the exact
    # (1/N) ||dZ/dX||^2 (ResNet-20: 71-72 % low at any step); the API says so before any work.
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    before = copy.deepcopy(model.state_dict())
    crit = jsigr_fast.JSIGR((2, 6, 6), discriminator=(4,), mode="fd", jacobian="exact").double()
    crit_before = copy.deepcopy(crit.state_dict())
    calls = [lambda: jsigr_fast.loss(model, x, Y, jacobian="exact", mode="fd"),
             lambda: jsigr_fast.jacobian_norm(model, x, estimator="exact", mode="fd"),
             lambda: jsigr_fast.jacobian_regularization(model, x, Y, estimator="exact", mode="fd"),
             lambda: crit(model, x, Y)]
    for call in calls:
        with pytest.raises(ValueError, match="estimator='exact' with mode='fd' needs a model whose samples"):
            call()
    for k, v in model.state_dict().items():  # nothing ran: running statistics untouched
        assert torch.equal(v, before[k]), k
    for k, v in crit.state_dict().items():  # nor the adaptor's training step
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, crit_before[k]), k
    # not refused: no lambda_j, eval mode, or the stochastic estimators
    jsigr_fast.loss(model, x, Y, jacobian="exact", mode="fd", lambda_j=0.0)
    jsigr_fast.jacobian_norm(model, x, estimator="projection", mode="fd")
    jsigr_fast.jacobian_norm(tiny_model("conv_bn_eval"), x, estimator="exact", mode="fd")


# ---- the perturbed forwards' graphs are differentiated early and freed (finite_difference._free_early) ----
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("term", ["input_gradient", "projection", "hutchinson"])
@pytest.mark.parametrize("name", ["conv_bn_train", "residual_bn", "conv_tanh"])
def test_fd_gradients_equal_the_formula_with_every_graph_kept(name, term, backend):
    # At h = 0.01, where the fd gradient is far from the exact one, so the parameter gradient of the
    # perturbed forward (taken early, its graph freed) is a large part of it: without it the
    # comparison fails. The oracle keeps all graphs and differentiates once at the end.
    base, x = tiny_model(name), tiny_input(name)
    h = 0.01
    ours, oracle = copy.deepcopy(base), copy.deepcopy(base)
    if term == "input_gradient":
        value = jsigr_fast.input_gradient_penalty(ours, x, Y, mode="fd", fd_step=h, backend=backend)
        expected = fd_penalty(oracle, x, h, y=Y)
    else:
        value = jsigr_fast.jacobian_norm(ours, x, estimator=term, mode="fd", fd_step=h, backend=backend,
                                         generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(0)
        if term == "projection":
            v = torch.randn(x.shape[0], 4, generator=gen, dtype=x.dtype)
            expected = fd_penalty(oracle, x, h, v=v / v.norm(dim=1, keepdim=True))
        else:
            expected = fd_penalty(oracle, x, h, zeta=torch.randn(x.shape, generator=gen, dtype=x.dtype))
    grads = torch.autograd.grad(value, list(ours.parameters()))
    expected_grads = torch.autograd.grad(expected, list(oracle.parameters()))
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    for a, b in zip(grads, expected_grads):  # atol: BN shifts' gradients cancel to ~1e-12 in both
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # and the early part is not negligible here (else the check above could not fail)
    m = copy.deepcopy(base)
    exact = torch.autograd.grad(
        jsigr_fast.input_gradient_penalty(m, x, Y, backend="reference") if term == "input_gradient"
        else jsigr_fast.jacobian_norm(m, x, estimator=term, backend="reference",
                                      generator=torch.Generator().manual_seed(0)),
        list(m.parameters()), allow_unused=True, materialize_grads=True)  # e.g. the last bias: unused
    assert any(float((a - b).norm()) > 1e-6 * float(b.norm()) for a, b in zip(grads, exact))


def test_fd_jsigr_loss_gradients_equal_the_formula_with_every_graph_kept():
    # the whole J-SIGR fd loss (no mask): CE + 0.5 (input-gradient penalty) + 0.5 (projection term)
    base, x = tiny_model("residual_bn"), tiny_input("residual_bn")
    ours, oracle = copy.deepcopy(base), copy.deepcopy(base)
    loss = jsigr_fast.loss(ours, x, Y, saliency="none", mode="fd", fd_step=0.01,
                           generator=torch.Generator().manual_seed(0))
    v = torch.randn(x.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    expected = (F.cross_entropy(oracle(x), Y) + 0.5 * fd_penalty(oracle, x, 0.01, y=Y)
                + 0.5 * fd_penalty(oracle, x, 0.01, v=v / v.norm(dim=1, keepdim=True)))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    for a, b in zip(torch.autograd.grad(loss, list(ours.parameters())),
                    torch.autograd.grad(expected, list(oracle.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_fd_per_sample_values_refuse_unequal_weights():
    # the early gradients are of the values' sum: any uniform weight is exact (a sum, a scaled mean),
    # an unequal one is an error, not a silently wrong gradient
    from jsigr_fast import finite_difference

    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    params = list(model.parameters())
    per = finite_difference.jacobian_norm(model, x, estimator="projection", generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(3 * per["per_sample"].sum(), params, retain_graph=True)
    expected = torch.autograd.grad(per["jac"], params, retain_graph=True)  # the mean: 1/N each
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, 3 * x.shape[0] * b, rtol=1e-10, atol=1e-10)
    weights = torch.arange(x.shape[0], dtype=x.dtype)
    with pytest.raises(RuntimeError, match="weighted unequally"):
        torch.autograd.grad((weights * per["per_sample"]).sum(), params)


def test_fd_takes_no_early_gradient_under_no_grad():
    # values only (evaluation): no backward through the perturbed forwards; in grad mode there is
    # one, before the caller's (so a tensor hook on a parameter sees that part first, then the total)
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    seen = []
    w = next(model.parameters())
    w.register_hook(lambda g: seen.append(g.clone()))
    with torch.no_grad():
        value = jsigr_fast.input_gradient_penalty(model, x, Y, mode="fd")
    assert not seen
    loss = jsigr_fast.input_gradient_penalty(model, x, Y, mode="fd")
    assert len(seen) == 1  # the early backward of the perturbed forward
    (total,) = torch.autograd.grad(loss, [w])
    assert len(seen) == 2 and torch.equal(seen[1], total)
    assert float(value.detach()) == pytest.approx(float(loss.detach()), rel=1e-12)


def test_fd_grad_scale_scales_the_early_backward_and_undoes_it():
    # grad_scale multiplies the early backward's cotangent (fp16: no underflow) and divides its result:
    # in float64 the gradients are those without it, for a float and for a tensor scale
    base, x = tiny_model("residual_bn"), tiny_input("residual_bn")
    grads = []
    for scale in (None, 1024.0, torch.tensor(2.0 ** 14, dtype=torch.float64)):
        m = copy.deepcopy(base)
        loss = jsigr_fast.loss(m, x, Y, saliency="none", mode="fd", grad_scale=scale,
                               generator=torch.Generator().manual_seed(0))
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    for scaled in grads[1:]:
        for a, b in zip(scaled, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.skipif("fused" not in jsigr_fast.available_backends(), reason="fused backend unavailable")
@pytest.mark.parametrize("gpu_like", [True, False])
def test_fd_first_order_blocks_skip_the_mode_where_the_device_keeps_atens_layers(gpu_like, monkeypatch):
    # With the H200's first-order settings (no relayout, ATen's conv / ReLU / batch norm in both layouts) the
    # fused fd loss (and its perturbed saliency pass) runs no rerouting mode: the reference's computation,
    # bit for bit. With the CPU's it does run one (the channels-last relayout, the fused batch norm).
    from jsigr_fast import fused

    if gpu_like:
        monkeypatch.setitem(fused.CHANNELS_LAST, "cpu", False)
        monkeypatch.setitem(fused.FIRST_ORDER_ATEN_BN, "cpu", ("channels_last", "contiguous"))
    modes = []
    real_init = fused._FusedMode.__init__
    monkeypatch.setattr(fused._FusedMode, "__init__", lambda self, **kw: modes.append(kw) or real_init(self, **kw))
    model, x = tiny_model("residual_bn"), tiny_input("residual_bn")
    runs = {}
    for backend in ("reference", "fused"):
        m = copy.deepcopy(model)
        out = jsigr_fast.loss(m, x, Y, mode="fd", backend=backend, generator=torch.Generator().manual_seed(0))
        runs[backend] = (out.detach(), torch.autograd.grad(out, list(m.parameters())))
    assert (not modes) == gpu_like, modes
    (ref, ref_g), (got, got_g) = runs["reference"], runs["fused"]
    if gpu_like:
        assert torch.equal(got, ref) and all(torch.equal(a, b) for a, b in zip(got_g, ref_g))
    else:
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
