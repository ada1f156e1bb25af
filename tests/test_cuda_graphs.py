"""Graphed training steps (jsigr_fast.cuda_graphs) and what makes a loss capturable.

On the CPU: every loss reads nothing back to the host while a capture is simulated
(``simulated_capture``: the library's capture path taken, a host read raises capture's error), the
checks it skips then are the ones a GraphedStep runs before each replay, and the GraphedStep's plumbing
(warm-up undone, static inputs, replays, its errors) runs with ``simulate=True``
(``SimulatedGraph``: each replay re-runs the step under the simulation). The real capture is the
``-m gpu`` tests at the bottom (bench/gpu_session.sh `graphs`).
"""
import copy
import functools

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import jsigr_fast
from jsigr_fast import _checks
from jsigr_fast.cuda_graphs import GraphedStep, SimulatedGraph, simulated_capture
from jsigr_fast.testing import tiny_input, tiny_model


class _CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def _losses():
    """(name, loss_fn) for every functional loss; the backends where each has a fused path."""
    out = []
    for backend in ("reference", "fused"):
        for jac in ("projection", "hutchinson", "exact"):
            out.append((f"jsigr-{jac}-{backend}", functools.partial(jsigr_fast.loss, jacobian=jac, backend=backend)))
        out.append((f"jsigr-fd-{backend}", functools.partial(jsigr_fast.loss, mode="fd", backend=backend)))
        out.append((f"jsigr-quantile-{backend}",
                    functools.partial(jsigr_fast.loss, mask_quantile=0.5, backend=backend)))
        out.append((f"jsigr-saliency-map-{backend}", lambda m, x, y, b=backend: jsigr_fast.loss(
            m, x, y, saliency=x.flip(-1), backend=b)))
        out.append((f"double_backprop-{backend}", functools.partial(jsigr_fast.double_backprop, backend=backend)))
        out.append((f"jacobian_reg-{backend}",
                    functools.partial(jsigr_fast.jacobian_regularization, backend=backend)))
        out.append((f"jacobian_reg-projection-{backend}", functools.partial(
            jsigr_fast.jacobian_regularization, estimator="projection", backend=backend)))
        out.append((f"input_gradient_penalty-{backend}",
                    functools.partial(jsigr_fast.input_gradient_penalty, backend=backend)))
        out.append((f"ir-{backend}", lambda m, x, y, b=backend: jsigr_fast.interpretation_regularization(
            m, x, y, x.flip(-1), backend=b)))
    for attack in ("fgsm", "pgd"):  # adversarial training's step: CE at the attack's output
        out.append((f"{attack}-at", lambda m, x, y, a=attack: torch.nn.functional.cross_entropy(
            m(getattr(jsigr_fast.attacks, a)(m, x, y, 0.03)), y)))
    return out


LOSSES = _losses()
# these wind the random state back (fd's perturbed forwards replay the forward's draws; the fused Hutchinson
# estimator shares the training forward), which a capture cannot: refused with a message saying what to use
REFUSED = {"jsigr-fd-reference", "jsigr-fd-fused", "jsigr-hutchinson-fused"}


def _xy(name, n, seed=1):
    """A float64 batch for the tiny model ``name`` and labels in its 4 classes."""
    return tiny_input(name, n, seed=seed), torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))


def _step(model, loss_fn, x, y):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, x, y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("model_name", ["residual_bn_relu", "conv_tanh"])
@pytest.mark.parametrize("name,loss_fn", LOSSES, ids=[n for n, _ in LOSSES])
def test_no_host_reads_while_capturing(model_name, name, loss_fn):
    """Under a simulated capture a whole step (loss, backward) reads nothing back to the host (a read
    raises); the loss and gradients are those of the uncaptured call (only checks are skipped)."""
    x, y = _xy(model_name, 3)
    model = tiny_model(model_name)
    torch.manual_seed(0)
    want_loss, want_grads = _step(model, loss_fn, x, y)

    torch.manual_seed(0)
    if name in REFUSED:
        with simulated_capture(), pytest.raises(RuntimeError, match="winds the random-number state back.*"
                                                                    "mode='autograd' and jacobian='projection'"):
            _step(model, loss_fn, x, y.clone())
        return
    with simulated_capture():
        got_loss, got_grads = _step(model, loss_fn, x, y.clone())  # fresh labels: no cached range check
    # to rounding, not bitwise: a batch norm keeps grad_y under capture where the CPU's policy rebuilds it
    # from grad_x after a host-side range check (ops.BN_REBUILD_GRAD_Y)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


