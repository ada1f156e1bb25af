"""Layers PyTorch cannot differentiate twice (jsigr_fast.higher_order): softmax-family / GLU tangents,
hardsigmoid, scaled_dot_product_attention and cdist double backward, nn.MultiheadAttention under
forward mode.

Oracles: the composites against PyTorch's native ops (values and first derivatives, which PyTorch
gets right); the regularizers' parameter gradients (a second or third derivative) against central
finite differences of their values, which need only first derivatives. Before this module every
regularizer on the hardsigmoid / SDPA / cdist models, and the Hutchinson estimator on every softmax
model, raised inside PyTorch's backward.
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast import higher_order as ho
from jsigr_fast.higher_order import safe_ops
from oracles import directional_fd, graph_node_names, random_direction

BACKENDS = ["reference"] + (["fused"] if "fused" in jsigr_fast.available_backends() else [])


# ----------------------------------------------------------------------------------------------
# the composites against the native ops
# ----------------------------------------------------------------------------------------------
def _x(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_(True)


def _same_value_and_grad(native, composite, inputs, *, rtol=1e-12, atol=1e-12):
    a, b = native(*inputs), composite(*inputs)
    torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(7), dtype=a.dtype)
    ga = torch.autograd.grad((a * w).sum(), inputs)
    gb = torch.autograd.grad((b * w).sum(), inputs)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_family_composites_match_native(dim):
    x = _x(3, 4, 5)
    with torch.no_grad():
        x[0, 1, 2] = float("-inf")  # a -inf entry (a masked score)
    xs = x.detach().clone().requires_grad_(True)
    _same_value_and_grad(lambda t: F.softmax(t, dim), lambda t: ho.softmax(t, dim), (xs,))
    y = _x(3, 4, 5, seed=1)  # softmin / log-softmax / logsumexp of a -inf entry are NaN / -inf: finite inputs
    _same_value_and_grad(lambda t: F.softmin(t, dim), lambda t: ho.softmax(-t, dim), (y,))
    _same_value_and_grad(lambda t: F.log_softmax(t, dim), lambda t: ho.log_softmax(t, dim), (y,))
    _same_value_and_grad(lambda t: torch.logsumexp(t, dim), lambda t: ho.logsumexp(t, dim), (y,))
    _same_value_and_grad(lambda t: torch.logsumexp(t, (0, 2), keepdim=True),
                         lambda t: ho.logsumexp(t, (0, 2), keepdim=True), (y,))


def test_softmax_composite_dtype_argument_and_low_precision():
    x = _x(4, 6, dtype=torch.float32)
    torch.testing.assert_close(ho.softmax(x, 1, torch.float64), F.softmax(x, 1, dtype=torch.float64))
    xb = x.detach().bfloat16()
    # accumulated in float32 like ATen's kernel: the same bf16 result
    torch.testing.assert_close(ho.softmax(xb, 1), F.softmax(xb, 1), rtol=0, atol=0)
    torch.testing.assert_close(ho.log_softmax(xb, 1), F.log_softmax(xb, 1), rtol=1.6e-2, atol=1e-2)


def test_glu_and_hardsigmoid_composites_match_native():
    _same_value_and_grad(lambda t: F.glu(t, 1), lambda t: ho.glu(t, 1), (_x(3, 8, 2),))
    # values around and beyond the kinks at -3 and 3
    x = (torch.linspace(-5, 5, 41, dtype=torch.float64) + 0.013).requires_grad_(True)
    # ATen's hardsigmoid backward multiplies by a float32 1/6 even in float64 (3e-8 relative off);
    # the composite's 1/6 is exact
    _same_value_and_grad(F.hardsigmoid, ho.hardsigmoid, (x,), rtol=1e-7)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_cdist_composite_matches_native(p):
    a, b = _x(2, 5, 3, seed=0), _x(2, 4, 3, seed=1)
    with torch.no_grad():
        b[0, 1] = a[0, 2]  # a zero distance: gradient 0 in both
    _same_value_and_grad(lambda u, v: torch.cdist(u, v, p=p), lambda u, v: ho.cdist(u, v, p=p), (a, b))


def test_hardsigmoid_composite_inplace_writes_through():
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    expect = F.hardsigmoid(x.clone())
    out = ho.hardsigmoid(x, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expect)


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_mask", "causal", "scale_gqa", "masked_row"])
def test_sdpa_composite_matches_native(case):
    q, k, v = _x(2, 4, 5, 3, seed=0), _x(2, 4, 6, 3, seed=1), _x(2, 4, 6, 3, seed=2)
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, 0] = True
    kw = {}
    if case == "bool_mask":
        kw = {"attn_mask": mask}
    elif case == "float_mask":
        kw = {"attn_mask": torch.randn(5, 6, dtype=torch.float64)}
    elif case == "causal":
        k, v = _x(2, 4, 5, 3, seed=1), _x(2, 4, 5, 3, seed=2)
        kw = {"is_causal": True}
    elif case == "scale_gqa":
        k, v = _x(2, 2, 6, 3, seed=1), _x(2, 2, 6, 3, seed=2)
        kw = {"scale": 0.37, "enable_gqa": True}
    elif case == "masked_row":  # a query that sees no key: 0, and no NaN in any gradient
        mask[2] = False
        kw = {"attn_mask": mask}
    _same_value_and_grad(lambda *t: F.scaled_dot_product_attention(*t, **kw),
                         lambda *t: ho.scaled_dot_product_attention(*t, **kw), (q, k, v))


def test_sdpa_composite_rejects_mask_with_causal_like_native():
    q = _x(1, 1, 3, 2)
    with pytest.raises(RuntimeError, match="attn_mask and is_causal"):
        ho.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True)


# ----------------------------------------------------------------------------------------------
# routing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [lambda t: F.softmax(t, -1), lambda t: t.softmax(-1), lambda t: torch.softmax(t, -1),
                                  lambda t: F.log_softmax(t, 1), lambda t: t.log_softmax(1), lambda t: F.softmin(t, 1),
                                  lambda t: torch.logsumexp(t, 1), lambda t: t.logsumexp(1), lambda t: F.glu(t, 1)])
def test_forward_ad_mode_reroutes_every_spelling(call):
    x = _x(3, 4)
    with safe_ops(forward_ad=True):
        out = call(x)
    names = graph_node_names(out)
    assert not any("Softmax" in n or "LogSumExp" in n or "Glu" in n for n in names), names
    with safe_ops():  # reverse-over-reverse: softmax's double backward is native and right
        assert any("Softmax" in n for n in graph_node_names(F.softmax(x, -1)))


def test_reverse_mode_reroutes_hardsigmoid_sdpa_and_cdist():
    x = _x(2, 1, 3, 4)
    with safe_ops():
        assert "HardsigmoidBackward0" not in graph_node_names(F.hardsigmoid(x))
        assert "CdistBackward0" not in graph_node_names(torch.cdist(x[0], x[1]))
        names = graph_node_names(F.scaled_dot_product_attention(x, x, x))
    assert not any("Flash" in n or "ScaledDotProduct" in n for n in names), names


def test_safe_ops_pushes_no_second_mode_inside_the_fused_rules():
    from torch.overrides import _get_current_function_mode_stack

    pytest.importorskip("jsigr_fast.fused")
    from jsigr_fast import fused

    with fused.fused_layers():
        depth = len(_get_current_function_mode_stack())
        with safe_ops():
            assert len(_get_current_function_mode_stack()) == depth
        with safe_ops(forward_ad=True):  # the reverse-mode rules do not cover forward mode
            assert len(_get_current_function_mode_stack()) == depth + 1


# ----------------------------------------------------------------------------------------------
# the regularizers on models with these layers, against finite differences
# ----------------------------------------------------------------------------------------------
class _AttentionNet(nn.Module):
    """conv (+ train-mode BN) -> tokens -> one of the layers above -> linear head."""

    def __init__(self, kind: str, bn: bool):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        if kind == "mha":
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        if kind == "mha_functional":  # its weights only, no nn.MultiheadAttention module
            m = nn.MultiheadAttention(8, 2)
            self.in_proj, self.out_proj = nn.Linear(8, 24), m.out_proj
        if kind == "sdpa":
            self.qkv = nn.Linear(8, 24)
        if kind == "cdist":  # a nearest-prototype head: logits = -distance to 4 learned prototypes
            self.prototypes = nn.Parameter(torch.randn(4, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.bn(self.conv(x)).flatten(2).transpose(1, 2)  # (N, L, 8)
        if self.kind == "mha":
            t = self.mha(t, t, t)[0]
        elif self.kind == "mha_functional":  # not through nn.MultiheadAttention: found only in the forward
            u = t.transpose(0, 1)
            u = F.multi_head_attention_forward(u, u, u, 8, 2, self.in_proj.weight, self.in_proj.bias, None, None,
                                               False, 0.0, self.out_proj.weight, self.out_proj.bias,
                                               training=self.training)[0]
            t = u.transpose(0, 1)
        elif self.kind == "sdpa":
            q, k, v = self.qkv(t).view(t.shape[0], -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
            t = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(t.shape)
        elif self.kind == "softmax":
            t = t * t.softmax(-1) + torch.logsumexp(t, 1, keepdim=True)
        elif self.kind == "glu":
            t = F.glu(torch.cat([t, 0.5 * t], -1))
        elif self.kind == "hardsigmoid":  # a squeeze-excitation gate (MobileNetV3)
            t = t * F.hardsigmoid(3 * t.mean(1, keepdim=True))
        if self.kind == "cdist":
            return -torch.cdist(t.mean(1), self.prototypes)
        out = self.head(t.mean(1))
        return F.log_softmax(out, 1) if self.kind == "softmax" else out  # a log-softmax head too


KINDS = ["mha", "sdpa", "softmax", "glu", "hardsigmoid", "cdist"]


def _model(kind, bn):
    torch.manual_seed(0)
    return _AttentionNet(kind, bn).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1])


def _value(model, x, y, backend, what):
    gen = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the MHA fallback's notice
        if what == "hutchinson":
            return jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", n_proj=2, backend=backend, generator=gen)
        if what == "projection":
            return jsigr_fast.jacobian_norm(model, x, estimator="projection", n_proj=2, backend=backend, generator=gen)
        return jsigr_fast.input_gradient_penalty(model, x, y, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["hutchinson", "projection", "penalty"])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_regularizer_gradient_matches_finite_differences(kind, bn, what, backend):
    model = _model(kind, bn)
    x, y = _data()
    params = list(model.parameters())
    grads = torch.autograd.grad(_value(model, x, y, backend, what), params, allow_unused=True)
    direction = random_direction(params, seed=4)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction) if g is not None)
    fd = directional_fd(lambda: _value(model, x, y, backend, what), params, direction, h=1e-5)
    assert analytic.item() == pytest.approx(fd, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multihead_attention_hutchinson_falls_back_and_says_so(backend):
    model = _model("mha", False)
    x, _ = _data()
    with pytest.warns(RuntimeWarning, match="double-VJP"):
        jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", backend=backend)


@pytest.mark.skipif("fused" not in BACKENDS, reason="fused backend unavailable")
@pytest.mark.parametrize("kind", KINDS + ["mha_functional"])
@pytest.mark.parametrize("jacobian", ["hutchinson", "projection"])
@pytest.mark.parametrize("own_generator", [True, False])
def test_jsigr_loss_fused_equals_reference(kind, jacobian, own_generator):
    x, y = _data()
    out = {}
    for backend in ("reference", "fused"):
        model = _model(kind, True)
        gen = torch.Generator().manual_seed(5) if own_generator else None
        torch.manual_seed(6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = jsigr_fast.loss(model, x, y, jacobian=jacobian, n_proj=2, backend=backend, generator=gen)
        stream = torch.rand(3)  # with generator=None the probes come from the global stream
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        out[backend] = (loss.detach(), grads, [str(w.message) for w in caught], stream)
    (lr, gr, _, sr), (lf, gf, notes, sf) = out["reference"], out["fused"]
    assert torch.equal(sf, sr), "the global random stream after the call differs"
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=1e-12)
    for a, b in zip(gr, gf):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    if kind == "mha_functional" and jacobian == "hutchinson":
        # the fused step meant to carry the tangent on its training forward and met the layer there
        assert any("running statistics twice" in n for n in notes), notes



@pytest.mark.parametrize("kind", ["sdpa", "mha"])
def test_per_layer_jacobian_norms_run_on_attention_models(kind):
    # SDPA has no native forward-mode rule: layer_jacobian_norms (forward mode, no_grad) raised on it.
    # Oracle: the head's exact per-layer norm (D forward-mode passes) is the model's exact ||J||_F^2
    # from K reverse-mode VJPs.
    from jsigr_fast.jacobian_layers import layer_jacobian_norms

    model = _model(kind, False)
    x, _ = _data()
    rows = layer_jacobian_norms(model, x, estimator="exact", layers=["head"])
    expect = jsigr_fast.jacobian_norm(model, x, estimator="exact", backend="reference")
    assert rows[0].sq_fro == pytest.approx(expect.item(), rel=1e-10)
