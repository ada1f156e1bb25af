"""Tests for jsigr_fast.attacks.

Exactness is checked against closed forms on affine models (float64), or against an independent
numpy re-implementation of the published update rules where no closed form exists; never against
the module's own output. Everything is tiny so the file runs in seconds on 2 CPU cores.
"""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jsigr_fast.attacks import (
    ATTACKS, RhoAdv, abi_fgm, accuracy, deepfool, fgsm, jsma, mi_fgsm, ni_fgsm, pgd, rho_adv,
    transfer_accuracy,
)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: with 2 intra-op threads on a 2-core (often shared) machine every op
    # pays thread hand-off costs, ~50x slower. Restored afterwards for the other test files.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# models and data
# ----------------------------------------------------------------------------------------------
SHAPE = (1, 4, 4)  # images of D = 16 features
D = 16


def linear_model(k: int, seed: int, *, d: int = D, scale: float = 1.0) -> nn.Module:
    """f(x) = W flatten(x) + b in float64, eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # leave the global RNG alone (this runs at import too)
        lin = nn.Linear(d, k).double()
    with torch.no_grad():
        lin.weight.copy_(scale * torch.randn(k, d, generator=g, dtype=torch.float64))
        lin.bias.copy_(0.1 * torch.randn(k, generator=g, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), lin).eval()


def wb(model: nn.Module):
    lin = model[1]
    return lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()


def interior_batch(n: int, seed: int, k: int, lo=0.3, hi=0.7):
    """x uniform in [lo, hi]^D (away from the [0, 1] box), labels in [0, k)."""
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(n, *SHAPE, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def np_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_ce_grad(W, b, x, y):
    """Per-sample grad_x CE(Wx + b, y) = W^T (p - e_y): the closed form for an affine model."""
    p = np_softmax(x @ W.T + b)
    p[np.arange(len(y)), y] -= 1.0
    return p @ W


def conv_bn_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.Dropout(0.0),
        )


@pytest.fixture(scope="module")
def trained_mlp():
    """A small tanh MLP trained on 3 Gaussian blobs in [0, 1]^20 (float32): clean accuracy ~1."""
    g = torch.Generator().manual_seed(0)
    centers = 0.3 + 0.4 * torch.rand(3, 20, generator=g)
    y = torch.arange(300) % 3
    x = (centers[y] + 0.08 * torch.randn(300, 20, generator=g)).clamp(0, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))
    params = list(model.parameters())
    for _ in range(200):  # plain full-batch gradient descent (building torch.optim.Adam costs 2.5 s)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g_ in zip(params, grads):
                p.sub_(1.0 * g_)
    model.eval()
    xt, yt = x[:120].clone(), y[:120].clone()
    assert accuracy(model, xt, yt) >= 0.95
    return model, xt, yt


# ----------------------------------------------------------------------------------------------
# FGSM / PGD / momentum attacks: closed forms on affine models
# ----------------------------------------------------------------------------------------------
def binary_corner(model, x, y, eps, targeted=False):
    """The linf-optimal perturbation of CE for a 2-class affine model: eps * sign(w_other - w_true).
    (CE is increasing in the margin (w_other - w_true) . delta, maximised over the cube at a corner.)
    Targeted: y is the target, CE toward it decreases along eps * sign(w_target - w_other)."""
    W, _ = wb(model)
    yy = y.numpy()
    diff = W[1 - yy] - W[yy]  # (N, D)
    if targeted:
        diff = -diff
    return x.numpy() + eps * np.sign(diff).reshape(x.shape)


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_binary_linear_closed_form(targeted):
    model = linear_model(2, seed=1)
    x, y = interior_batch(32, seed=2, k=2)
    out = fgsm(model, x, y, 0.1, targeted=targeted)
    np.testing.assert_array_equal(out.numpy(), binary_corner(model, x, y, 0.1, targeted))


def test_fgsm_multiclass_matches_numpy_gradient_sign():
    model = linear_model(5, seed=3)
    x, y = interior_batch(16, seed=4, k=5)
    W, b = wb(model)
    G = np_ce_grad(W, b, x.numpy().reshape(16, D), y.numpy())
    expected = x.numpy() + 0.05 * np.sign(G).reshape(x.shape)
    np.testing.assert_allclose(fgsm(model, x, y, 0.05).numpy(), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_linf_reaches_the_optimal_corner(random_start):
    model = linear_model(2, seed=1)
    x, y = interior_batch(32, seed=2, k=2)
    gen = torch.Generator().manual_seed(7)
    # default alpha = 2.5 eps / steps: the walk is long enough to reach the corner from anywhere.
    out = pgd(model, x, y, 0.1, steps=10, random_start=random_start, generator=gen)
    np.testing.assert_allclose(out.numpy(), binary_corner(model, x, y, 0.1), rtol=0, atol=1e-12)


def test_pgd_l2_converges_to_normalised_weight_difference():
    model = linear_model(2, seed=1)
    x, y = interior_batch(32, seed=2, k=2)
    W, _ = wb(model)
    yy = y.numpy()
    diff = W[1 - yy] - W[yy]
    eps = 0.25  # eps * |u_i| <= 0.25 < 0.3: the box [0, 1] never binds for x in [0.3, 0.7]
    expected = x.numpy() + (eps * diff / np.linalg.norm(diff, axis=1, keepdims=True)).reshape(x.shape)
    # One short step from zero: exactly alpha * u (the step is the normalised gradient).
    out = pgd(model, x, y, eps, norm="l2", steps=1, alpha=0.1 * eps, random_start=False)
    np.testing.assert_allclose(out.numpy(), x.numpy() + 0.1 * (expected - x.numpy()), rtol=0, atol=1e-12)
    # From zero: straight along u, stopped by the projection exactly at eps * u.
    out = pgd(model, x, y, eps, norm="l2", steps=10, random_start=False)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    # From a random point in the ball: each projection halves (or better) the component orthogonal
    # to u when alpha = eps, so 60 steps leave it below 1e-12.
    gen = torch.Generator().manual_seed(3)
    out = pgd(model, x, y, eps, norm="l2", steps=60, alpha=eps, random_start=True, generator=gen)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-9)


class InputSpy(nn.Module):
    """Wraps a model and records the range of every input it is evaluated on."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.lo, self.hi = math.inf, -math.inf

    def forward(self, x):
        self.lo = min(self.lo, float(x.detach().min()))
        self.hi = max(self.hi, float(x.detach().max()))
        return self.inner(x)


