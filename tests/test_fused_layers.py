"""The conv2d / ReLU rules of the fused backend (jsigr_fast.fused): exact at every derivative order the
library uses, under is_grads_batched and forward mode, and without the work ATen's rules waste. Each test of
the rules runs both implementations (fused.CPP_RULES): the C++ autograd Functions (csrc/layer_rules.cpp) and
the Python ones, against ATen's conv / ReLU and gradcheck's finite differences."""
import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from jsigr_fast import fused
from jsigr_fast._settings import device_setting
from oracles import graph_node_names, graph_nodes

IMPLS = ["cpp", "python"]


@pytest.fixture(params=IMPLS)
def impl(request):
    """Runs the test with the rules' C++ Functions or their Python ones (the C++ ones need the extension)."""
    if request.param == "cpp" and not fused._CPP_RULES_BUILT:
        pytest.skip("the extension's conv2d_rule / relu_rule ops are not built")
    with device_setting(fused.CPP_RULES, "cpu", request.param == "cpp"):
        yield request.param


def _node_names(t) -> list[str]:
    return [node.name() for node in graph_nodes(t)]


def _rule_nodes(t, impl) -> list[str]:
    """The graph's nodes of the rules of ``impl`` (C++: CppNode<...Conv2dRule> etc.; Python: _Conv2dBackward)."""
    marks = ("Conv2dRule", "ConvInputGrad", "ConvWeightGrad", "ReluRule") if impl == "cpp" else (
        "_Conv2dBackward", "_ConvInputGradBackward", "_ConvWeightGradBackward", "_ReLUBackward")
    return [n for n in _node_names(t) if any(n.endswith(m) or n.endswith(m + ">") for m in marks)]

CONV_CASES = [  # (in, out, kernel, stride, padding, dilation, groups, bias)
    (2, 3, 3, 1, 1, 1, 1, True),
    (2, 3, 3, 2, 1, 1, 1, False),
    (4, 2, 1, 2, 0, 1, 2, True),
    (3, 3, 3, 1, 2, 2, 3, True),
    (2, 4, (3, 1), (2, 1), (1, 0), 1, 1, False),
]