def test_own_generator_is_refused_under_capture():
    # a capture draws from the default CUDA generator only: a loss (or attack) given its own is refused,
    # naming the fix, rather than failing inside PyTorch or copying CPU draws to the device
    model = tiny_model("conv_tanh")
    x, y = _xy("conv_tanh", 3)
    g = torch.Generator().manual_seed(0)
    for call in (lambda: jsigr_fast.loss(model, x, y, generator=g),
                 lambda: jsigr_fast.attacks.pgd(model, x, y, 0.03, generator=g)):
        with simulated_capture(), pytest.raises(RuntimeError, match="own generator .*pass generator=None"):
            call()
    jsigr_fast.loss(model, x, y, generator=g)  # outside a capture: fine


def test_eager_loss_reads_back_twice():
    """Outside a capture the fused J-SIGR step checks x (one read) and the labels once, not per forward (a
    model without batch norms: on the CPU those add a read for the grad_y rebuild's range check)."""
    model = tiny_model("conv_tanh")
    x, y = _xy("conv_tanh", 3)
    with _CountSyncs() as c:
        jsigr_fast.loss(model, x, y.clone(), backend="fused").backward()
    assert c.syncs == 2


def test_label_check_sees_in_place_writes():
    """Labels found in range are not read again, unless written to (in place) since, or another tensor."""
    model = tiny_model("conv_tanh")
    x, y = _xy("conv_tanh", 3)
    jsigr_fast.loss(model, x, y)
    y[0] = 99
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*99"):
        jsigr_fast.loss(model, x, y)
    y2 = y.clone()
    y2[0] = -1
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*-1"):
        jsigr_fast.loss(model, x, y2)


# ---- GraphedStep's plumbing, on the CPU: simulate=True ----
def test_simulated_capture_refuses_host_reads():
    x = torch.randn(4, 3)
    for read in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x.nonzero(), lambda: x[x > 0],
                 lambda: torch.unique(x), lambda: torch.equal(x, x)):
        with simulated_capture(), pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
            read()
    with simulated_capture():
        assert _checks.capturing(x)
        torch.where(x > 0, x, 0).sum()  # device-side selections are fine
    assert not _checks.capturing(x)


def _graphed(model, opt, loss_fn, x, y, **kw):
    return jsigr_fast.graphed_step(model, opt, loss_fn, x, y, simulate=True, **kw)


def _batches(n, name="residual_bn_relu"):
    return [_xy(name, 4, seed=100 + i) for i in range(n)]


def _twins(device="cpu"):
    """A tiny batch-norm model to graph and a copy to train eagerly, each with SGD and momentum."""
    model = tiny_model("residual_bn_relu").to(device)
    eager = copy.deepcopy(model)
    return (model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            eager, torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9))


def test_graphed_steps_train_as_eager_steps():
    """The warm-up is undone (parameters, BN statistics, momentum): replays from the example batch on give
    the eager steps' parameters and losses (a deterministic loss, float64)."""
    loss_fn = functools.partial(jsigr_fast.double_backprop, backend="fused")
    model, opt, eager, eager_opt = _twins()
    batches = _batches(4)
    step = _graphed(model, opt, loss_fn, *batches[0], warmup=2)
    for x, y in batches:
        got = step(x, y)
        eager_opt.zero_grad(set_to_none=True)
        want = loss_fn(eager, x, y)
        want.backward()
        eager_opt.step()
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=0)
    for (n, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=n)


def test_graphed_gradients_for_an_eager_optimizer_step():
    """Without an optimizer the graph is the loss and its backward: each call leaves that batch's gradients
    in .grad (fresh, not accumulated; also after zero_grad(set_to_none=True)), the caller steps eagerly."""
    loss_fn = functools.partial(jsigr_fast.double_backprop, backend="fused")
    model, opt, eager, eager_opt = _twins()
    batches = _batches(3)
    step = _graphed(model, None, loss_fn, *batches[0])
    assert all(p.grad is None for p in model.parameters())  # the warm-up's gradients are not left behind
    for x, y in batches:
        got = step(x, y)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        eager_opt.zero_grad(set_to_none=True)
        want = loss_fn(eager, x, y)
        want.backward()
        torch.nn.utils.clip_grad_norm_(eager.parameters(), 1.0)
        eager_opt.step()
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=0)
    for (n, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=n)


