"""backend="fused" against backend="reference": same loss, same parameter gradients, same running
statistics, for every regularizer on every tiny model; and the fused BatchNorm really is used."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast import fused, ops
from jsigr_fast.testing import TINY_MODELS, tiny_input, tiny_model
from oracles import graph_node_names

pytestmark = pytest.mark.skipif("fused" not in jsigr_fast.available_backends(),
                                reason=f"fused backend unavailable: {jsigr_fast.extension_error()}")

REGULARIZERS = ["loss_projection", "loss_exact", "loss_hutchinson", "input_gradient_penalty", "jacobian_exact",
                "jacobian_projection", "jacobian_hutchinson", "jacreg_exact", "jacreg_projection", "jacreg_hutchinson",
                "interpretation", "double_backprop"]
BN_MODELS = ("conv_bn_train", "residual_bn")


def _labels(x):
    return torch.arange(x.shape[0]) % 4


def _run(model, x, y, backend, kind, n_proj=2):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(5)  # dropout masks
    if kind.startswith("loss_"):
        out = jsigr_fast.loss(model, x, y, jacobian=kind[5:], backend=backend, generator=gen, n_proj=n_proj)
    elif kind == "input_gradient_penalty":
        out = jsigr_fast.input_gradient_penalty(model, x, y, backend=backend)
    elif kind.startswith("jacobian_"):
        out = jsigr_fast.jacobian_norm(model, x, estimator=kind[9:], backend=backend, generator=gen)
    elif kind.startswith("jacreg_"):  # Jakubovitz & Giryes: CE + lambda_j * mean_n ||J_n||^2, n_proj probes
        out = jsigr_fast.jacobian_regularization(model, x, y, estimator=kind[7:], backend=backend, generator=gen,
                                                 n_proj=n_proj + 1)
    elif kind == "interpretation":  # Noack et al.: cosine to fixed interpretations + gradient magnitude
        out = jsigr_fast.interpretation_regularization(model, x, y, torch.sin(3 * x) + 0.1, backend=backend)
    else:
        out = jsigr_fast.double_backprop(model, x, y, backend=backend)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, params, allow_unused=True)
    return out.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def _compare(ref, got, rtol, atol_scale, *, none_for_zero=False):
    (lr, gr, sr), (lf, gf, sf) = ref, got
    torch.testing.assert_close(lf, lr, rtol=rtol, atol=atol_scale * lr.abs().item())
    # a parameter whose true gradient is 0 (a conv bias before train-mode BN) carries rounding noise:
    # compare every gradient with an atol relative to the largest gradient of the model
    scale = max(g.abs().max().item() for g in gr if g is not None)
    for i, (a, b) in enumerate(zip(gr, gf)):
        if none_for_zero and a is not None and b is None:
            # the README's difference in form: a parameter reaching the bare Jacobian norm only through a ReLU's
            # on/off pattern gets None from the fused ReLU rule, zeros from the reference
            assert a.abs().max().item() <= atol_scale * scale, f"gradient {i}: None from fused, nonzero reference"
            continue
        assert (a is None) == (b is None), f"gradient {i}: one backend has none"
        if a is not None:
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol_scale * scale, msg=lambda m, i=i: f"grad {i}: {m}")
    for k in sr:
        torch.testing.assert_close(sf[k], sr[k], rtol=rtol, atol=atol_scale, msg=lambda m, k=k: f"buffer {k}: {m}")


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("kind", REGULARIZERS)
def test_fused_equals_reference_float64(name, kind):
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x)
    ref = _run(copy.deepcopy(model), x, y, "reference", kind)
    got = _run(copy.deepcopy(model), x, y, "fused", kind)
    _compare(ref, got, rtol=1e-10, atol_scale=1e-12, none_for_zero=kind.startswith("jacobian_"))


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("kind", ["loss_projection", "loss_hutchinson", "double_backprop"])
def test_fused_equals_reference_float32(name, kind):
    model, x = tiny_model(name, dtype=torch.float32), tiny_input(name, dtype=torch.float32)
    y = _labels(x)
    ref = _run(copy.deepcopy(model), x, y, "reference", kind)
    got = _run(copy.deepcopy(model), x, y, "fused", kind)
    (lr, gr, sr), (lf, gf, sf) = ref, got
    torch.testing.assert_close(lf, lr)
    scale = max(g.abs().max().item() for g in gr if g is not None)
    for a, b in zip(gr, gf):
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5 * max(scale, 1.0), rtol=1.3e-6)
    for k in sr:
        torch.testing.assert_close(sf[k], sr[k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", BN_MODELS)
@pytest.mark.parametrize("kind", ["loss_projection", "double_backprop", "jacobian_hutchinson"])
def test_low_precision_flash_attention_rule(dtype, name, kind):
    # |fused - ref32| <= 2 |reference_lowp - ref32| + tiny atol, for the loss and every gradient
    model32, x32 = tiny_model(name, dtype=torch.float32), tiny_input(name, dtype=torch.float32)
    y = _labels(x32)
    ref32 = _run(copy.deepcopy(model32), x32, y, "reference", kind)
    lowp = _run(copy.deepcopy(model32).to(dtype), x32.to(dtype), y, "reference", kind)
    got = _run(copy.deepcopy(model32).to(dtype), x32.to(dtype), y, "fused", kind)
    pairs = [("loss", got[0], lowp[0], ref32[0])] + [
        (f"grad {i}", g, p, r) for i, (g, p, r) in enumerate(zip(got[1], lowp[1], ref32[1])) if r is not None]
    scale = max(r.float().abs().max().item() for _, _, _, r in pairs[1:])
    for what, g, p, r in pairs:
        err = (g.float() - r).abs().max().item()
        base = (p.float() - r).abs().max().item()
        atol = 1e-2 * (scale if what != "loss" else abs(r.item())) + 1e-6
        assert err <= 2 * base + atol, f"{what}: |fused-ref32| {err:.3g} > 2*|lowp-ref32| {2 * base:.3g} + {atol:.3g}"


@pytest.mark.parametrize("kind", ["loss_projection", "input_gradient_penalty", "jacobian_exact", "jacreg_projection",
                                  "interpretation", "double_backprop"])
def test_train_mode_batchnorm_is_routed_to_the_fused_op(kind, monkeypatch):
    calls = []
    # every train-mode route goes through it (ops.batch_norm calls it; the fused mode calls it directly where a
    # conv may recompute the layer's ReLU output, fused.RECOMPUTE_CONV_INPUT)
    real = ops.batch_norm_with_stats
    monkeypatch.setattr(ops, "batch_norm_with_stats",
                        lambda *a, **k: calls.append(k.get("training", a[5] if len(a) > 5 else None)) or real(*a, **k))
    model, x = tiny_model("residual_bn"), tiny_input("residual_bn")
    y = _labels(x)
    gen = torch.Generator().manual_seed(0)
    if kind == "loss_projection":
        out = jsigr_fast.loss(model, x, y, backend="fused", generator=gen)
    elif kind == "input_gradient_penalty":
        out = jsigr_fast.input_gradient_penalty(model, x, y, backend="fused")
    elif kind == "jacobian_exact":
        out = jsigr_fast.jacobian_norm(model, x, backend="fused")
    elif kind == "jacreg_projection":
        out = jsigr_fast.jacobian_regularization(model, x, y, estimator="projection", backend="fused", generator=gen)
    elif kind == "interpretation":
        out = jsigr_fast.interpretation_regularization(model, x, y, torch.sin(3 * x), backend="fused")
    else:
        out = jsigr_fast.double_backprop(model, x, y, backend="fused")
    assert calls and all(calls), "the fused backend never called ops.batch_norm in train mode"
    names = graph_node_names(out)
    assert not any("NativeBatchNorm" in n for n in names), names
    # the fused ops' autograd nodes (ops.BatchNormTrain / ops.BatchNormBackward)
    assert {"BatchNormTrainBackward", "BatchNormBackwardBackward"} & set(names), names


def test_hutchinson_tangent_uses_the_fused_backward(monkeypatch):
    calls = []
    real = fused._BatchNormJVP.jvp
    monkeypatch.setattr(fused._BatchNormJVP, "jvp", staticmethod(lambda *a: calls.append(1) or real(*a)))
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", backend="fused", generator=torch.Generator())
    assert calls


def test_eval_mode_batchnorm_stays_native():
    model, x = tiny_model("conv_bn_eval"), tiny_input("conv_bn_eval")
    out = jsigr_fast.double_backprop(model, x, _labels(x), backend="fused")
    names = graph_node_names(out)
    assert "BatchNormTrainBackward" not in names and any("NativeBatchNorm" in n for n in names), names


def test_running_stats_updated_once_like_a_training_forward():
    # loss(): one ordinary training forward's update (momentum and cumulative), same as the reference
    for momentum in (0.1, None):
        base = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(),
                             nn.Flatten(), nn.Linear(3 * 36, 4)).double().train()
        x = tiny_input("conv_bn_train")
        y = _labels(x)
        states = []
        for backend in ("reference", "fused"):
            m = copy.deepcopy(base)
            jsigr_fast.loss(m, x, y, backend=backend, generator=torch.Generator().manual_seed(0))
            states.append(m.state_dict())
        expect = copy.deepcopy(base)
        expect(x)  # one plain training forward
        for k, v in expect.state_dict().items():
            assert torch.equal(states[0][k], v), k  # the reference: bit-identical
            # the fused backend's channels-last convolutions (fused.CHANNELS_LAST) round differently:
            # equal to rounding (a double or missed update would be off by ~10 %)
            torch.testing.assert_close(states[1][k], v, rtol=1e-12, atol=1e-15, msg=k)


@pytest.mark.parametrize("name", BN_MODELS + ("maxpool_relu",))
@pytest.mark.parametrize("kind", ["loss_projection", "loss_hutchinson", "double_backprop"])
def test_bfloat16_autocast_flash_attention_rule(name, kind):
    # under autocast the conv rule must save and differentiate the tensors autocast casts (the backward
    # usually runs outside the autocast region): fused-under-autocast vs reference-under-autocast vs fp32
    model32, x32 = tiny_model(name, dtype=torch.float32), tiny_input(name, dtype=torch.float32)
    y = _labels(x32)
    n_proj = 3 if kind == "loss_hutchinson" else 2  # 3 probes: fused batches the two outside the training forward
    ref32 = _run(copy.deepcopy(model32), x32, y, "reference", kind, n_proj=n_proj)
    res = {}
    for backend in ("reference", "fused"):
        m = copy.deepcopy(model32)
        gen = torch.Generator().manual_seed(3)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kind.startswith("loss_"):
                out = jsigr_fast.loss(m, x32, y, jacobian=kind[5:], backend=backend, generator=gen, n_proj=n_proj)
            else:
                out = jsigr_fast.double_backprop(m, x32, y, backend=backend)
        res[backend] = (out.detach().float(), torch.autograd.grad(out.float(), list(m.parameters()), allow_unused=True))
    scale = max(r.abs().max().item() for r in ref32[1] if r is not None)
    pairs = [("loss", res["fused"][0], res["reference"][0], ref32[0], abs(ref32[0].item()))] + [
        (f"grad {i}", g, p, r, scale) for i, (g, p, r) in enumerate(zip(res["fused"][1], res["reference"][1], ref32[1]))
        if r is not None]
    for what, g, p, r, s in pairs:
        err = (g.float() - r).abs().max().item()
        base = (p.float() - r).abs().max().item()
        assert err <= 2 * base + 1e-2 * s + 1e-6, f"{what}: |fused-ref32| {err:.3g} > 2*{base:.3g} + atol"


@pytest.mark.parametrize("name", ["conv_tanh", "residual_bn", "maxpool_relu"])
def test_batched_vjp_path_equals_reference(name, monkeypatch):
    # the is_grads_batched variant (off on CPU by measurement, fused.BATCH_VJPS) must stay exact
    monkeypatch.setitem(fused.BATCH_VJPS, "cpu", True)
    _projection_loss_equals_reference(name)


def _projection_loss_equals_reference(name):
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x)
    ref = _run(copy.deepcopy(model), x, y, "reference", "loss_projection")
    got = _run(copy.deepcopy(model), x, y, "fused", "loss_projection")
    _compare(ref, got, rtol=1e-10, atol_scale=1e-12)


@pytest.mark.parametrize("name", ["conv_tanh", "residual_bn", "maxpool_relu"])
def test_fused_loss_head_path_equals_reference(name, monkeypatch):
    # the fused CE + cotangent op (off on CPU by measurement, fused.LOSS_HEAD) must stay exact
    monkeypatch.setitem(fused.LOSS_HEAD, "cpu", True)
    calls = []
    real = ops.cross_entropy_cotangent
    monkeypatch.setattr(ops, "cross_entropy_cotangent", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x)
    ref = _run(copy.deepcopy(model), x, y, "reference", "loss_projection")
    got = _run(copy.deepcopy(model), x, y, "fused", "loss_projection")
    assert calls, "the fused loss head was not used"
    _compare(ref, got, rtol=1e-10, atol_scale=1e-12)


def _loss_with(model, x, y, backend, **kw):
    gen = torch.Generator().manual_seed(3)
    out = jsigr_fast.loss(model, x, y, backend=backend, generator=gen, **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    return out.detach(), torch.autograd.grad(out, params, allow_unused=True), dict(model.state_dict())


@pytest.mark.parametrize("name", ["conv_tanh", "residual_bn"])
@pytest.mark.parametrize("saliency", ["quantile", "map", "callable", "adaptor"])
def test_fused_selective_mask_equals_reference(name, saliency, monkeypatch):
    # the fused backend builds the mask with its one-byte ops (ops.gradient_saliency_mask,
    # threshold_mask, adaptor_saliency_mask): same features, so the same loss and gradients
    model, x = tiny_model(name), tiny_input(name)
    y = _labels(x)
    kw = {"beta": 0.3}
    if saliency == "quantile":
        kw["mask_quantile"] = 0.4
    elif saliency == "map":
        kw["saliency"] = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    elif saliency == "callable":
        kw["saliency"] = lambda g, xx: (g.abs() * xx).to(xx.dtype)
    else:
        from jsigr_fast.saliency import SaliencyAdaptor
        torch.manual_seed(2)
        kw["saliency"] = SaliencyAdaptor(x.shape[1]).to(x.dtype).requires_grad_(False)
    used = []
    for op in ("gradient_saliency_mask", "threshold_mask", "adaptor_saliency_mask"):
        real = getattr(ops, op)
        monkeypatch.setattr(ops, op, lambda *a, _r=real, _op=op, **k: used.append(_op) or _r(*a, **k))
    ref = _loss_with(copy.deepcopy(model), x, y, "reference", **kw)
    got = _loss_with(copy.deepcopy(model), x, y, "fused", **kw)
    assert used, "the fused mask ops were not used"
    _compare(ref, got, rtol=1e-10, atol_scale=1e-12)


class _ViewFlattenNet(nn.Module):
    """A user model that flattens conv features with .view (fails on a channels-last tensor)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 36, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.view(h.size(0), -1))


