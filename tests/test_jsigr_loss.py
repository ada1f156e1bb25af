"""jsigr_fast.loss end to end against an independently written J-SIGR, plus its contracts:
running statistics, no mutation of the caller's tensors, any classifier, backends agree."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast.testing import DETERMINISTIC_MODELS, TINY_MODELS, tiny_input, tiny_model
from oracles import batch_input_gradient, batch_jacobian, directional_fd, random_direction

BACKENDS = ["reference"] + (["fused"] if "fused" in jsigr_fast.available_backends() else [])


def _labels(n, k=4, seed=0):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def oracle_jsigr(model, x, y, *, lambda_m, lambda_j, eps, beta, seed):
    """J-SIGR Eq. 10 from the definitions, replaying the library's random draws from the same seed:
    first z (x's shape) for the perturbation, then one v per sample for the projection."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x_hat = x + eps * x.std(unbiased=False) * z
    g_hat = batch_input_gradient(model, x_hat, y)
    M = g_hat.abs() / g_hat.abs().reshape(n, -1).amax(1).view(-1, *[1] * (x.dim() - 1))
    mask = (M <= beta).to(x.dtype)
    g = batch_input_gradient(model, x, y)
    sig = (mask * g).reshape(n, -1).pow(2).sum(1).mean()
    J = batch_jacobian(model, x)  # (N, K, N, D)
    k = J.shape[1]
    v = torch.randn((n, k), generator=gen, dtype=x.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    u = torch.einsum("mk,mknd->nd", v, J)
    jac = (k * u.pow(2).sum(1)).mean()
    with torch.no_grad():
        ce = F.cross_entropy(copy.deepcopy(model)(x), y)
    return ce + lambda_m * sig + lambda_j * jac, {"ce": ce, "sig": sig, "jac": jac, "mask": mask}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["conv_tanh", "conv_bn_train", "layernorm_silu", "mlp", "residual_bn"])
def test_loss_matches_independent_oracle(name, backend):
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x.shape[0])
    kw = dict(lambda_m=0.7, lambda_j=0.3, eps=0.3, beta=0.4)
    expect, parts = oracle_jsigr(model, x, y, seed=7, **kw)
    got, terms = jsigr_fast.loss(model, x, y, **kw, generator=torch.Generator().manual_seed(7), backend=backend,
                                 return_terms=True)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=0)
    for key in ("ce", "sig", "jac"):
        torch.testing.assert_close(terms[key], parts[key], rtol=1e-10, atol=0)
    torch.testing.assert_close(terms["mask_fraction"], parts["mask"].mean(), rtol=0, atol=0)
    assert 0 < float(terms["mask_fraction"]) < 1  # the mask really selects


@pytest.mark.parametrize("name", ["conv_tanh", "conv_bn_train"])
def test_exact_jacobian_and_precomputed_saliency(name):
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x.shape[0])
    M = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    mask = (M <= 0.5).to(x.dtype)
    n = x.shape[0]
    g = batch_input_gradient(model, x, y)
    jac = batch_jacobian(model, x).pow(2).sum() / n
    ce = F.cross_entropy(copy.deepcopy(model)(x), y)
    expect = ce + 0.5 * (mask * g).reshape(n, -1).pow(2).sum(1).mean() + 0.5 * jac
    got = jsigr_fast.loss(model, x, y, saliency=M, beta=0.5, jacobian="exact")
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=0)


def test_perturbed_gradient_definition():
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    y = _labels(x.shape[0])
    # eps = 0: the plain input gradient at x
    torch.testing.assert_close(jsigr_fast.perturbed_input_gradient(model, x, y, eps=0.0),
                               batch_input_gradient(model, x, y), rtol=1e-12, atol=0)
    # eps > 0: the gradient at x + eps * std(x) * z
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    got = jsigr_fast.perturbed_input_gradient(model, x, y, eps=0.3, generator=torch.Generator().manual_seed(9))
    expect = batch_input_gradient(model, x + 0.3 * x.std(unbiased=False) * z, y)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=0)


def test_mask_semantics_threshold_and_quantile():
    M = torch.tensor([[0.0, 0.1, 0.2, 0.5, 0.9], [1.0, 0.3, 0.05, 0.1, 0.6]])
    # beta: penalise (1) features at or below beta, leave the salient ones (0)
    assert jsigr_fast.selective_mask(M, beta=0.1).tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]
    # quantile q: leave the top q fraction unpenalised, per sample (here 2 of 5)
    assert jsigr_fast.selective_mask(M, quantile=0.4).tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0]]
    assert jsigr_fast.selective_mask(M, quantile=0.0).tolist() == [[1] * 5] * 2
    assert jsigr_fast.selective_mask(M, quantile=1.0).tolist() == [[0] * 5] * 2