@pytest.mark.parametrize("name", ["fgsm", "pgd_linf", "pgd_l2_restarts", "mi_fgsm", "abi_fgm", "jsma_pair",
                                  "deepfool"])
def test_model_is_only_evaluated_inside_the_box(name):
    # NI-FGSM is exempt: its Nesterov look-ahead is deliberately not clamped (as in the paper).
    spy = InputSpy(conv_bn_model().eval())
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(6, 1, 6, 6, generator=g) > 0.5).float()  # every feature on the box boundary
    y = torch.randint(0, 5, (6,), generator=g)
    _run_case(name, spy, x, y, (y + 1) % 5)
    assert spy.lo >= 0.0 and spy.hi <= 1.0


def test_pgd_random_start_distribution():
    # alpha = 0: PGD returns its (clamped) random start, which we can then test statistically.
    model = linear_model(2, seed=1)
    n, eps = 4000, 0.2
    x = torch.full((n, *SHAPE), 0.5, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    d = pgd(model, x, y, eps, alpha=0.0, steps=1, generator=gen).flatten(1) - 0.5
    # linf: each coordinate uniform on [-eps, eps] (mean 0, variance eps^2 / 3)
    assert float(d.abs().max()) <= eps + 1e-12
    assert abs(float(d.mean())) < 0.01 * eps
    assert float(d.var()) == pytest.approx(eps ** 2 / 3, rel=0.02)
    # l2: uniform in the ball, so (r / eps)^D is uniform on [0, 1] and the direction is isotropic
    d = pgd(model, x, y, eps, norm="l2", alpha=0.0, steps=1, generator=gen).flatten(1) - 0.5
    r = d.norm(dim=1)
    assert float(r.max()) <= eps * (1 + 1e-12)
    u = (r / eps) ** D
    assert float(u.mean()) == pytest.approx(0.5, abs=0.02)
    assert float((u < 0.25).double().mean()) == pytest.approx(0.25, abs=0.025)
    assert float((d / r[:, None]).mean(0).abs().max()) < 0.05
    # starts are clamped into the box: at x = 0 every start lies in [0, eps]
    z = pgd(model, torch.zeros(50, *SHAPE, dtype=torch.float64), y[:50], eps, alpha=0.0, steps=1, generator=gen)
    assert float(z.min()) == 0.0 and 0.0 < float(z.max()) <= eps


@pytest.mark.parametrize("attack", [mi_fgsm, ni_fgsm, abi_fgm])
def test_momentum_attacks_reach_the_binary_corner(attack):
    # For a 2-class affine model every gradient points along w_other - w_true, so the momentum,
    # look-ahead and AdaBelief moments all have its sign: eps / steps per step reaches the corner.
    # (ABI-FGM's L1-normalised gradient is then constant, so m_hat / sqrt(s_hat) is constant over
    # features up to its delta = 1e-14, and the L2-normalised step of alpha sqrt(D) is the sign step
    # of alpha to ~1e-8 relative.)
    model = linear_model(2, seed=1)
    x, y = interior_batch(32, seed=2, k=2)
    out = attack(model, x, y, 0.1, steps=10)
    atol = 1e-7 if attack is abi_fgm else 1e-12
    np.testing.assert_allclose(out.numpy(), binary_corner(model, x, y, 0.1), rtol=0, atol=atol)


def np_momentum_attack(kind, W, b, x, y, eps, steps, decay=1.0, beta1=0.9, beta2=0.999):
    """Independent numpy transcription of MI-FGSM (Dong et al. Alg. 1), NI-FGSM (Lin et al. Alg. 1),
    with the mean-|g| normalisation of the authors' code, and ABI-FGM as the authors' CI-AB-FGM.py
    runs it (L1-normalised gradient, AdaBelief moments, an L2-normalised step of alpha*sqrt(D),
    delta = 1e-14; no random crop)."""
    alpha = eps / steps
    xa = x.copy()
    g_acc = np.zeros_like(x)
    m = np.zeros_like(x)
    s = np.zeros_like(x)
    for t in range(1, steps + 1):
        if kind == "ni":
            grad = np_ce_grad(W, b, xa + alpha * decay * g_acc, y)
        else:
            grad = np_ce_grad(W, b, xa, y)
        if kind == "abi":
            delta = 1e-14
            grad = grad / np.abs(grad).sum(axis=1, keepdims=True)
            m = beta1 * m + (1 - beta1) * grad
            s = beta2 * s + (1 - beta2) * np.square(grad - m)
            ratio = (m / (1 - beta1 ** t)) / (np.sqrt((s + delta) / (1 - beta2 ** t)) + delta)
            direction = ratio / np.sqrt(np.square(ratio).sum(axis=1, keepdims=True)) * np.sqrt(x.shape[1])
        else:
            g_acc = decay * g_acc + grad / np.abs(grad).mean(axis=1, keepdims=True)
            direction = np.sign(g_acc)
        xa = np.clip(x + np.clip(xa + alpha * direction - x, -eps, eps), 0.0, 1.0)
    return xa


@pytest.mark.parametrize("kind,attack", [("mi", mi_fgsm), ("ni", ni_fgsm), ("abi", abi_fgm)])
def test_momentum_attacks_match_numpy_transcription(kind, attack):
    model = linear_model(4, seed=5, scale=3.0)
    x, y = interior_batch(16, seed=6, k=4, lo=0.02, hi=0.98)  # the box binds for some features
    W, b = wb(model)
    kw = dict(decay=0.8) if kind != "abi" else dict(beta1=0.8, beta2=0.99)
    expected = np_momentum_attack(kind, W, b, x.numpy().reshape(16, D), y.numpy(), 0.2, 8, **kw)
    out = attack(model, x, y, 0.2, steps=8, **kw)
    np.testing.assert_allclose(out.numpy().reshape(16, D), expected, rtol=0, atol=1e-12)


def test_targeted_fgsm_and_pgd_raise_the_target_margin():
    model = linear_model(5, seed=8)
    x, y = interior_batch(24, seed=9, k=5)
    with torch.no_grad():
        z0 = model(x)
    target = (z0.argmax(1) + 1 + torch.arange(24) % 4) % 5  # never the clean prediction

    def margin(z):
        zt = z.gather(1, target[:, None]).squeeze(1)
        return zt - z.scatter(1, target[:, None], -math.inf).amax(1)

    gen = torch.Generator().manual_seed(0)
    for x_adv in (fgsm(model, x, target, 0.02, targeted=True),
                  pgd(model, x, target, 0.05, steps=20, targeted=True, generator=gen)):
        with torch.no_grad():
            assert bool((margin(model(x_adv)) > margin(z0)).all())
    # and PGD with a large budget actually reaches the target
    x_adv = pgd(model, x, target, 0.3, steps=40, targeted=True, generator=gen)
    with torch.no_grad():
        assert bool((model(x_adv).argmax(1) == target).all())


# ----------------------------------------------------------------------------------------------
# PGD: strength and restarts (nonlinear model)
# ----------------------------------------------------------------------------------------------
def test_pgd_more_steps_is_not_weaker(trained_mlp):
    model, x, y = trained_mlp
    results = {}
    for steps in (5, 40):
        gen = torch.Generator().manual_seed(123)  # same random start for both
        x_adv = pgd(model, x, y, 0.08, steps=steps, generator=gen)
        with torch.no_grad():
            results[steps] = (F.cross_entropy(model(x_adv), y).item(), accuracy(model, x_adv, y))
    clean_loss = F.cross_entropy(model(x), y).item()
    assert results[5][0] > clean_loss
    assert results[40][0] >= results[5][0]
    assert results[40][1] <= results[5][1]
    assert results[40][1] < accuracy(model, x, y)


def test_pgd_restarts_keep_per_sample_best(trained_mlp):
    model, x, y = trained_mlp
    eps, R = 0.06, 3
    gen = torch.Generator().manual_seed(5)
    # a short walk (4 steps of eps / 8), so the restarts end at different points
    combined = pgd(model, x, y, eps, steps=4, alpha=eps / 8, restarts=R, generator=gen)
    # Oracle: the same R runs done one by one from one generator, then the selection rule
    # "misclassified first, then highest CE" applied by hand.
    gen = torch.Generator().manual_seed(5)
    runs = [pgd(model, x, y, eps, steps=4, alpha=eps / 8, generator=gen) for _ in range(R)]
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(model(r), y, reduction="none") for r in runs])
        wrong = torch.stack([model(r).argmax(1) != y for r in runs])
    n_checked = 0
    for i in range(x.shape[0]):
        key = [(bool(wrong[r, i]), float(losses[r, i])) for r in range(R)]
        best = max(range(R), key=lambda r: key[r])
        if sum(k == key[best] for k in key) == 1:  # unique best
            assert torch.equal(combined[i], runs[best][i]), i
            n_checked += 1
    assert n_checked >= x.shape[0] // 2
    # the selection really differs from the first run somewhere (else the test checks nothing)
    assert not torch.equal(combined, runs[0])


