"""The input contract: no public function writes into the caller's ``x``, whatever the model does to
its input, and the Hutchinson estimator works on any input layout the plain forward accepts.

1. A model whose first op writes into its input in place (``nn.ReLU(inplace=True)`` first) is
   supported everywhere: the library hands the model a private copy of its input. The oracle is plain
   autograd on the same model applied to a copy of its input (``model(t.clone())``), written here from
   the definitions (``torch.autograd.functional.jacobian``, ``torch.autograd.grad``), replaying the
   library's random draws from the same seed, as tests/test_jsigr_loss.py does. Before the fix the
   Hutchinson paths wrote relu(x) into x and every other path raised PyTorch's bare "a leaf Variable
   that requires grad is being used in an in-place operation" (or, for an x that requires grad, wrote
   into x through an alias and rewrote its autograd history).
2. Channels-last and transposed caller inputs under the Hutchinson estimator, on both backends,
   against ``torch.func.jvp`` on a contiguous copy of x with the same probe.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast import attacks
from oracles import fd_penalty

BACKENDS = ["reference"] + (["fused"] if "fused" in jsigr_fast.available_backends() else [])
TOL = dict(rtol=1e-9, atol=1e-12)  # float64; the fused backend's channels-last convs round differently
N, K = 3, 4


def inplace_model(seed: int = 0) -> nn.Module:
    """Sample-independent, deterministic; its first op rewrites its input (the negative entries)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                             nn.Linear(3 * 4 * 4, K)).double()


def on_a_copy(model):
    """The oracle's model: the same module, applied by plain autograd to a copy of its input."""
    return lambda t: model(t.clone())


