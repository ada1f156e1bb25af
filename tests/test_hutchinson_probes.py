"""Several Hutchinson probes in one forward pass (jsigr_fast.fused._hutchinson_batched, switched by
fused.BATCH_PROBES): each probe's ``J z`` against the explicit batch Jacobian (tests/oracles.py), the
parameter gradients against central finite differences, the public API against the reference
backend with the same draws, and the fallbacks (dropout, layers that cannot run under vmap)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import jsigr_fast
from jsigr_fast import fused
from jsigr_fast.testing import DETERMINISTIC_MODELS, TINY_MODELS, tiny_input, tiny_model
from oracles import batch_jacobian, directional_fd, random_direction

pytestmark = pytest.mark.skipif("fused" not in jsigr_fast.available_backends(),
                                reason=f"fused backend unavailable: {jsigr_fast.extension_error()}")


def _pooled_bn():
    """conv -> BN -> ReLU -> global average pool -> linear: the pool has its own rule under vmap."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).double()


MODELS = DETERMINISTIC_MODELS + ("pooled_bn",)


def _model(name):
    if name == "pooled_bn":
        return _pooled_bn(), tiny_input("conv_bn_train")
    return tiny_model(name), tiny_input(name)


def _probes(x, k, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(k)]


@pytest.fixture(params=[True, False], ids=["channels_last", "nchw"])
def layout(request, monkeypatch):
    monkeypatch.setitem(fused.CHANNELS_LAST, "cpu", request.param)
    return request.param


@pytest.mark.parametrize("name", MODELS)
def test_each_probe_matches_explicit_jacobian(name, layout):
    model, x = _model(name)
    zs = _probes(x, 3)
    J = batch_jacobian(model, x)  # (N, K, N, D): train-mode BN couples the samples
    n = x.shape[0]
    expect = sum(torch.einsum("nkmd,md->nk", J, z.reshape(n, -1)).pow(2).sum(dim=1) for z in zs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback, no per-probe loop inside vmap
        warnings.simplefilter("error", UserWarning)
        got = fused._hutchinson_batched(model, x, zs)
    assert got is not None
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12 * float(expect.abs().max()))


@pytest.mark.parametrize("name", ["conv_bn_train", "residual_bn", "maxpool_relu", "pooled_bn", "groupnorm_gelu"])
def test_parameter_gradients_match_finite_differences(name, layout):
    model, x = _model(name)
    zs = _probes(x, 3)
    params = [p for p in model.parameters() if p.requires_grad]

    def value():
        return fused._hutchinson_batched(model, x, zs).sum()

    grads = torch.autograd.grad(value(), params, allow_unused=True, materialize_grads=True)
    d = random_direction(params, seed=4)
    analytic = sum(float((g * v).sum()) for g, v in zip(grads, d))
    numeric = directional_fd(value, params, d)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def _counting(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def _grads(out, model):
    return torch.autograd.grad(out, list(model.parameters()), allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("api", ["jacobian_norm", "loss"])
def test_api_equals_reference_with_batched_probes(name, api):
    model, x = tiny_model(name), tiny_input(name)
    y = torch.arange(x.shape[0]) % 4
    k = 4

    def run(backend):
        m = copy.deepcopy(model)
        calls = _counting(m)
        gen = torch.Generator().manual_seed(11)
        torch.manual_seed(5)  # dropout masks
        if api == "loss":
            out = jsigr_fast.loss(m, x, y, jacobian="hutchinson", n_proj=k, backend=backend, generator=gen)
        else:
            out = jsigr_fast.jacobian_norm(m, x, estimator="hutchinson", n_proj=k, backend=backend, generator=gen)
        return out.detach(), _grads(out, m), len(calls), m.state_dict()

    lr, gr, cr, sr = run("reference")
    lf, gf, cf, sf = run("fused")
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=0)
    scale = max(g.abs().max().item() for g in gr)
    for a, b in zip(gr, gf):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12 * scale)
    for key in sr:
        torch.testing.assert_close(sf[key], sr[key], rtol=1e-10, atol=0)
    # the reference runs one forward per probe; fused, one for all of them (jacobian_norm) or, in the
    # loss, the first probe rides on the training forward and one pass carries the other k - 1.
    # Dropout: one pass per probe, each with its own masks as in the reference.
    if name == "dropout":
        assert cf == cr
    else:
        assert cr - cf == k - 1


def test_switch_off_runs_one_pass_per_probe(monkeypatch):
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    monkeypatch.setitem(fused.BATCH_PROBES, "cpu", None)
    calls = _counting(model)
    jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", n_proj=3, backend="fused")
    assert len(calls) == 3
    monkeypatch.setitem(fused.BATCH_PROBES, "cpu", 4)  # fewer probes than the threshold: not batched
    calls.clear()
    jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", n_proj=3, backend="fused")
    assert len(calls) == 3
    monkeypatch.setitem(fused.BATCH_PROBES, "cpu", 3)
    calls.clear()
    jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", n_proj=3, backend="fused")
    assert len(calls) == 1


class _OldStyleTanh(torch.autograd.Function):
    """A user's Function in the pre-2.0 style (forward takes ctx): forward AD works, torch.func does not."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


class _WithOldStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny_model("conv_bn_train")

    def forward(self, x):
        return _OldStyleTanh.apply(self.body(x))


def test_layer_without_vmap_support_falls_back_with_a_warning():
    model, x = _WithOldStyle(), tiny_input("conv_bn_train")
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    ref = jsigr_fast.jacobian_norm(copy.deepcopy(model), x, estimator="hutchinson", n_proj=3, backend="reference",
                                   generator=gen())
    calls = _counting(model)
    with pytest.warns(RuntimeWarning, match="cannot share one forward pass"):
        got = jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", n_proj=3, backend="fused", generator=gen())
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    assert len(calls) == 1 + 3  # the failed batched attempt, then one pass per probe


@pytest.mark.parametrize("name", ["conv_bn_train", "residual_bn", "maxpool_relu"])
def test_float32_batched_equals_reference(name):
    model, x = tiny_model(name, dtype=torch.float32), tiny_input(name, dtype=torch.float32)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    m_ref, m_f = copy.deepcopy(model), copy.deepcopy(model)
    ref = jsigr_fast.jacobian_norm(m_ref, x, estimator="hutchinson", n_proj=3, backend="reference", generator=gen())
    got = jsigr_fast.jacobian_norm(m_f, x, estimator="hutchinson", n_proj=3, backend="fused", generator=gen())
    torch.testing.assert_close(got, ref)
    for a, b in zip(_grads(ref, m_ref), _grads(got, m_f)):
        torch.testing.assert_close(b, a, rtol=1.3e-6, atol=1e-5 * max(1.0, a.abs().max().item()))