def test_mask_quantile_keeps_exactly_q_d_features():
    # the top q fraction is floor(q D) features in exact arithmetic, not floor of the rounded q * D:
    # 0.29 * 100 == 28.999999999999996 in floating point, yet q = 0.29 of 100 features is 29
    from fractions import Fraction

    from jsigr_fast.saliency import quantile_kept

    M = torch.arange(1, 101, dtype=torch.float64).unsqueeze(0) / 100
    for q, kept in [(0.29, 29), (0.57, 57), (0.58, 58), (1 / 3, 33), (0.0, 0), (1.0, 100)]:
        assert (jsigr_fast.selective_mask(M, quantile=q) == 0).sum() == kept, q
    assert quantile_kept(1 / 3, 3072) == 1024 and quantile_kept(1 / 3, 3) == 1
    for D in [*range(1, 30), 100, 1000, 150528]:
        for i in range(101):
            assert quantile_kept(i / 100, D) == (Fraction(i, 100) * D).__floor__(), (i, D)


def test_default_saliency_scale():
    g = torch.tensor([[[-4.0, 2.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    M = jsigr_fast.gradient_saliency(g)
    assert M.tolist() == [[[1.0, 0.5], [0.25, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]


def test_mask_quantile_in_loss():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    y = _labels(x.shape[0])
    _, terms = jsigr_fast.loss(model, x, y, mask_quantile=0.25, return_terms=True)
    d = x[0].numel()
    assert float(terms["mask_fraction"]) == pytest.approx((d - int(0.25 * d)) / d, abs=1e-12)


@pytest.mark.parametrize("estimator", ["projection", "hutchinson", "exact"])
@pytest.mark.parametrize("name", ["conv_bn_train", "residual_bn"])
def test_running_stats_change_exactly_as_one_training_forward(name, estimator):
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x.shape[0])
    reference = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    reference(x)  # one ordinary training forward
    jsigr_fast.loss(model, x, y, jacobian=estimator).backward()
    # equal to rounding: the default (fused) backend runs channels-last convolutions on CPU
    # (jsigr_fast.fused.CHANNELS_LAST), which round differently from the NCHW forward; a second
    # update, a missed one or one from the perturbed input would be off by far more than 1e-12
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=k)
            assert not torch.equal(a, before[k]) or torch.equal(b, before[k]), k
        else:
            assert torch.equal(a, b), k


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("estimator", ["projection", "hutchinson"])
def test_tracked_instance_norm_updates_once_and_not_in_the_bare_estimators(estimator, backend):
    # InstanceNorm passes its running buffers to F.instance_norm whatever track_running_stats says,
    # so the auxiliary passes (perturbed input, forward-mode JVP) used to update them too: 2-3 times
    if backend not in jsigr_fast.available_backends():
        pytest.skip("extension not built")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
                          nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 4)).double()
    x = tiny_input("conv_tanh")
    y = _labels(x.shape[0])
    once = copy.deepcopy(model)
    once(x)
    jsigr_fast.loss(model, x, y, jacobian=estimator, backend=backend).backward()
    for (k, a), b in zip(model.state_dict().items(), once.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=k)
    before = copy.deepcopy(model.state_dict())
    jsigr_fast.jacobian_norm(model, x, estimator=estimator, backend=backend)
    jsigr_fast.input_gradient_penalty(model, x, y, backend=backend)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[1].running_mean is not None and model[1].track_running_stats  # restored


def test_running_stats_cumulative_momentum():
    model = tiny_model("conv_bn_train")
    model[0][1].momentum = None  # cumulative moving average: counts num_batches_tracked
    x, y = tiny_input("conv_bn_train"), _labels(5)
    reference = copy.deepcopy(model)
    for _ in range(2):
        reference(x)
        jsigr_fast.loss(model, x, y, jacobian="hutchinson")
    # statistics equal to rounding (channels-last convolutions, see the test above); the counter exactly
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=k)
        else:
            assert torch.equal(a, b), k


@pytest.mark.parametrize("requires_grad", [False, True])
def test_caller_tensors_and_model_mode_untouched(requires_grad):
    for mode in ("train", "eval"):
        model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
        getattr(model, mode)()
        x.requires_grad_(requires_grad)
        y = _labels(x.shape[0])
        x_before, y_before = x.detach().clone(), y.clone()
        loss = jsigr_fast.loss(model, x, y, jacobian="hutchinson")
        loss.backward()
        assert torch.equal(x.detach(), x_before) and torch.equal(y, y_before)
        assert x.requires_grad is requires_grad
        assert (x.grad is not None) is requires_grad  # differentiable w.r.t. x only when the caller asked
        assert model.training is (mode == "train")


def test_lambda_zero_switches_terms_off():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    y = _labels(x.shape[0])
    ce = F.cross_entropy(model(x), y)
    torch.testing.assert_close(jsigr_fast.loss(model, x, y, lambda_m=0, lambda_j=0), ce, rtol=1e-12, atol=0)
    _, terms = jsigr_fast.loss(model, x, y, lambda_m=0, return_terms=True)
    assert float(terms["sig"]) == 0 and float(terms["jac"]) > 0


def test_saliency_none_is_plain_input_gradient_penalty():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    y = _labels(x.shape[0])
    got = jsigr_fast.loss(model, x, y, lambda_j=0, lambda_m=1.0, saliency="none")
    expect = F.cross_entropy(model(x), y) + jsigr_fast.input_gradient_penalty(model, x, y)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=0)