# ----------------------------------------------------------------------------------------------
# DeepFool and rho_adv: closed forms for affine classifiers
# ----------------------------------------------------------------------------------------------
def test_deepfool_affine_binary_is_exact_in_one_step():
    model = linear_model(2, seed=11)
    x, _ = interior_batch(20, seed=12, k=2)
    W, b = wb(model)
    w, c = W[1] - W[0], b[1] - b[0]
    X = x.numpy().reshape(20, D)
    f = X @ w + c
    # minimal l2 perturbation onto {f = 0}: -f / ||w||^2 * w, times 1 + overshoot
    r_expected = -(1.02 * f / (w @ w))[:, None] * w[None, :]
    for max_iter in (1, 50):
        x_adv, r = deepfool(model, x, overshoot=0.02, max_iter=max_iter)
        np.testing.assert_allclose(r.numpy().reshape(20, D), r_expected, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(x_adv.numpy().reshape(20, D), X + r_expected, rtol=0, atol=1e-14)
        with torch.no_grad():
            assert bool((model(x_adv).argmax(1) != model(x).argmax(1)).all())


def test_deepfool_affine_multiclass_goes_to_nearest_boundary():
    model = linear_model(4, seed=13)
    x, _ = interior_batch(20, seed=14, k=4)
    W, b = wb(model)
    X = x.numpy().reshape(20, D)
    Z = X @ W.T + b
    r_expected = np.zeros_like(X)
    for n in range(20):
        k0 = Z[n].argmax()
        best = None
        for k in range(4):
            if k == k0:
                continue
            wk, fk = W[k] - W[k0], Z[n, k] - Z[n, k0]
            dist = abs(fk) / np.linalg.norm(wk)
            if best is None or dist < best[0]:
                best = (dist, abs(fk) / (wk @ wk) * wk)
        r_expected[n] = 1.02 * best[1]
    x_adv, r = deepfool(model, x, max_iter=1)
    np.testing.assert_allclose(r.numpy().reshape(20, D), r_expected, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        assert bool((model(x_adv).argmax(1) != model(x).argmax(1)).all())
    # num_candidates=2 only looks at the runner-up class: the step goes to that boundary instead
    _, r2 = deepfool(model, x, num_candidates=2, max_iter=1)
    k0, k1 = np.argsort(-Z, axis=1)[:, 0], np.argsort(-Z, axis=1)[:, 1]
    w1 = W[k1] - W[k0]
    f1 = Z[np.arange(20), k1] - Z[np.arange(20), k0]
    np.testing.assert_allclose(r2.numpy().reshape(20, D), 1.02 * (np.abs(f1) / (w1 * w1).sum(1))[:, None] * w1,
                               rtol=1e-12, atol=1e-14)


def test_rho_adv_affine_closed_form():
    model = linear_model(2, seed=11)
    x, _ = interior_batch(20, seed=12, k=2)
    W, b = wb(model)
    w, c = W[1] - W[0], b[1] - b[0]
    X = x.numpy().reshape(20, D)
    ratios = 1.05 * np.abs(X @ w + c) / np.linalg.norm(w) / np.linalg.norm(X, axis=1)
    res = rho_adv(model, x, overshoot=0.05)
    assert isinstance(res, RhoAdv)
    assert (res.n_success, res.n_total) == (20, 20)
    assert res.rho == pytest.approx(ratios.mean(), rel=1e-12)
    assert float(res) == res.rho
    np.testing.assert_allclose(res.ratios.numpy(), ratios, rtol=1e-12)


class ShiftedReLULinear(nn.Module):
    """f(x) = w . relu(x - 0.5) - 0.1 for class 1 (class 0 logit 0): zero gradient when all x < 0.5."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1).double()
        with torch.no_grad():
            self.lin.weight.fill_(1.0)
            self.lin.bias.fill_(-0.1)

    def forward(self, x):
        f = self.lin(torch.relu(x - 0.5))
        return torch.cat([torch.zeros_like(f), f], dim=1)


def test_rho_adv_excludes_samples_deepfool_cannot_flip():
    model = ShiftedReLULinear()
    x = torch.tensor([[0.2, 0.2], [0.6, 0.55]], dtype=torch.float64)
    res = rho_adv(model, x)
    # sample 0: gradient zero, cannot move -> excluded; sample 1: f = 0.05, w = (1, 1) on the active
    # coordinates: r = -1.02 * 0.05 / 2 * (1, 1), a single step (the new point stays in the region).
    assert (res.n_success, res.n_total) == (1, 2)
    expected = 1.02 * 0.05 / math.sqrt(2) / math.hypot(0.6, 0.55)
    assert res.rho == pytest.approx(expected, rel=1e-12)
    assert math.isnan(res.ratios[0].item())
    x_adv, r = deepfool(model, x)
    torch.testing.assert_close(x_adv[0], x[0], rtol=0, atol=0)  # failure keeps its last iterate


class AffinePlusSqrtKink(nn.Module):
    """f(x) = W x + b + 0 * sum sqrt|x|: affine with gradient W wherever no feature is 0; a feature at
    exactly 0 makes every logit's input gradient NaN there (0 * inf in the sqrt's backward)."""

    def __init__(self, W, b):
        super().__init__()
        self.lin = nn.Linear(W.shape[1], W.shape[0]).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.as_tensor(W))
            self.lin.bias.copy_(torch.as_tensor(b))

    def forward(self, x):
        return self.lin(x) + 0.0 * x.abs().sqrt().sum(1, keepdim=True)


def test_deepfool_stuck_sample_keeps_its_iterate_when_its_gradient_is_nan():
    # Stuck samples were "moved" by coef = 0 times their gradient: 0 * NaN made x_adv and r NaN.
    W = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    b = np.array([0.0, -0.3])
    model = AffinePlusSqrtKink(W, b)
    x = torch.tensor([[0.0, 0.4, 0.6], [0.5, 0.3, 0.2]], dtype=torch.float64)  # sample 0 sits on the kink
    x_adv, r = deepfool(model, x)
    torch.testing.assert_close(x_adv[0], x[0], rtol=0, atol=0)
    torch.testing.assert_close(r[0], torch.zeros(3, dtype=torch.float64), rtol=0, atol=0)
    # sample 1: one exact step onto the affine boundary, times 1.02
    w, f = W[1] - W[0], float(x[1].numpy() @ (W[1] - W[0]) + b[1] - b[0])
    np.testing.assert_allclose(r[1].numpy(), -1.02 * f / (w @ w) * w, rtol=1e-12, atol=1e-15)
    res = rho_adv(model, x)
    assert (res.n_success, res.n_total) == (1, 2) and math.isnan(res.ratios[0].item())


def test_rho_adv_is_nan_when_nothing_flips():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]], dtype=x.dtype).expand(x.shape[0], 2) + 0 * x.sum(1, keepdim=True)

    x = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = rho_adv(Constant(), x, max_iter=3)
    assert res.n_success == 0 and res.n_total == 3 and math.isnan(res.rho)


# ----------------------------------------------------------------------------------------------
# JSMA
# ----------------------------------------------------------------------------------------------
def jsma_oracle_choice(W, t, xrow, theta, pairwise, hi=1.0, lo=0.0):
    """Brute-force Papernot saliency on an affine model (its forward derivative is constant)."""
    s = 1.0 if theta > 0 else -1.0
    a = s * W[t]
    bsum = s * (W.sum(0) - W[t])
    dom = [i for i in range(len(xrow)) if (xrow[i] < hi if theta > 0 else xrow[i] > lo)]
    if not pairwise:
        cands = [(a[i] * -bsum[i], (i,)) for i in dom if a[i] > 0 and bsum[i] < 0]
    else:
        cands = [((a[p] + a[q]) * -(bsum[p] + bsum[q]), (p, q)) for p, q in itertools.combinations(dom, 2)
                 if a[p] + a[q] > 0 and bsum[p] + bsum[q] < 0]
    return set(max(cands)[1])


@pytest.mark.parametrize("pairwise,theta", [(True, 1.0), (False, 1.0), (True, -1.0), (False, -0.3)])
def test_jsma_first_choice_matches_bruteforce_saliency(pairwise, theta):
    model = linear_model(3, seed=15)
    x, _ = interior_batch(12, seed=16, k=3, lo=0.2, hi=0.8)
    W, _ = wb(model)
    with torch.no_grad():
        target = (model(x).argmax(1) + 1) % 3
    per_step = 2 if pairwise else 1
    # gamma so that exactly one step is allowed: floor(gamma * 16) = per_step
    out = jsma(model, x, target, theta=theta, gamma=per_step / D, pairwise=pairwise)
    X, O = x.numpy().reshape(12, D), out.numpy().reshape(12, D)
    for n in range(12):
        changed = set(np.flatnonzero(O[n] != X[n]).tolist())
        expected = jsma_oracle_choice(W, int(target[n]), X[n], theta, pairwise)
        assert changed == expected, n
        for i in expected:
            assert O[n, i] == pytest.approx(min(max(X[n, i] + theta, 0.0), 1.0), abs=1e-15)


def test_jsma_takes_uint8_targets():
    # The label check accepts uint8 (as F.cross_entropy does), but JSMA's gather needs int64 indices:
    # uint8 targets raised "gather(): Expected dtype int32/int64 for index".
    model = linear_model(3, seed=15)
    x, _ = interior_batch(12, seed=16, k=3, lo=0.2, hi=0.8)
    W, _ = wb(model)
    with torch.no_grad():
        target = (model(x).argmax(1) + 1) % 3
    out = jsma(model, x, target.to(torch.uint8), gamma=2 / D)  # one pair
    X, O = x.numpy().reshape(12, D), out.numpy().reshape(12, D)
    for n in range(12):
        assert set(np.flatnonzero(O[n] != X[n]).tolist()) == jsma_oracle_choice(W, int(target[n]), X[n], 1.0, True), n


def test_jsma_reaches_target_within_gamma():
    model = linear_model(3, seed=17, scale=2.0)
    x, _ = interior_batch(30, seed=18, k=3, lo=0.0, hi=0.4)
    with torch.no_grad():
        pred = model(x).argmax(1)
    target = (pred + 1) % 3
    gamma = 0.5
    W, _ = wb(model)
    for pairwise in (True, False):
        out = jsma(model, x, target, gamma=gamma, pairwise=pairwise)
        changed = (out != x).flatten(1)
        assert int(changed.sum(1).max()) <= math.floor(gamma * D)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        with torch.no_grad():
            reached = model(out).argmax(1) == target
        if pairwise:  # Papernot's pairs: every sample gets there
            assert bool(reached.all()), f"{int(reached.sum())}/30 reached the target"
        else:
            # A single feature must itself satisfy a_i > 0 and b_i < 0, which few do (the reason
            # Papernot et al. search pairs): a miss must have used every admissible feature.
            assert int(reached.sum()) >= 20
            for n in torch.nonzero(~reached).flatten().tolist():
                t = int(target[n])
                admissible = (W[t] > 0) & (W.sum(0) - W[t] < 0)
                np.testing.assert_array_equal(changed[n].numpy(), admissible)


def test_jsma_small_gamma_stops_at_budget_and_leaves_target_samples_alone():
    model = linear_model(3, seed=17, scale=2.0)
    x, _ = interior_batch(30, seed=18, k=3, lo=0.0, hi=0.4)
    with torch.no_grad():
        pred = model(x).argmax(1)
    target = (pred + 1) % 3
    target[:5] = pred[:5]  # already classified as the target: untouched
    out = jsma(model, x, target, gamma=5 / D, pairwise=True)  # floor(5) -> at most 2 pairs = 4 features
    n_changed = (out != x).flatten(1).sum(1)
    assert int(n_changed.max()) <= 4
    assert int(n_changed[:5].max()) == 0
    with torch.no_grad():
        hit = model(out).argmax(1) == target
    # samples that miss the target must have used the whole budget (or run out of admissible pairs)
    assert bool((n_changed[~hit] == 4).all())


# ----------------------------------------------------------------------------------------------
# invariants shared by every attack (conv + BatchNorm model in train mode)
# ----------------------------------------------------------------------------------------------
EPS = 0.1
L2_EPS = 0.5


def _run_case(name, model, x, y, t):
    gen = torch.Generator().manual_seed(0)
    if name == "fgsm":
        return fgsm(model, x, y, EPS), ("linf", EPS)
    if name == "fgsm_targeted":
        return fgsm(model, x, t, EPS, targeted=True), ("linf", EPS)
    if name == "pgd_linf":
        return pgd(model, x, y, EPS, steps=3, generator=gen), ("linf", EPS)
    if name == "pgd_l2_restarts":
        return pgd(model, x, y, L2_EPS, norm="l2", steps=3, restarts=2, generator=gen), ("l2", L2_EPS)
    if name == "pgd_targeted":
        return pgd(model, x, t, EPS, steps=3, targeted=True, generator=gen), ("linf", EPS)
    if name == "mi_fgsm":
        return mi_fgsm(model, x, y, EPS, steps=3), ("linf", EPS)
    if name == "ni_fgsm":
        return ni_fgsm(model, x, y, EPS, steps=3), ("linf", EPS)
    if name == "abi_fgm":
        return abi_fgm(model, x, y, EPS, steps=3), ("linf", EPS)
    if name == "jsma_pair":
        return jsma(model, x, t, gamma=0.15), ("l0", 0.15)
    if name == "jsma_single":
        return jsma(model, x, t, gamma=0.1, pairwise=False), ("l0", 0.1)
    if name == "deepfool":
        return deepfool(model, x, max_iter=4, clamp=(0.0, 1.0))[0], (None, None)
    raise AssertionError(name)


CASES = ["fgsm", "fgsm_targeted", "pgd_linf", "pgd_l2_restarts", "pgd_targeted", "mi_fgsm", "ni_fgsm",
         "abi_fgm", "jsma_pair", "jsma_single", "deepfool"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("grad_mode", ["enabled", "no_grad"])
def test_attack_invariants(name, grad_mode):
    model = conv_bn_model()
    model.train()
    model[-1].eval()  # mixed modes: each flag must survive as it was
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 6, 6, generator=g)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 1.0])  # features on the box boundary
    y = torch.randint(0, 5, (6,), generator=g)
    t = (y + 1) % 5
    x_before = x.clone()
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    ctx = torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad()
    with ctx:
        out, (kind, budget) = _run_case(name, model, x, y, t)

    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert not out.requires_grad and out.grad_fn is None
    assert out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0, msg=f"buffer {k} changed")
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    delta = (out - x).flatten(1)
    if kind == "linf":
        assert float(delta.abs().max()) <= budget + 1e-6
    elif kind == "l2":
        assert float(delta.norm(dim=1).max()) <= budget * (1 + 1e-6)
    elif kind == "l0":
        assert int((delta != 0).sum(1).max()) <= math.floor(budget * x[0].numel())
    if name not in ("jsma_single", "deepfool"):  # the attacks actually moved something
        assert float(delta.abs().max()) > 0


def test_attacks_leave_x_requires_grad_and_graph_alone():
    model = linear_model(3, seed=1)
    x, y = interior_batch(4, seed=2, k=3)
    x.requires_grad_(True)
    out = pgd(model, x, y, 0.1, steps=2, generator=torch.Generator().manual_seed(0))
    assert x.requires_grad and x.grad is None and not out.requires_grad


# ----------------------------------------------------------------------------------------------
# transfer attacks on a trained model, accuracy, transfer protocol
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", [mi_fgsm, ni_fgsm, abi_fgm, fgsm, pgd])
def test_attacks_reduce_accuracy_of_trained_model(trained_mlp, attack):
    model, x, y = trained_mlp
    clean = accuracy(model, x, y)
    x_adv = attack(model, x, y, 0.1)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert accuracy(model, x_adv, y) < clean - 0.2


def test_accuracy_matches_numpy_and_chunks():
    model = linear_model(4, seed=21)
    x, y = interior_batch(37, seed=22, k=4)
    W, b = wb(model)
    expected = float(np.mean((x.numpy().reshape(37, D) @ W.T + b).argmax(1) == y.numpy()))
    for bs in (5, 37, 256):
        assert accuracy(model, x, y, batch_size=bs) == expected
    bn = conv_bn_model().train()
    before = bn[1].running_mean.clone()
    xb = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    accuracy(bn, xb, torch.zeros(8, dtype=torch.long), batch_size=3)
    assert bn.training and torch.equal(bn[1].running_mean, before)


def test_transfer_accuracy_closed_form():
    source = linear_model(2, seed=1)
    other = linear_model(2, seed=31)
    x, y = interior_batch(40, seed=2, k=2)
    X_adv = binary_corner(source, x, y, 0.1).reshape(40, D)  # FGSM on source, closed form
    for target in (source, other):
        W, b = wb(target)
        expected = float(np.mean((X_adv @ W.T + b).argmax(1) == y.numpy()))
        assert transfer_accuracy(source, target, x, y, "fgsm", eps=0.1) == expected
        assert transfer_accuracy(source, target, x, y, fgsm, batch_size=7, eps=0.1) == expected
    # deepfool (no label) and jsma (explicit targets) go through the same protocol
    assert transfer_accuracy(source, source, x, y, "deepfool") == pytest.approx(
        float(np.mean(source(x).argmax(1).numpy() != y.numpy())))
    t = 1 - source(x).argmax(1).detach()
    acc = transfer_accuracy(source, other, x, y, "jsma", target=t, gamma=0.5, batch_size=16)
    assert 0.0 <= acc <= 1.0


def test_attacks_registry():
    assert set(ATTACKS) == {"fgsm", "pgd", "mi_fgsm", "ni_fgsm", "abi_fgm", "jsma", "deepfool"}
    assert ATTACKS["pgd"] is pgd and ATTACKS["deepfool"] is deepfool


# ----------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------
_M = linear_model(3, seed=0)
_X, _Y = interior_batch(4, seed=0, k=3)

BAD = [
    (lambda: fgsm(_M, _X, _Y, -0.1), ValueError, "eps"),
    (lambda: fgsm(_M, _X, _Y, "0.1"), TypeError, "eps"),
    (lambda: fgsm(_M, _X, _Y, 0.1, targeted=1), TypeError, "targeted"),
    (lambda: pgd(_M, _X, _Y, 0.1, steps=0), ValueError, "steps"),
    (lambda: pgd(_M, _X, _Y, 0.1, steps=2.0), TypeError, "steps"),
    (lambda: pgd(_M, _X, _Y, 0.1, norm="l1"), ValueError, "norm"),
    (lambda: pgd(_M, _X, _Y, 0.1, alpha=-1.0), ValueError, "alpha"),
    (lambda: pgd(_M, _X, _Y, 0.1, restarts=0), ValueError, "restarts"),
    (lambda: pgd(_M, _X, _Y, 0.1, restarts=2, random_start=False), ValueError, "restarts"),
    (lambda: pgd(_M, _X, _Y, 0.1, generator=0), TypeError, "generator"),
    (lambda: fgsm(_M, (_X * 10).long(), _Y, 0.1), TypeError, "x must be a floating"),
    (lambda: fgsm(_M, _X.numpy(), _Y, 0.1), TypeError, "x must be a torch.Tensor"),
    (lambda: fgsm(_M, _X, _Y.double(), 0.1), TypeError, "y must hold integer"),
    (lambda: fgsm(_M, _X, _Y[:, None], 0.1), ValueError, r"y must have shape \(4,\)"),
    (lambda: fgsm(_M, _X, _Y + 3, 0.1), ValueError, "labels must lie in"),
    (lambda: fgsm(_M, _X, _Y, 0.1, clamp=(1.0, 0.0)), ValueError, "clamp"),
    (lambda: fgsm(_M, _X, _Y, 0.1, clamp=0.5), TypeError, "clamp"),
    (lambda: fgsm(_M, _X + 1.0, _Y, 0.1), ValueError, "outside clamp"),
    (lambda: fgsm(lambda x: x, _X, _Y, 0.1), TypeError, "model must be a torch.nn.Module"),
    (lambda: pgd(_M, _X, _Y, -0.1), ValueError, "eps"),
    (lambda: pgd(_M, _X, _Y, None), TypeError, "eps"),
    (lambda: mi_fgsm(_M, _X, _Y, -0.1), ValueError, "eps"),
    (lambda: ni_fgsm(_M, _X, _Y, float("nan")), ValueError, "eps"),
    (lambda: abi_fgm(_M, _X, _Y, "0.1"), TypeError, "eps"),
    (lambda: pgd(_M, _X, _Y, 0.1, random_start=1), TypeError, "random_start"),
    (lambda: jsma(_M, _X, _Y, pairwise="yes"), TypeError, "pairwise"),
    (lambda: mi_fgsm(_M, _X, _Y, 0.1, decay=-1.0), ValueError, "decay"),
    (lambda: ni_fgsm(_M, _X, _Y, 0.1, steps=-2), ValueError, "steps"),
    (lambda: abi_fgm(_M, _X, _Y, 0.1, beta1=1.0), ValueError, "beta1"),
    (lambda: abi_fgm(_M, _X, _Y, 0.1, beta2=-0.5), ValueError, "beta2"),
    (lambda: jsma(_M, _X, _Y, theta=0.0), ValueError, "theta"),
    (lambda: jsma(_M, _X, _Y, gamma=0.0), ValueError, "gamma"),
    (lambda: jsma(_M, _X, _Y, gamma=1.5), ValueError, "gamma"),
    (lambda: jsma(_M, _X, _Y.float()), TypeError, "target must hold integer"),
    (lambda: deepfool(_M, _X, num_candidates=1), ValueError, "num_candidates"),
    (lambda: deepfool(_M, _X, overshoot=-0.1), ValueError, "overshoot"),
    (lambda: deepfool(_M, _X, max_iter=0), ValueError, "max_iter"),
    (lambda: rho_adv(_M, _X, steps=3), TypeError, "unexpected keyword"),
    (lambda: accuracy(_M, _X, _Y, batch_size=0), ValueError, "batch_size"),
    (lambda: transfer_accuracy(_M, _M, _X, _Y, "cw"), ValueError, "attack"),
    (lambda: transfer_accuracy(_M, _M, _X, _Y, 3), TypeError, "attack"),
    (lambda: transfer_accuracy(_M, _M, _X, _Y, "jsma"), ValueError, "target="),
    (lambda: fgsm(nn.Linear(D, 3, device="meta"), _X.flatten(1), _Y, 0.1), ValueError, "model is on meta"),
    # labels are required wherever None has no meaning (only FGSM reads None as the predicted labels):
    # PGD and the momentum attacks ran, relabelling with the prediction at every iterate (PGD with
    # restarts then crashed inside cross_entropy), and JSMA silently returned x unchanged
    (lambda: pgd(_M, _X, None, 0.1), TypeError, "y must be a torch.Tensor"),
    (lambda: pgd(_M, _X, None, 0.1, restarts=2), TypeError, "y must be a torch.Tensor"),
    (lambda: mi_fgsm(_M, _X, None, 0.1), TypeError, "y must be a torch.Tensor"),
    (lambda: ni_fgsm(_M, _X, None, 0.1), TypeError, "y must be a torch.Tensor"),
    (lambda: abi_fgm(_M, _X, None, 0.1), TypeError, "y must be a torch.Tensor"),
    (lambda: jsma(_M, _X, None), TypeError, "target must be a torch.Tensor"),
    # a non-bool targeted was reported as "targeted=True needs the target classes" when y is None
    (lambda: fgsm(_M, _X, None, 0.1, targeted="no"), TypeError, "targeted must be a bool"),
    # JSMA's targets are sliced per chunk: a too-long tensor was silently truncated
    (lambda: transfer_accuracy(_M, _M, _X, _Y, "jsma", target=torch.zeros(8, dtype=torch.long)), ValueError,
     r"target must have shape \(4,\)"),
    (lambda: transfer_accuracy(_M, _M, _X, _Y, "jsma", target=torch.zeros(8, dtype=torch.long), batch_size=2),
     ValueError, r"target must have shape \(4,\)"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[f"bad{i}-{m}" for i, (_, _, m) in enumerate(BAD)])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# optional cross-check (not counted as coverage: torchattacks is not installed in CI)
# ----------------------------------------------------------------------------------------------
def test_cross_check_torchattacks(trained_mlp):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained_mlp
    ours = mi_fgsm(model, x, y, 0.1, steps=5, alpha=0.02)
    theirs = torchattacks.MIFGSM(model, eps=0.1, alpha=0.02, steps=5, decay=1.0)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_fgsm_with_predicted_labels_uses_the_models_own_prediction():
    # y=None: the step ascends the CE at the model's argmax label (no label leaking), from one forward.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).double()
    x = torch.rand(6, 12, dtype=torch.float64) * 0.4 + 0.3
    pred = model(x).argmax(1)
    torch.testing.assert_close(fgsm(model, x, None, 0.05), fgsm(model, x, pred, 0.05), rtol=0, atol=0)
    with pytest.raises(ValueError, match="targeted=True needs the target classes"):
        fgsm(model, x, None, 0.05, targeted=True)


@pytest.mark.parametrize("gamma, budget", [(0.29, 29), (math.nextafter(0.29, 0.0), 28), (0.5, 50), (0.01, 1)])
def test_jsma_budget_is_the_largest_count_within_gamma(gamma, budget):
    # On a target the model can never predict, JSMA (one feature a step) spends its whole budget:
    # the largest k with k / D <= gamma, the mask quantile's rule. floor(gamma * D) in floats gave 28
    # for 0.29 of 100 (0.29 * 100 = 28.999999999999996), and floor(gamma * D + 1e-9) gave 29 for the
    # float just below 0.29, which allows only 28.
    d = 100
    model = linear_model(3, seed=4, d=d)
    with torch.no_grad():
        model[1].weight[2].fill_(1.0)  # the target's logit rises with every feature ...
        model[1].weight[:2].fill_(-1.0)  # and the others fall: every feature is admissible
        model[1].bias.copy_(torch.tensor([1e6, 0.0, -1e6], dtype=torch.float64))  # ... but never wins
    x = torch.full((2, d), 0.3, dtype=torch.float64)
    out = jsma(model, x, torch.tensor([2, 2]), gamma=gamma, pairwise=False)
    assert (out != x).sum(1).tolist() == [budget, budget]


class _SqrtAtZero(nn.Module):
    """Linear logits plus 0 * sqrt|x|: the input gradient is NaN wherever a feature is exactly 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) + 0 * x.abs().sqrt().sum(1, keepdim=True)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "mi_fgsm", "ni_fgsm", "abi_fgm"])