class _ViewWriteNet(nn.Module):
    """Writes through .view of an activation, then uses the activation: the write must reach it
    (the reshape fallback's copy used to swallow it silently)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x))) * 1.0
        flat = h.view(h.size(0), -1)
        flat[:, :8].mul_(3.0)  # the first rows of channel 0
        flat[:, -4:] = 0.5 * flat[:, -4:]
        return self.fc(self.conv2(h).mean((2, 3)))


@pytest.mark.parametrize("net", [_ViewFlattenNet, _ViewWriteNet])
@pytest.mark.parametrize("kind", ["loss_projection", "double_backprop", "input_gradient_penalty"])
def test_channels_last_activations_are_used_and_view_still_works(kind, net, monkeypatch):
    # fused.CHANNELS_LAST (on for CPU): the first conv's input becomes channels-last, so the later
    # convs see channels-last activations; a model's .view on them falls back to reshape
    monkeypatch.setitem(fused.CHANNELS_LAST, "cpu", True)
    layouts = []
    real = fused._conv_rule
    monkeypatch.setattr(fused, "_conv_rule",
                        lambda x, *a: layouts.append(x.is_contiguous(memory_format=torch.channels_last)) or real(x, *a))
    torch.manual_seed(0)
    model = net().double().train()
    x = tiny_input("conv_bn_train")
    y = _labels(x)
    ref = _run(copy.deepcopy(model), x, y, "reference", kind)
    got = _run(copy.deepcopy(model), x, y, "fused", kind)
    assert layouts and all(layouts), layouts
    (lr, gr, _), (lf, gf, _) = ref, got
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=0)
    for a, b in zip(gr, gf):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["conv_bn_train", "residual_bn", "maxpool_relu", "dropout"])
def test_nchw_activations_path_equals_reference(name, monkeypatch):
    # the layout CHANNELS_LAST turns off (the default on CUDA) must stay exact too
    monkeypatch.setitem(fused.CHANNELS_LAST, "cpu", False)
    _projection_loss_equals_reference(name)


def test_view_that_fails_for_other_reasons_still_raises():
    # the reshape fallback is only for the layout: a wrong view size is still the caller's error
    with fused.fused_layers(), pytest.raises(RuntimeError, match="shape"):
        torch.randn(2, 3).view(7)


# --- models whose forward draws random numbers or updates buffers outside any nn.Dropout module:
# the fused Hutchinson estimator shares the training forward only where that gives the reference's
# values, gradients, buffers and random stream (fused._jsigr_hutchinson_shared)
class _FunctionalDropoutNet(_ViewFlattenNet):  # its layers, another forward
    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        h = F.dropout(h, 0.3, training=self.training)  # no module: invisible to a model.modules() scan
        return self.fc(h.flatten(1))


def _rrelu_net():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.RReLU(), nn.Flatten(), nn.Linear(108, 4))


def _spectral_net():
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Conv2d(2, 3, 3, padding=1)), nn.BatchNorm2d(3),
                         nn.Tanh(), nn.Flatten(), nn.Linear(108, 4))


def _old_spectral_net():
    return nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(2, 3, 3, padding=1)), nn.BatchNorm2d(3),
                         nn.Tanh(), nn.Flatten(), nn.Linear(108, 4))


STATEFUL_NETS = {"functional_dropout": _FunctionalDropoutNet, "rrelu": _rrelu_net, "spectral_norm": _spectral_net,
                 "old_spectral_norm": _old_spectral_net}


def _hutchinson_call(model, x, y, backend, kind, gen):
    torch.manual_seed(5)
    if kind == "loss":
        out = jsigr_fast.loss(model, x, y, jacobian="hutchinson", backend=backend, generator=gen, n_proj=1)
    elif kind == "loss3":
        out = jsigr_fast.loss(model, x, y, jacobian="hutchinson", backend=backend, generator=gen, n_proj=3)
    else:  # the bare estimator: n_proj probes batched into one vmapped pass where BATCH_PROBES says so
        out = jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", backend=backend, generator=gen, n_proj=3)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, params, allow_unused=True)
    stream = torch.rand(4)  # the global random stream after the call
    return out.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}, stream


@pytest.mark.parametrize("net", sorted(STATEFUL_NETS))
@pytest.mark.parametrize("kind", ["loss", "loss3", "jacobian"])
@pytest.mark.parametrize("own_generator", [True, False])
def test_hutchinson_on_random_or_stateful_forward_equals_reference(net, kind, own_generator):
    torch.manual_seed(0)
    model = STATEFUL_NETS[net]().double().train()
    x = tiny_input("conv_bn_train")
    y = _labels(x)
    results = []
    for backend in ("reference", "fused"):
        m = copy.deepcopy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = _hutchinson_call(m, x, y, backend, kind, torch.Generator().manual_seed(3) if own_generator else None)
            n_first = len(caught)
            # a second call: a backend that remembers the model must still agree
            second = _hutchinson_call(m, x, y, backend, kind, torch.Generator().manual_seed(4) if own_generator else None)
        runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        # the one warning allowed: RReLU has no vmap rule, so batched probes run one pass each (said once)
        assert all("cannot share one forward pass" in w for w in runtime), runtime
        assert not [w for w in caught[n_first:] if issubclass(w.category, RuntimeWarning)], "warned again"
        results.append((first, second))
    for r, f in zip(*results):
        _compare(r[:3], f[:3], rtol=1e-10, atol_scale=1e-12)
        assert torch.equal(r[3], f[3]), "the global random stream after the call differs"


# --- the caller's own channels-last input: the fused backend's layout fixes (dropout masks redrawn
# in NCHW order, failing views replaced) are for the activations it made channels-last, not these
@pytest.mark.parametrize("kind", ["loss_projection", "loss_hutchinson", "double_backprop", "input_gradient_penalty"])
def test_callers_channels_last_input_keeps_its_dropout_masks(kind, monkeypatch):
    # a plain forward on a channels-last input has channels-last activations and draws the dropout
    # mask in memory order; the fused backend must draw the same one
    monkeypatch.setitem(fused.CHANNELS_LAST, "cpu", True)
    torch.manual_seed(0)
    model = _FunctionalDropoutNet().double().train()
    x = tiny_input("conv_bn_train").contiguous(memory_format=torch.channels_last)
    y = _labels(x)
    ref = _run(copy.deepcopy(model), x, y, "reference", kind)
    got = _run(copy.deepcopy(model), x, y, "fused", kind)
    _compare(ref, got, rtol=1e-10, atol_scale=1e-12)


def test_callers_channels_last_input_view_fails_as_in_a_plain_forward(monkeypatch):
    # .view(n, -1) on a channels-last activation fails in the caller's own forward; the fused
    # backend replaces such views only for activations it made channels-last itself
    monkeypatch.setitem(fused.CHANNELS_LAST, "cpu", True)
    model = _ViewFlattenNet().double().train()
    x = tiny_input("conv_bn_train").contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        model(x)
    for backend in ("reference", "fused"):
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            jsigr_fast.loss(copy.deepcopy(model), x, _labels(x), backend=backend)