def test_callable_saliency_gets_perturbed_gradient():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    y = _labels(x.shape[0])
    seen = {}

    def saliency(g_hat, x_in):
        seen["g"], seen["x"] = g_hat, x_in
        return torch.zeros_like(x_in)  # everything at or below beta: penalise all

    got = jsigr_fast.loss(model, x, y, saliency=saliency, eps=0.0, lambda_j=0)
    torch.testing.assert_close(seen["g"], batch_input_gradient(model, x, y), rtol=1e-12, atol=0)
    expect = F.cross_entropy(model(x), y) + 0.5 * jsigr_fast.input_gradient_penalty(model, x, y)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["conv_bn_train", "layernorm_silu", "maxpool_relu"])
@pytest.mark.parametrize("jacobian", ["projection", "hutchinson"])
def test_loss_parameter_gradient_matches_finite_differences(name, jacobian):
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x.shape[0])
    params = list(model.parameters())
    direction = random_direction(params)

    def value():
        return jsigr_fast.loss(model, x, y, jacobian=jacobian, beta=0.3, generator=torch.Generator().manual_seed(1))

    grads = torch.autograd.grad(value(), params, allow_unused=True)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)
    assert analytic == pytest.approx(directional_fd(value, params, direction), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("jacobian", ["projection", "hutchinson", "exact"])
def test_any_classifier_all_backends_agree(name, jacobian):
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x.shape[0])
    results = []
    for backend in BACKENDS:
        torch.manual_seed(0)  # dropout masks
        loss = jsigr_fast.loss(model, x, y, jacobian=jacobian, backend=backend, generator=torch.Generator().manual_seed(2))
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        assert torch.isfinite(loss)
        results.append((loss.detach(), grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-10, atol=0)
        for a, b in zip(grads, results[0][1]):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_float32_model_and_auto_backend():
    model = tiny_model("conv_bn_train", dtype=torch.float32)
    x = tiny_input("conv_bn_train", dtype=torch.float32)
    y = _labels(x.shape[0])
    ref = jsigr_fast.loss(model, x, y, backend="reference", generator=torch.Generator().manual_seed(0))
    auto = jsigr_fast.loss(model, x, y, backend="auto", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(auto, ref)
    assert ref.dtype == torch.float32


def test_single_sample_batch():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh", n=1)
    loss = jsigr_fast.loss(model, x, _labels(1))
    assert torch.isfinite(loss)
    loss.backward()


def test_channels_last_input():
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    y = _labels(x.shape[0])
    a = jsigr_fast.loss(model, x, y, generator=torch.Generator().manual_seed(0))
    b = jsigr_fast.loss(model, x.contiguous(memory_format=torch.channels_last), y,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


_PUBLIC_LOSSES = {
    "loss": lambda m, x, y, **kw: jsigr_fast.loss(m, x, y, generator=torch.Generator().manual_seed(0), **kw),
    "loss_hutchinson": lambda m, x, y, **kw: jsigr_fast.loss(m, x, y, jacobian="hutchinson",
                                                              generator=torch.Generator().manual_seed(0), **kw),
    "loss_fd": lambda m, x, y, **kw: jsigr_fast.loss(m, x, y, mode="fd", generator=torch.Generator().manual_seed(0),
                                                      **kw),
    "input_gradient_penalty": lambda m, x, y, **kw: jsigr_fast.input_gradient_penalty(m, x, y, **kw),
    "jacobian_exact": lambda m, x, y, **kw: jsigr_fast.jacobian_norm(m, x, estimator="exact", **kw),
    "jacobian_projection": lambda m, x, y, **kw: jsigr_fast.jacobian_norm(
        m, x, estimator="projection", generator=torch.Generator().manual_seed(0), **kw),
    "jacobian_hutchinson": lambda m, x, y, **kw: jsigr_fast.jacobian_norm(
        m, x, estimator="hutchinson", generator=torch.Generator().manual_seed(0), **kw),
    "jacobian_regularization": lambda m, x, y, **kw: jsigr_fast.jacobian_regularization(m, x, y, **kw),
    "double_backprop": lambda m, x, y, **kw: jsigr_fast.double_backprop(m, x, y, **kw),
    "interpretation": lambda m, x, y, **kw: jsigr_fast.interpretation_regularization(m, x, y, torch.sin(3 * x),
                                                                                      **kw),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", sorted(_PUBLIC_LOSSES))
def test_no_grad_context_gives_the_value_without_a_graph(what, backend):
    # under no_grad every loss is a value, as a PyTorch op's result is (some paths used to return a
    # graph there and others not); oracle: the same call with grad on, same value
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    y = _labels(x.shape[0])
    call = _PUBLIC_LOSSES[what]
    with torch.no_grad():
        quiet = call(copy.deepcopy(model), x, y, backend=backend)
    assert not quiet.requires_grad and quiet.grad_fn is None
    loud = call(copy.deepcopy(model), x, y, backend=backend)
    assert loud.requires_grad
    torch.testing.assert_close(quiet, loud.detach(), rtol=1e-12, atol=0)
    if what in ("loss", "double_backprop"):  # (loss, terms) too
        with torch.no_grad():
            pair = call(copy.deepcopy(model), x, y, backend=backend, return_terms=True)
        assert not pair[0].requires_grad and not any(t.requires_grad for t in pair[1].values())


def test_user_model_nn_module_subclass():
    class Net(nn.Module):  # a user's own classifier with a functional relu and a residual add
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = F.relu(self.c1(x))
            h = h + F.silu(self.c2(h))
            return self.fc(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Net().double()
    x = tiny_input("conv_tanh")
    y = _labels(x.shape[0], k=3)
    expect, _ = oracle_jsigr(model, x, y, lambda_m=0.5, lambda_j=0.5, eps=0.3, beta=0.1, seed=4)
    got = jsigr_fast.loss(model, x, y, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=0)


def test_trained_adaptor_can_be_passed_as_saliency():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    adaptor = jsigr_fast.SaliencyAdaptor(2).double()
    got = jsigr_fast.loss(model, x, _labels(5), saliency=adaptor, beta=0.0, generator=torch.Generator().manual_seed(0))
    expect = jsigr_fast.loss(model, x, _labels(5), saliency=lambda g, _: adaptor(g), beta=0.0,
                             generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


# --- torch.compile'd models: PyTorch cannot differentiate a compiled graph twice (pytorch#91469), so
# the losses run the original module, with a warning once per model
COMPILED_CALLS = {
    "loss": lambda m, x, y, g: jsigr_fast.loss(m, x, y, generator=g),
    "loss_fd": lambda m, x, y, g: jsigr_fast.loss(m, x, y, generator=g, mode="fd"),
    "double_backprop": lambda m, x, y, g: jsigr_fast.double_backprop(m, x, y),
    "jacobian_regularization": lambda m, x, y, g: jsigr_fast.jacobian_regularization(m, x, y, generator=g),
    "jsigr_module": lambda m, x, y, g: jsigr_fast.JSIGR((2, 6, 6), discriminator=(4,)).double().eval()(
        m, x, y, generator=g),
}


@pytest.mark.parametrize("call", sorted(COMPILED_CALLS))
def test_compiled_model_runs_its_original_module(call):
    # aot_eager: aot_autograd, whose compiled graph refuses a double backward ("does not currently
    # support double backward"; mode="fd": "donated buffers"), without inductor's code generation
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    y = torch.tensor([0, 1, 2, 3, 0])
    fn = COMPILED_CALLS[call]
    torch.manual_seed(0)
    want = fn(model, x, y, torch.Generator().manual_seed(1))
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.warns(UserWarning, match="torch.compile'd.*pytorch#91469"):
        torch.manual_seed(0)
        got = fn(compiled, x, y, torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per model
        fn(compiled, x, y, torch.Generator().manual_seed(1))


def test_parallel_wrapper_around_a_compiled_model_is_refused_with_the_fix():
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    wrapped = nn.DataParallel(torch.compile(model, backend="aot_eager"))
    with pytest.raises(ValueError, match="DataParallel around a torch.compile'd module.*wrap the uncompiled"):
        jsigr_fast.loss(wrapped, x, torch.tensor([0, 1, 2, 3, 0]))


def test_losses_do_not_import_dynamo():
    # the compiled-model check looks only at an already imported torch._dynamo: importing it costs
    # seconds (measured 2-6 s here), which every first loss call in a process would otherwise pay
    import subprocess
    import sys

    code = ("import sys, torch, torch.nn as nn, jsigr_fast\n"
            "m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))\n"
            "x, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 3])\n"
            "for backend in jsigr_fast.available_backends():\n"
            "    jsigr_fast.loss(m, x, y, backend=backend).backward()\n"
            "    jsigr_fast.jacobian_regularization(m, x, y, backend=backend).backward()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