def make_input(kind: str):
    """``(x, leaf)``: x as the caller passes it, and the tensor whose gradient the caller would read
    (None when x does not require grad)."""
    base = torch.randn(N, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    if kind == "plain":
        return base, None
    if kind == "channels_last":
        return base.contiguous(memory_format=torch.channels_last), None
    if kind == "leaf_requires_grad":
        base.requires_grad_(True)
        return base, base
    if kind == "nonleaf_requires_grad":  # input_leaf aliases such an x (x.view_as(x))
        base.requires_grad_(True)
        return base * 1.0, base
    raise ValueError(kind)


LABELS = torch.tensor([0, 3, 1])


# ----------------------------------------------------------------------------------------------
# the oracles (no jsigr_fast code)
# ----------------------------------------------------------------------------------------------
def _leaf(x):
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _ce(f, x, y):
    return F.cross_entropy(f(x), y)


def _input_gradient(f, x, y, *, create_graph=True):
    xg = _leaf(x)
    per = F.cross_entropy(f(xg), y, reduction="none")
    (g,) = torch.autograd.grad(per.sum(), xg, create_graph=create_graph)
    return g


def _batch_jacobian(f, x):
    """(N, K, N, D), differentiable in the parameters (and in x when it requires grad)."""
    J = torch.autograd.functional.jacobian(f, x, create_graph=True)
    return J.reshape(x.shape[0], J.shape[1], x.shape[0], -1)


def _jac_exact(f, x):
    return _batch_jacobian(f, x).pow(2).sum() / x.shape[0]


def _jac_projection(f, x, v):
    u = torch.einsum("mk,mknd->nd", v, _batch_jacobian(f, x))
    return (v.shape[1] * u.pow(2).sum(1)).mean()


def _jac_hutchinson(f, x, z):
    jz = torch.einsum("mknd,nd->mk", _batch_jacobian(f, x), z.reshape(x.shape[0], -1))
    return jz.pow(2).sum(1).mean()


def _sphere(gen, dtype):
    v = torch.randn((N, K), generator=gen, dtype=dtype)
    return v / v.norm(dim=1, keepdim=True)


def _sig(f, x, y, mask=None):
    g = _input_gradient(f, x, y)
    g = g if mask is None else mask * g
    return g.reshape(x.shape[0], -1).pow(2).sum(1).mean()


def oracle_loss(f, x, y, *, jacobian, seed, lambda_m=0.5, lambda_j=0.5, eps=0.3, beta=0.1):
    """J-SIGR with the default saliency: first the perturbation's z, then the Jacobian's draw."""
    gen = torch.Generator().manual_seed(seed)
    x0 = x.detach()
    x_hat = x0 + eps * x0.std(unbiased=False) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    a = _input_gradient(f, x_hat, y, create_graph=False).abs()
    mask = (a / a.reshape(N, -1).amax(1).view(-1, 1, 1, 1) <= beta).to(x.dtype)
    if jacobian == "projection":
        jac = _jac_projection(f, x, _sphere(gen, x.dtype))
    elif jacobian == "hutchinson":
        jac = _jac_hutchinson(f, x, torch.randn(x.shape, generator=gen, dtype=x.dtype))
    else:
        jac = _jac_exact(f, x)
    return _ce(f, x, y) + lambda_m * _sig(f, x, y, mask) + lambda_j * jac


H = 0.01  # fd_step


# name -> (library call(model, x, y, backend), oracle(f, x, y))
CASES = {
    "loss_projection": (
        lambda m, x, y, be: jsigr_fast.loss(m, x, y, backend=be, generator=torch.Generator().manual_seed(1)),
        lambda f, x, y: oracle_loss(f, x, y, jacobian="projection", seed=1)),
    "loss_hutchinson": (
        lambda m, x, y, be: jsigr_fast.loss(m, x, y, jacobian="hutchinson", backend=be,
                                            generator=torch.Generator().manual_seed(1)),
        lambda f, x, y: oracle_loss(f, x, y, jacobian="hutchinson", seed=1)),
    "loss_exact": (
        lambda m, x, y, be: jsigr_fast.loss(m, x, y, jacobian="exact", backend=be,
                                            generator=torch.Generator().manual_seed(1)),
        lambda f, x, y: oracle_loss(f, x, y, jacobian="exact", seed=1)),
    "double_backprop": (
        lambda m, x, y, be: jsigr_fast.double_backprop(m, x, y, lambda_ig=0.7, backend=be),
        lambda f, x, y: _ce(f, x, y) + 0.7 * _sig(f, x, y)),
    "input_gradient_penalty": (
        lambda m, x, y, be: jsigr_fast.input_gradient_penalty(m, x, y, backend=be),
        lambda f, x, y: _sig(f, x, y)),
    "jacobian_norm_exact": (
        lambda m, x, y, be: jsigr_fast.jacobian_norm(m, x, estimator="exact", backend=be),
        lambda f, x, y: _jac_exact(f, x)),
    "jacobian_norm_projection": (
        lambda m, x, y, be: jsigr_fast.jacobian_norm(m, x, estimator="projection", n_proj=2, backend=be,
                                                     generator=torch.Generator().manual_seed(2)),
        lambda f, x, y: (lambda g: (_jac_projection(f, x, _sphere(g, x.dtype))
                                    + _jac_projection(f, x, _sphere(g, x.dtype))) / 2)(
            torch.Generator().manual_seed(2))),
    "jacobian_norm_hutchinson": (
        lambda m, x, y, be: jsigr_fast.jacobian_norm(m, x, estimator="hutchinson", backend=be,
                                                     generator=torch.Generator().manual_seed(3)),
        lambda f, x, y: _jac_hutchinson(f, x, torch.randn(x.shape, generator=torch.Generator().manual_seed(3),
                                                          dtype=x.dtype))),
    # three probes: the fused backend carries them in one vmapped forward (fused.BATCH_PROBES)
    "jacobian_norm_hutchinson3": (
        lambda m, x, y, be: jsigr_fast.jacobian_norm(m, x, estimator="hutchinson", n_proj=3, backend=be,
                                                     generator=torch.Generator().manual_seed(3)),
        lambda f, x, y: (lambda g: sum(_jac_hutchinson(f, x, torch.randn(x.shape, generator=g, dtype=x.dtype))
                                       for _ in range(3)) / 3)(torch.Generator().manual_seed(3))),
    "jacobian_regularization_hutchinson": (
        lambda m, x, y, be: jsigr_fast.jacobian_regularization(m, x, y, estimator="hutchinson", lambda_j=0.4,
                                                               backend=be, generator=torch.Generator().manual_seed(4)),
        lambda f, x, y: _ce(f, x, y) + 0.4 * _jac_hutchinson(
            f, x, torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype))),
    "jacobian_regularization_exact": (
        lambda m, x, y, be: jsigr_fast.jacobian_regularization(m, x, y, lambda_j=0.4, backend=be),
        lambda f, x, y: _ce(f, x, y) + 0.4 * _jac_exact(f, x)),
    "interpretation_regularization": (
        lambda m, x, y, be: jsigr_fast.interpretation_regularization(m, x, y, torch.sin(3 * x.detach()), backend=be),
        lambda f, x, y: _interpretation_oracle(f, x, y, torch.sin(3 * x.detach()))),
    "loss_fd": (
        lambda m, x, y, be: jsigr_fast.loss(m, x, y, mode="fd", fd_step=H, saliency="none", lambda_m=0.6,
                                            lambda_j=0.4, backend=be, generator=torch.Generator().manual_seed(6)),
        lambda f, x, y: _ce(f, x, y) + 0.6 * fd_penalty(f, x, H, y=y) + 0.4 * fd_penalty(
            f, x, H, v=_sphere(torch.Generator().manual_seed(6), x.dtype))),
    "double_backprop_fd": (
        lambda m, x, y, be: jsigr_fast.double_backprop(m, x, y, mode="fd", fd_step=H, backend=be),
        lambda f, x, y: _ce(f, x, y) + fd_penalty(f, x, H, y=y)),
    "jacobian_norm_hutchinson_fd": (
        lambda m, x, y, be: jsigr_fast.jacobian_norm(m, x, estimator="hutchinson", mode="fd", fd_step=H, backend=be,
                                                     generator=torch.Generator().manual_seed(7)),
        lambda f, x, y: fd_penalty(f, x, H, zeta=torch.randn(x.shape, generator=torch.Generator().manual_seed(7),
                                                             dtype=x.dtype))),
    "jacobian_regularization_fd": (
        lambda m, x, y, be: jsigr_fast.jacobian_regularization(m, x, y, estimator="projection", mode="fd", fd_step=H,
                                                               lambda_j=0.4, backend=be,
                                                               generator=torch.Generator().manual_seed(8)),
        lambda f, x, y: _ce(f, x, y) + 0.4 * fd_penalty(f, x, H, v=_sphere(torch.Generator().manual_seed(8),
                                                                              x.dtype))),
}