def _conv_inputs(case, seed=0):
    cin, cout, k, s, p, d, g, bias = case
    gen = torch.Generator().manual_seed(seed)
    k2 = k if isinstance(k, tuple) else (k, k)
    x = torch.randn(2, cin, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, cin // g, *k2, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    return x, w, b, dict(stride=s, padding=p, dilation=d, groups=g)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_native_and_gradgradcheck(case, impl):
    x, w, b, kw = _conv_inputs(case)
    y = fused.conv2d(x, w, b, **kw)
    torch.testing.assert_close(y, F.conv2d(x, w, b, **kw), rtol=0, atol=0)
    assert _rule_nodes(y, impl), _node_names(y)
    args = (x, w) if b is None else (x, w, b)

    def f(*a):
        return fused.conv2d(*a, **kw) if b is not None else fused.conv2d(a[0], a[1], None, **kw)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_conv2d_input_gradient_penalty_matches_native(case, impl):
    # d/d(w, x) ||grad_x <y, c>||^2: the double-backprop quantity, fused rules vs ATen's
    x, w, b, kw = _conv_inputs(case, seed=1)
    c = torch.randn_like(F.conv2d(x, w, b, **kw))
    out = []
    for conv in (fused.conv2d, F.conv2d):
        y = torch.tanh(conv(x, w, b, **kw))
        (gx,) = torch.autograd.grad(y, x, c, create_graph=True)
        if conv is fused.conv2d:
            assert _rule_nodes(gx, impl), _node_names(gx)  # the input gradient's own graph: the rule's pieces
        out.append(torch.autograd.grad(gx.pow(2).sum(), [t for t in (x, w, b) if t is not None]))
    for a, e in zip(*out):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_conv2d_batched_vjp_with_graph_matches_loop(impl):
    # is_grads_batched vmaps the backward: the rule then records ATen's differentiable op (see _batched)
    x, w, b, kw = _conv_inputs(CONV_CASES[0], seed=2)
    y = torch.tanh(fused.conv2d(x, w, b, **kw))
    assert _rule_nodes(y, impl)
    cot = torch.randn(3, *y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gb = torch.autograd.grad(y, x, cot, create_graph=True, is_grads_batched=True)[0]
    gl = torch.stack([torch.autograd.grad(y, x, c, create_graph=True)[0] for c in cot])
    torch.testing.assert_close(gb, gl, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(gb.pow(2).sum(), (w, b), retain_graph=True)
    gc = torch.autograd.grad(gl.pow(2).sum(), (w, b))
    for a, e in zip(ga, gc):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)


def test_conv2d_and_relu_forward_mode_match_native(impl):
    # forward mode always takes the Python Functions (C++ ones have no jvp): with CPP_RULES on as well
    x, w, b, kw = _conv_inputs(CONV_CASES[1], seed=4)
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    res = []
    for conv, act in ((fused.conv2d, fused.relu), (F.conv2d, F.relu)):
        with fwAD.dual_level():
            y = act(conv(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw), None, **kw))
            res.append(fwAD.unpack_dual(y).tangent)
            if conv is fused.conv2d:
                assert _rule_nodes(y, "python") and not _rule_nodes(y, "cpp")
    torch.testing.assert_close(res[0], res[1], rtol=1e-12, atol=1e-12)


class _ConvBackwardMasks(TorchDispatchMode):
    """The output masks (grad_input, grad_weight, grad_bias) of every aten.convolution_backward dispatched."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(tuple(args[-1]))
        return func(*args, **(kwargs or {}))


def test_input_gradient_does_not_compute_the_weight_gradient(impl):
    x, w, b, kw = _conv_inputs(CONV_CASES[0])
    y = fused.conv2d(x, w, b, **kw)
    with _ConvBackwardMasks() as rec:
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    assert rec.masks and not any(m[1] for m in rec.masks), f"grad(..., x) computed a weight gradient: {rec.masks}"
    with _ConvBackwardMasks() as rec:
        torch.autograd.grad(y.pow(2).sum(), w, create_graph=True)
    assert any(m[1] for m in rec.masks) and not any(m[0] for m in rec.masks), rec.masks
    with _ConvBackwardMasks() as rec:  # and the double backward of the input gradient: weight terms only
        torch.autograd.grad(gx.pow(2).sum(), w)
    assert rec.masks and not any(m[0] for m in rec.masks), rec.masks


def test_relu_rule_gradgradcheck_and_no_zero_branch(impl):
    x = (torch.rand(3, 4, dtype=torch.float64) + 0.1) * torch.tensor([1.0, -1.0]).repeat(2)
    x.requires_grad_(True)
    assert _rule_nodes(fused.relu(x), impl)
    assert torch.autograd.gradcheck(fused.relu, (x,))
    assert torch.autograd.gradgradcheck(fused.relu, (x,))
    # ATen's backward depends on x (through a branch whose derivative is zeros_like); ours does not
    (g_native,) = torch.autograd.grad(F.relu(x).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(fused.relu(x).sum(), x, create_graph=True)
    assert g_native.requires_grad and not g.requires_grad
    torch.testing.assert_close(g, g_native, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# first-order blocks (the saliency pass, mode="fd"): ATen's conv / ReLU, the layout still switched
# ----------------------------------------------------------------------------------------------
def _conv_relu_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                               torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 5 * 6, 4)).double()


def _spy_rules(monkeypatch):
    """Counts of the rules' applications (either implementation), by name."""
    calls = {"conv": 0, "relu": 0}
    for key, name in (("conv", "_conv_rule"), ("relu", "_relu_rule")):
        orig = getattr(fused, name)

        def apply(*a, _orig=orig, _key=key):
            calls[_key] += 1
            return _orig(*a)

        monkeypatch.setattr(fused, name, apply)
    return calls


def test_first_order_block_keeps_aten_conv_and_relu_with_the_layout(monkeypatch):
    # Inside fused_layers(first_order=True) no conv / ReLU rule runs (each would be a Python
    # autograd node buying nothing without a double backward), the first conv still makes the
    # activations channels-last where CHANNELS_LAST says so, and the graph is ATen's own.
    calls = _spy_rules(monkeypatch)
    net = _conv_relu_net()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    seen = []
    net[3].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with fused.fused_layers(first_order=True):
        out = net(x)
    assert calls == {"conv": 0, "relu": 0}
    assert seen[0].is_contiguous(memory_format=torch.channels_last) == fused.CHANNELS_LAST["cpu"]
    names = graph_node_names(out)
    assert "ConvolutionBackward0" in names and "ReluBackward0" in names, names
    # the default block: both rules, so the spy can see them (the conv after relu(batch_norm) and that ReLU take
    # the recompute's Functions where RECOMPUTE_CONV_INPUT is on: off here)
    with device_setting(fused.RECOMPUTE_CONV_INPUT, "cpu", False), fused.fused_layers():
        net(x)
    assert calls["conv"] == 2 and calls["relu"] == 2
    # differentiated twice anyway, a first-order block's graph is still exact (ATen's double backward)
    xg = x.clone().requires_grad_(True)
    with fused.fused_layers(first_order=True):
        (g,) = torch.autograd.grad(net(xg).logsumexp(1).sum(), xg, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), net[0].weight)
    (g_nat,) = torch.autograd.grad(net(xg).logsumexp(1).sum(), xg, create_graph=True)
    (gg_nat,) = torch.autograd.grad(g_nat.square().sum(), net[0].weight)
    torch.testing.assert_close(gg, gg_nat, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif("fused" not in __import__("jsigr_fast").available_backends(), reason="fused backend unavailable")
def test_saliency_pass_and_fd_run_no_conv_or_relu_rule(monkeypatch):
    # The perturbed-input saliency pass (no graph kept) and mode="fd" (first-order only) run
    # first-order blocks; the exact loss's own double-backprop pass still uses the rules.
    import jsigr_fast

    calls = _spy_rules(monkeypatch)
    net, x, y = _conv_relu_net(), torch.randn(3, 2, 5, 6, dtype=torch.float64), torch.tensor([0, 1, 3])
    gen = torch.Generator().manual_seed(0)
    jsigr_fast.loss(net, x, y, lambda_j=0.0, mode="fd", backend="fused", generator=gen)
    jsigr_fast.loss(net, x, y, lambda_m=0.0, mode="fd", backend="fused", generator=gen)
    assert calls == {"conv": 0, "relu": 0}
    jsigr_fast.loss(net, x, y, lambda_j=0.0, backend="fused", generator=gen)
    exact = dict(calls)
    assert exact["conv"] > 0 and exact["relu"] > 0  # the double-backprop pass
    calls.update(conv=0, relu=0)
    jsigr_fast.loss(net, x, y, lambda_j=0.0, saliency="none", backend="fused", generator=gen)
    assert calls == exact  # the saliency pass added none of them


@pytest.mark.skipif(not fused._CPP_RULES_BUILT, reason="the extension's conv2d_rule / relu_rule ops are not built")
@pytest.mark.parametrize("bias", [True, False])
def test_cpp_rule_ops_pass_opcheck_and_name_bad_input(bias):
    x, w, b, _ = _conv_inputs(CONV_CASES[1 if not bias else 0])
    conv = torch.ops.jsigr_fast.conv2d_rule.default
    torch.library.opcheck(conv, (x, w, b, [2, 1], [1, 0], [1, 1], 1))
    torch.library.opcheck(torch.ops.jsigr_fast.relu_rule.default, (x,))
    with pytest.raises(RuntimeError, match="conv2d_rule: x and weight must be 4-D, got 3-D and 4-D"):
        conv(x[0], w, b, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="stride, padding and dilation must have 2 elements each"):
        conv(x, w, b, [1], [1, 1], [1, 1], 1)


# ----------------------------------------------------------------------------------------------
# a conv after relu(batch_norm(h)) recomputes its input instead of keeping it (fused.RECOMPUTE_CONV_INPUT)
# ----------------------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    """conv -> batch norm -> ReLU -> conv -> batch norm (+ input) -> ReLU -> conv, with a max-pool reading the
    first ReLU's output too when ``pooled`` (a consumer that keeps it), and the convs' bias / the norms' affine
    parameters optional: the residual block's pattern the recompute is for."""

    def __init__(self, affine=True, bias=False, pooled=False):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.b1 = torch.nn.BatchNorm2d(4, affine=affine)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.b2 = torch.nn.BatchNorm2d(4, affine=affine)
        self.c3 = torch.nn.Conv2d(4, 2, 3, stride=2, padding=1, bias=True)
        self.pooled = pooled
        self.relu_outputs = []
        if affine:
            with torch.no_grad():  # weights of both signs and away from 1 (and a zero one): masks of every kind
                self.b1.weight.copy_(torch.tensor([1.5, -0.7, 0.0, 2.0]))
                self.b1.bias.copy_(torch.tensor([0.2, -0.1, 0.3, -0.5]))
        self.double()

    def forward(self, x):
        h = self.c1(x)
        a = F.relu(self.b1(h))
        self.relu_outputs.append(a)
        out = F.relu(self.b2(self.c2(a)) + h)
        self.relu_outputs.append(out)
        y = self.c3(out)
        if self.pooled:
            y = y + F.max_pool2d(a, 3, stride=2, padding=1)[:, :2]
        return y.flatten(1)


def _run_block(net, x, recompute):
    """The block's forward and the input gradient of its output's squared norm (with its graph) inside a fused
    layer block with the setting as given; returns (gradient, weak references to the ReLU outputs' storages)."""
    net.relu_outputs.clear()
    with device_setting(fused.RECOMPUTE_CONV_INPUT, "cpu", recompute), fused.fused_layers():
        out = net(x)
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    refs = [StorageWeakRef(t.untyped_storage()) for t in net.relu_outputs]
    net.relu_outputs.clear()
    return g, refs


@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_frees_the_relu_output_only_a_conv_reads(recompute):
    # With the setting on, nothing keeps the first ReLU's output (read by a conv only) once the forward and the
    # create-graph VJP are done: the ReLU keeps a bool mask, the conv a recipe. The block's last ReLU output
    # (after a residual add, not a batch norm alone) stays kept, and with the setting off both do: the oracle
    # that a kept output is visible here at all. The graph itself (g) is alive throughout.
    net = _Block()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    g, (a, block_out) = _run_block(net, x, recompute)
    assert g.requires_grad
    assert a.expired() is recompute
    assert not block_out.expired()
    # a consumer that keeps it (a max-pool) keeps it alive whatever the conv does
    g, (a, _) = _run_block(_Block(pooled=True), x, recompute)
    assert not a.expired()


@pytest.mark.parametrize("affine,bias,pooled", [(True, False, False), (False, True, False), (True, True, True)])
def test_recompute_matches_aten_at_every_order(affine, bias, pooled):
    # float64, against ATen's own autograd on the same module (no rules, nothing recomputed): the input-gradient
    # penalty's parameter gradients (the conv's VJP takes its input's shape from h, the ReLU's gradient passes
    # through its mask), a penalty on a parameter gradient (the weight gradient's recomputed input
    # differentiated: through the batch statistics and the affine parameters), and the first-order gradients.
    x = torch.randn(3, 3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for rules in (True, False):
        net = _Block(affine, bias, pooled)
        params = list(net.parameters())
        xg = x.clone().requires_grad_(True)
        with device_setting(fused.RECOMPUTE_CONV_INPUT, "cpu", True), (
                fused.fused_layers() if rules else contextlib.nullcontext()):
            out = net(xg)
            (gx,) = torch.autograd.grad(out.logsumexp(1).sum(), xg, create_graph=True)
            (gw,) = torch.autograd.grad(out.logsumexp(1).sum(), net.c2.weight, create_graph=True)
        first = torch.autograd.grad(out.logsumexp(1).sum(), params, retain_graph=True)
        second = torch.autograd.grad(gx.square().sum() + gw.square().sum(), params)
        results.append((gx, gw, first, second))
    for got, want in zip(results[0], results[1]):
        for a, e in zip(*(([t] if isinstance(t, torch.Tensor) else t) for t in (got, want))):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_relu_output_written_in_place_before_the_conv_reads_it_is_refused():
    # what ATen says when a ReLU's saved output is modified in place: the ReLU keeps its output until the conv
    # asks for the mask, so a write in between is the same error, not a silently wrong mask
    class Writes(_Block):
        def forward(self, x):
            a = F.relu(self.b1(self.c1(x)))
            a.mul_(2)
            return self.c2(a).flatten(1)

    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    with device_setting(fused.RECOMPUTE_CONV_INPUT, "cpu", True), fused.fused_layers():
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            Writes()(x)