def test_returned_loss_is_not_overwritten():
    model = tiny_model("conv_tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x1, y1), (x2, y2) = _batches(2, "conv_tanh")
    step = _graphed(model, opt, jsigr_fast.double_backprop, x1, y1)
    first = step(x1, y1)
    kept = first.item()
    second = step(x2, y2)
    assert first.item() == kept and second.item() != kept


def test_graphed_step_errors():
    model = tiny_model("conv_tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(1, "conv_tanh")[0]
    with pytest.raises(ValueError, match="CUDA graphs need the model and the batch on a CUDA device"):
        GraphedStep(model, opt, jsigr_fast.double_backprop, x, y)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or None"):
        _graphed(model, "sgd", jsigr_fast.double_backprop, x, y)
    with pytest.raises(ValueError, match="loss_fn must return a scalar loss tensor"):
        _graphed(model, opt, lambda m, a, b: m(a), x, y)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        _graphed(model, opt, jsigr_fast.double_backprop, x, y, warmup=0)

    step = _graphed(model, opt, jsigr_fast.double_backprop, x, y)
    with pytest.raises(ValueError, match=r"x must match the captured batch: shape \(4, 2, 6, 6\)"):
        step(x[:3], y[:3])
    with pytest.raises(ValueError, match="y must match the captured batch"):
        step(x, y.int())
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        step(bad, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) for the captured model; got values \[7\]"):
        step(x, torch.tensor([0, 7, 1, 2]))
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = 0.01
    with pytest.raises(RuntimeError, match="optimizer's lr changed since the capture"):
        step(x, y)
    opt.param_groups[0]["lr"] = 0.1
    model.eval()
    with pytest.raises(RuntimeError, match="train/eval modes changed"):
        step(x, y)
    model.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # refused steps trained nothing
    step(x, y)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_stateful_gan_losses_are_refused():
    """JSIGR's adaptor and discriminator steps read the host (their gradients' finiteness): not capturable,
    refused with the capture's error rather than replayed with a frozen step schedule."""
    model = tiny_model("conv_tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(1, "conv_tanh")[0]
    reg = jsigr_fast.JSIGR((2, 6, 6), discriminator=(4, 8), backend="fused").double()
    with pytest.raises(RuntimeError, match="capturing the training step as a CUDA graph failed.*not permitted"):
        _graphed(model, opt, lambda m, a, b: reg(m, a, b), x, y, warmup=1)


def test_capture_failure_names_the_cause():
    class Reads(nn.Module):  # a step that reads a value on the host inside the "capture"
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

    class FailingGraph(SimulatedGraph):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    model = Reads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    x, y = torch.rand(2, 3), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match=r"capturing the training step as a CUDA graph failed \(RuntimeError: "
                                           r"operation not permitted.*no \.item\(\)"):
        GraphedStep(model, opt, jsigr_fast.double_backprop, x, y, _graph_factory=FailingGraph)
    # the warm-up steps are undone: parameters, and no momentum buffers left behind
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(opt.state) == 0 and all(p.grad is None for p in model.parameters())


# ---- the real capture (a GPU session runs these) ----
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("captured_optimizer", [True, False])
def test_cuda_graph_steps_match_eager(backend, captured_optimizer):
    """float64 on the GPU: graphed double-backprop steps give the eager steps' losses and parameters (the
    optimizer step inside the graph, or run eagerly on the graph's gradients)."""
    loss_fn = functools.partial(jsigr_fast.double_backprop, backend=backend)
    model, opt, eager, eager_opt = _twins("cuda")
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(3)]
    step = jsigr_fast.graphed_step(model, opt if captured_optimizer else None, loss_fn, *batches[0])
    for x, y in batches:
        got = step(x, y)
        if not captured_optimizer:
            opt.step()
        eager_opt.zero_grad(set_to_none=True)
        want = loss_fn(eager, x, y)
        want.backward()
        eager_opt.step()
        torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-12)
    for (n, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend,jacobian", [("fused", "projection"), ("reference", "projection"),
                                              ("reference", "hutchinson")])
def test_cuda_graph_jsigr_draws_fresh_noise(backend, jacobian):
    """J-SIGR's random draws are fresh at each replay: the same batch gives different losses, all finite."""
    model = tiny_model("residual_bn_relu", dtype=torch.float32).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays; only the draws change
    x, y = (t.cuda() for t in _batches(1)[0])
    loss_fn = functools.partial(jsigr_fast.loss, backend=backend, jacobian=jacobian)
    step = jsigr_fast.graphed_step(model, opt, loss_fn, x.float(), y)
    losses = torch.stack([step(x.float(), y) for _ in range(4)])
    assert torch.isfinite(losses).all()
    assert len(set(losses.tolist())) > 1