def _interpretation_oracle(f, x, y, targets, lambda_d=3.0, lambda_m=0.15):
    xg = _leaf(x)
    z = f(xg)
    (jc,) = torch.autograd.grad(z.gather(1, y[:, None]).sum(), xg, create_graph=True)
    jc = jc.reshape(N, -1)
    cos = F.cosine_similarity(jc, targets.reshape(N, -1), dim=1, eps=1e-12).mean()
    return F.cross_entropy(z, y) - lambda_d * cos + lambda_m * jc.norm(dim=1).mean()


def _grads(value, model, leaf):
    wrt = list(model.parameters()) + ([leaf] if leaf is not None else [])
    return torch.autograd.grad(value, wrt, allow_unused=True)


@pytest.mark.parametrize("kind", ["plain", "channels_last", "nonleaf_requires_grad", "leaf_requires_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_model_writing_into_its_input_leaves_x_alone_and_matches_the_oracle(case, backend, kind):
    call, oracle = CASES[case]
    model = inplace_model()
    x, leaf = make_input(kind)
    before, version, stride, grad_fn = x.detach().clone(), x._version, x.stride(), x.grad_fn
    got = call(model, x, LABELS, backend)
    # x untouched: values, version counter (no in-place write at all), layout, autograd history
    assert torch.equal(x.detach(), before) and x._version == version
    assert x.stride() == stride and x.grad_fn is grad_fn
    assert x.requires_grad is (leaf is not None)
    got_grads = _grads(got, model, leaf)

    xo, leaf_o = make_input(kind)
    expect = oracle(on_a_copy(model), xo, LABELS)
    expect_grads = _grads(expect, model, leaf_o)
    torch.testing.assert_close(got, expect, **TOL)
    for a, b in zip(got_grads, expect_grads):
        # None: a parameter the value does not depend on (the last bias, for a Jacobian norm), or,
        # on the fused backend, one it reaches only through a ReLU's on/off pattern (README, Backends)
        if a is None or b is None:
            assert all(t is None or t.abs().max() == 0 for t in (a, b))
            continue
        torch.testing.assert_close(a, b, **TOL)


# ----------------------------------------------------------------------------------------------
# attacks and the other public passes over such a model
# ----------------------------------------------------------------------------------------------
def _oracle_grad(f, x, y):
    xg = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(f(xg), y, reduction="sum"), xg)
    return g


def _untouched(fn, x):
    before, version = x.clone(), x._version
    out = fn(x)
    assert torch.equal(x, before) and x._version == version
    return out


def test_fgsm_with_a_model_writing_into_its_input():
    model = inplace_model()
    x, _ = make_input("plain")
    got = _untouched(lambda t: attacks.fgsm(model, t, LABELS, 0.1, clamp=None), x)
    expect = x + 0.1 * _oracle_grad(on_a_copy(model), x, LABELS).sign()
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


@pytest.mark.parametrize("restarts", [1, 2])
def test_pgd_with_a_model_writing_into_its_input(restarts):
    # restarts=2 also runs the scoring forward (_loss_and_pred), whose input is the iterate it returns
    model = inplace_model()
    f = on_a_copy(model)
    x, _ = make_input("plain")
    eps, alpha, steps = 0.2, 0.08, 3
    got = _untouched(lambda t: attacks.pgd(model, t, LABELS, eps, alpha=alpha, steps=steps, restarts=restarts,
                                           clamp=None, generator=torch.Generator().manual_seed(9)), x)
    gen = torch.Generator().manual_seed(9)
    best = best_score = best_success = None
    for _ in range(restarts):
        xa = x + (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) * eps
        for _ in range(steps):
            xa = x + (xa + alpha * _oracle_grad(f, xa, LABELS).sign() - x).clamp(-eps, eps)
        with torch.no_grad():
            logits = f(xa)
        score, success = F.cross_entropy(logits, LABELS, reduction="none"), logits.argmax(1) != LABELS
        if best is None:
            best, best_score, best_success = xa, score, success
            continue
        better = (success & ~best_success) | ((success == best_success) & (score > best_score))
        best = torch.where(better.view(-1, 1, 1, 1), xa, best)
        best_score, best_success = torch.where(better, score, best_score), best_success | success
    torch.testing.assert_close(got, best, rtol=0, atol=1e-15)


def test_accuracy_deepfool_jsma_with_a_model_writing_into_its_input():
    model = inplace_model()
    f = on_a_copy(model)
    x, _ = make_input("plain")
    got = _untouched(lambda t: attacks.accuracy(model, t, LABELS, batch_size=2), x)
    with torch.no_grad():
        assert got == (f(x).argmax(1) == LABELS).double().mean().item()
    # DeepFool / JSMA: against the same weights with an out-of-place first ReLU (the same function;
    # these attacks have no closed form here, and that model never needed a copy)
    twin = copy.deepcopy(model)
    twin[0] = nn.ReLU()
    adv, r = _untouched(lambda t: attacks.deepfool(model, t, max_iter=3), x)
    adv_t, r_t = attacks.deepfool(twin, x, max_iter=3)
    torch.testing.assert_close(adv, adv_t, rtol=0, atol=0)
    xs = x.sigmoid()  # JSMA's box [0, 1]
    target = torch.tensor([1, 0, 2])
    got = _untouched(lambda t: attacks.jsma(model, t, target, gamma=0.1, pairwise=False), xs)
    torch.testing.assert_close(got, attacks.jsma(twin, xs, target, gamma=0.1, pairwise=False), rtol=0, atol=0)


def test_layer_jacobian_norms_with_a_model_writing_into_its_input():
    # jsigr_fast.jacobian_layers runs its own forward-mode passes on slices of x; the last layer's
    # exact value is the model's mean ||J_n||_F^2, here against torch.autograd.functional.jacobian
    from jsigr_fast.jacobian_layers import layer_jacobian_norms

    model = inplace_model()
    x, _ = make_input("plain")
    rows = _untouched(lambda t: layer_jacobian_norms(model, t, estimator="exact", layers=["4"], batch_size=2), x)
    assert rows[0].sq_fro == pytest.approx(float(_jac_exact(on_a_copy(model), x).detach()), rel=1e-10)


def test_smoothgrad_with_a_model_writing_into_its_input():
    model = inplace_model()
    x, _ = make_input("plain")
    got = _untouched(lambda t: jsigr_fast.smoothgrad(model, t, LABELS, n_samples=4, chunk=2, sigma=0.1, phi=None,
                                                     generator=torch.Generator().manual_seed(10)), x)
    gen = torch.Generator().manual_seed(10)
    flat = x.reshape(N, -1)
    scale = (0.1 * (flat.amax(1) - flat.amin(1))).view(N, 1, 1, 1)
    acc = torch.zeros_like(x)
    f = on_a_copy(model)
    for _ in range(2):
        noise = torch.randn((2, *x.shape), generator=gen, dtype=x.dtype) * scale
        for i in range(2):
            xg = (x + noise[i]).requires_grad_(True)
            (g,) = torch.autograd.grad(f(xg).gather(1, LABELS[:, None]).sum(), xg)
            acc += g
    torch.testing.assert_close(got, acc / 4, **TOL)


# ----------------------------------------------------------------------------------------------
# Hutchinson on channels-last and transposed inputs
# ----------------------------------------------------------------------------------------------
class TransposeView(nn.Module):
    """Its plain forward works on a transposed x (made contiguous by the transpose), not on an NCHW one."""

    def forward(self, x):
        x = x.transpose(2, 3)
        return x.view(x.shape[0], -1)


def layout_model(name: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        if name == "groupnorm":
            return nn.Sequential(nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(3 * 36, K)).double()
        if name == "conv_groupnorm":
            return nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.GELU(), nn.Flatten(),
                                 nn.Linear(4 * 36, K)).double()
        return nn.Sequential(TransposeView(), nn.Linear(3 * 36, K)).double()


def layout_input(layout: str) -> torch.Tensor:
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.transpose(2, 3).contiguous().transpose(2, 3)


def _hutchinson_oracle(model, x, zs):
    """mean_n ||J z||^2 averaged over the probes, J z by torch.func.jvp on a contiguous copy of x (or,
    for a model whose plain forward takes only x's own layout, on x with z laid out as x)."""
    params = {k: v for k, v in model.named_parameters()}
    xc = x.detach().contiguous() if not isinstance(model[0], TransposeView) else x.detach()
    total = 0
    for z in zs:
        t = torch.empty_like(xc).copy_(z)
        _, jz = torch.func.jvp(lambda u: torch.func.functional_call(model, params, (u,)), (xc,), (t,))
        total = total + jz.pow(2).sum(1).mean()
    return total / len(zs)


@pytest.mark.parametrize("n_proj", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,layout", [("groupnorm", "channels_last"), ("conv_groupnorm", "channels_last"),
                                         ("groupnorm", "transposed"), ("transpose_view", "transposed")])