def test_gradient_attacks_warn_when_the_input_gradient_is_not_finite(name):
    # a NaN gradient left samples unmoved (sign(NaN) steps) or made NaN iterates without a word,
    # so the accuracy under attack overstated robustness
    attack = ATTACKS[name]
    kwargs = {"steps": 2, "random_start": False} if name == "pgd" else {} if name == "fgsm" else {"steps": 2}
    model, y = _SqrtAtZero(), torch.tensor([0, 1, 2])
    x = torch.full((3, 4), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finite gradients: silent
        attack(model, x, y, 0.1, **kwargs)
    x[1, 2] = 0.0
    with pytest.warns(RuntimeWarning, match=rf"^{name}: the model's input gradient was not finite"):
        attack(model, x, y, 0.1, **kwargs)


@pytest.mark.parametrize("pairwise", [True, False])
def test_jsma_keeps_the_channels_last_memory_format(pairwise):
    # JSMA rebuilt its result from a row-major (N, D) copy, so a channels-last input came back
    # NCHW-contiguous (right values, wrong layout) while every other attack keeps the input's format
    model = linear_model(3, seed=21, d=3 * 4 * 4)
    g = torch.Generator().manual_seed(22)
    x = 0.2 + 0.6 * torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        target = (model(x).argmax(1) + 1) % 3
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()  # 3 channels: the two layouts really differ
    ref = jsma(model, x, target, gamma=0.25, pairwise=pairwise)
    out = jsma(model, x_cl, target, gamma=0.25, pairwise=pairwise)
    assert ref.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, ref)
    assert bool((out != x).any())  # the attack did move something