def test_hutchinson_on_any_input_layout_the_plain_forward_takes(name, layout, backend, n_proj):
    # reference: ATen's forward-mode group-norm rule failed on a channels-last x ("view size is not
    # compatible"); fused, three probes: a transposed x was made channels-last for the batched pass,
    # where the model's view failed and the probes fell back to one pass each, with a warning
    model, x = layout_model(name), layout_input(layout)
    model(x)  # the plain forward takes this input
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", n_proj=n_proj, backend=backend,
                                       generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    zs = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(n_proj)]
    expect = _hutchinson_oracle(model, x, zs)
    torch.testing.assert_close(got, expect, **TOL)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(got, params, allow_unused=True),
                    torch.autograd.grad(expect, params, allow_unused=True)):
        if a is None or b is None:  # the last bias: the Jacobian does not depend on it
            assert all(t is None or t.abs().max() == 0 for t in (a, b))
            continue
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hutchinson_loss_on_a_channels_last_input_with_group_norm(backend):
    # the training forward carries the probe on the fused backend; the reference runs its own
    model, x = layout_model("conv_groupnorm"), layout_input("channels_last")
    y = torch.tensor([1, 2])
    got = jsigr_fast.loss(model, x, y, jacobian="hutchinson", saliency="none", lambda_m=0.0, lambda_j=0.5,
                          backend=backend, generator=torch.Generator().manual_seed(3))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    expect = F.cross_entropy(model(x.contiguous()), y) + 0.5 * _hutchinson_oracle(model, x, [z])
    torch.testing.assert_close(got, expect, **TOL)
