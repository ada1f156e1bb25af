"""Audit of the training methods: each method's per-step loss (value and parameter gradients) against
an independent float64 re-implementation in plain PyTorch, per SPEC.md and docs/TRAINING.md.

The oracles below use only torch: per-sample input gradients and Jacobians are taken one sample at a
time (so the "per-sample, averaged over the batch" scaling is checked, not assumed), and the random
draws are replayed from a generator seeded like the method's ``ctx.generator``.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jsigr_fast.train.config import TrainConfig, resolve
from jsigr_fast.train.methods import METHODS, MethodContext

C, H, W, K, N = 1, 6, 6, 5, 6
SEED = 5
TIGHT = dict(rtol=1e-10, atol=1e-12)


class Tiny(nn.Module):
    def __init__(self, bn=False):
        super().__init__()
        self.conv = nn.Conv2d(C, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * H * W, K)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def tiny(seed=1, bn=False):
    torch.manual_seed(seed)
    return Tiny(bn).double()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, C, H, W, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    return x, y


@pytest.fixture
def tiny_teacher(monkeypatch):
    """The teacher of ir / distill as a Tiny network (the method rebuilds it from its state)."""
    import jsigr_fast.train.methods as methods

    monkeypatch.setattr(methods, "build_model", lambda arch: Tiny())
    teacher = tiny(seed=7)
    return teacher, {"teacher": teacher.state_dict(), "teacher_arch": {"model": "tiny", "kwargs": {}}}


def make(name, state=None, total_steps=10, **overrides):
    cfg = resolve(TrainConfig(method=name, **overrides))
    ctx = MethodContext(cfg=cfg, device=torch.device("cpu"), input_shape=(C, H, W), arch={},
                        generator=torch.Generator().manual_seed(SEED), total_steps=total_steps)
    method = METHODS[name](cfg, ctx, state=state)
    if hasattr(method, "crit"):
        method.crit.double()
    if getattr(method, "teacher", None) is not None:
        method.teacher.double()
    return method, cfg


def replay():
    return torch.Generator().manual_seed(SEED)


# -- oracles ---------------------------------------------------------------------------------------
def per_sample_grad(f, x, y):
    """``g_n = d CE(f(x_n), y_n) / d x_n``, one sample at a time, with its graph."""
    out = []
    for n in range(x.shape[0]):
        xn = x[n:n + 1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(f(xn), y[n:n + 1]), xn, create_graph=True)
        out.append(g)
    return torch.cat(out)


def per_sample_jacobian(f, x):
    """``J_n = dz_n / dx_n`` (K x D) per sample, with its graph."""
    out = []
    for n in range(x.shape[0]):
        xn = x[n:n + 1].detach().requires_grad_(True)
        z = f(xn)[0]
        out.append(torch.stack([torch.autograd.grad(z[k], xn, create_graph=True)[0].reshape(-1)
                                for k in range(z.shape[0])]))
    return torch.stack(out)


def class_gradient(f, x, y, create_graph):
    xr = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr).gather(1, y[:, None]).sum(), xr, create_graph=create_graph)
    return g


def adaptor_map(g, weight, bias):
    """JARN's adaptor as documented: ``tanh(conv1x1(g / rms(g)))``, rms per sample."""
    g4 = g.reshape(g.shape[0], C, -1, 1)
    g4 = g4 / (g4.pow(2).mean((1, 2, 3), keepdim=True) + torch.finfo(g4.dtype).tiny).sqrt()
    return torch.tanh(F.conv2d(g4, weight, bias)).reshape(g.shape)


def fgsm_random_start(f, x, y, eps, alpha, gen):
    x1 = (x + (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) * eps).clamp(0, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(f(x1), y, reduction="sum"), x1)
    return (x + (x1.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)


def assert_same_loss(got, want, model_got, model_want=None, **tol):
    """Same value, dtype and parameter gradients."""
    tol = tol or TIGHT
    model_want = model_want or model_got
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    torch.testing.assert_close(got, want, **tol)
    g1 = torch.autograd.grad(got, list(model_got.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(want, list(model_want.parameters()), retain_graph=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **tol)


# -- the regression: distillation's soft-label loss in the model's precision -----------------------
def test_distill_student_loss_is_the_float64_soft_cross_entropy(batch, tiny_teacher):
    """Stage 2 (J-SIGR Eq. 4, T = 50): ``-sum_k softmax(t(x)/T)_k log softmax(f(x)/T)_k``, batch mean,
    no T^2 factor. It used to cast the logits with ``.float()``: a float64 model got a float32 loss,
    1.9e-7 off the float64 value (at T = 50 the soft CE differs from log K only by O(1/T^2))."""
    x, y = batch
    teacher, state = tiny_teacher
    f = tiny()
    method, cfg = make("distill", state=state)
    assert cfg.temperature == 50.0  # SPEC: defensive distillation at T = 50
    loss, terms = method.loss(f, x, y, [], step=0)
    T = 50.0
    soft = F.softmax(teacher(x).detach() / T, dim=1)
    want = -(soft * F.log_softmax(f(x) / T, dim=1)).sum(1).mean()
    assert loss.dtype == torch.float64
    assert_same_loss(loss, want, f)
    torch.testing.assert_close(terms["soft_ce"], want.detach(), **TIGHT)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(f(x), y).detach(), **TIGHT)


def test_distill_teacher_stage_is_the_ce_at_temperature(batch):
    x, y = batch
    f = tiny()
    method, _ = make("distill")
    loss, terms = method.loss(f, x, y, [], step=0)
    assert_same_loss(loss, F.cross_entropy(f(x) / 50.0, y), f)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(f(x), y).detach(), **TIGHT)


# -- the other methods against the same kind of oracle (pinning what was checked) -------------------
def test_input_grad_is_the_per_sample_double_backprop_penalty(batch):
    x, y = batch
    f = tiny()
    method, _ = make("input_grad", lambda_ig=2.0, backend="reference")
    loss, terms = method.loss(f, x, y, [], step=0)
    ig = per_sample_grad(f, x, y).flatten(1).pow(2).sum(1).mean()
    assert_same_loss(loss, F.cross_entropy(f(x), y) + 2.0 * ig, f)
    torch.testing.assert_close(terms["ig"], ig.detach(), **TIGHT)


@pytest.mark.parametrize("estimator, squared", [("exact", True), ("exact", False), ("projection", True),
                                                ("hutchinson", True)])
def test_jacobian_regularization_scaling_and_estimators(batch, estimator, squared):
    x, y = batch
    f = tiny()
    method, _ = make("jacobian", lambda_j=0.3, jacobian_estimator=estimator, n_proj=2, jacobian_squared=squared,
                     backend="reference")
    loss, terms = method.loss(f, x, y, [], step=0)
    J = per_sample_jacobian(f, x)  # N, K, D
    if estimator == "exact":
        per = J.pow(2).sum((1, 2))
    else:
        gen, per = replay(), 0
        for _ in range(2):
            if estimator == "projection":  # v uniform on S^{K-1}: K ||J^T v||^2
                v = torch.randn(N, K, generator=gen, dtype=x.dtype)
                v = v / v.norm(dim=1, keepdim=True)
                per = per + K * torch.einsum("nk,nkd->nd", v, J).pow(2).sum(1)
            else:  # z ~ N(0, I_D): ||J z||^2
                z = torch.randn(x.shape, generator=gen, dtype=x.dtype).reshape(N, -1)
                per = per + torch.einsum("nkd,nd->nk", J, z).pow(2).sum(1)
        per = per / 2
    reg = per.mean() if squared else per.sum().sqrt() / N
    assert_same_loss(loss, F.cross_entropy(f(x), y) + 0.3 * reg, f)
    torch.testing.assert_close(terms["jac"], reg.detach(), **TIGHT)


@pytest.mark.parametrize("rule", [{"beta": 0.1}, {"mask_quantile": 0.25}])
def test_jsigr_is_eq10_with_the_adaptor_mask(batch, rule):
    x, y = batch
    f = tiny()
    method, cfg = make("jsigr", lambda_m=0.7, lambda_j=0.2, jacobian_estimator="exact", backend="reference", **rule)
    assert cfg.jsigr_eps == 0.3
    adaptor = method.crit.gan.adaptor
    weight, bias = adaptor.conv.weight.detach().clone(), adaptor.conv.bias.detach().clone()
    loss, terms = method.loss(f, x, y, [], step=0)
    z = torch.randn(x.shape, generator=replay(), dtype=x.dtype)
    g_hat = per_sample_grad(f, x + 0.3 * x.std(unbiased=False) * z, y).detach()
    M = adaptor_map(g_hat, weight, bias)
    if "beta" in rule:
        mask = (M <= rule["beta"]).to(x.dtype)
    else:
        flat = M.reshape(N, -1)
        keep = math.floor(rule["mask_quantile"] * flat.shape[1])
        mask = torch.ones_like(flat).scatter_(1, flat.argsort(1, descending=True)[:, :keep], 0.0).reshape(x.shape)
    sig = (mask * per_sample_grad(f, x, y)).flatten(1).pow(2).sum(1).mean()
    jac = per_sample_jacobian(f, x).pow(2).sum((1, 2)).mean()
    assert_same_loss(loss, F.cross_entropy(f(x), y) + 0.7 * sig + 0.2 * jac, f)
    torch.testing.assert_close(terms["sig"], sig.detach(), **TIGHT)
    torch.testing.assert_close(terms["jac"], jac.detach(), **TIGHT)
    torch.testing.assert_close(terms["mask_fraction"], mask.mean(), **TIGHT)
    with torch.no_grad():
        gen = F.logsigmoid(-method.crit.gan.discriminator(M)).mean()
    torch.testing.assert_close(terms["gen"], gen, **TIGHT)


@pytest.mark.parametrize("name", ["jarn", "jarn_at1"])
def test_jarn_before_and_after_jarn_start(batch, name):
    x, y = batch
    f = tiny()
    method, cfg = make(name, jarn_start=0.5, backend="reference", total_steps=10)  # JARN from step 5
    assert cfg.lambda_adv == 1.0 and cfg.jarn_noise == (8 / 255 if name == "jarn" else 0.0)
    gen = replay()

    def inputs():
        if name == "jarn":
            return x
        return fgsm_random_start(f, x, y, cfg.attack_eps, cfg.fgsm_alpha * cfg.attack_eps, gen)

    loss, _ = method.loss(f, x, y, [], step=4)
    assert_same_loss(loss, F.cross_entropy(f(inputs()), y), f)
    adaptor, disc = method.crit.gan.adaptor, method.crit.gan.discriminator
    weight, bias = adaptor.conv.weight.detach().clone(), adaptor.conv.bias.detach().clone()
    loss, terms = method.loss(f, x, y, [], step=5)
    xi = inputs()
    if cfg.jarn_noise:
        xi = xi + (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) * cfg.jarn_noise
    Jp = adaptor_map(per_sample_grad(f, xi, y), weight, bias)
    gen_term = F.logsigmoid(-disc(Jp)).mean()
    assert_same_loss(loss, F.cross_entropy(f(xi), y) + 1.0 * gen_term, f)
    with torch.no_grad():
        adv = F.logsigmoid(disc(xi)).mean() + F.logsigmoid(-disc(Jp)).mean()
    torch.testing.assert_close(terms["gen"], gen_term.detach(), **TIGHT)
    torch.testing.assert_close(terms["adv"], adv, **TIGHT)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_pgd_at_in_train_mode_with_frozen_running_stats(batch, dataset):
    import copy

    x, y = batch
    f = tiny(bn=True).train()
    ref = copy.deepcopy(f)
    method, cfg = make("pgd_at", dataset=dataset)
    loss, _ = method.loss(f, x, y, [], step=0)
    eps, alpha, steps = cfg.attack_eps, cfg.attack_alpha, cfg.attack_steps
    buffers = {k: v.clone() for k, v in ref.named_buffers()}
    xa = (x + (2 * torch.rand(x.shape, generator=replay(), dtype=x.dtype) - 1) * eps).clamp(0, 1)
    for _ in range(steps):  # train mode, batch statistics of the iterate
        xr = xa.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(ref(xr), y, reduction="sum"), xr)
        xa = (x + (xr.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    with torch.no_grad():  # the attack leaves the running statistics alone
        for k, v in ref.named_buffers():
            v.copy_(buffers[k])
    assert_same_loss(loss, F.cross_entropy(ref(xa.detach()), y), f, ref)
    for (k, a), (_, b) in zip(f.named_buffers(), ref.named_buffers()):  # one update, by the training forward
        torch.testing.assert_close(a, b, **TIGHT)
    assert int(f.bn.num_batches_tracked) == 1 and f.training


def test_fgsm_at_clean_adv_is_half_clean_half_fgsm_at_the_predicted_label(batch):
    x, y = batch
    f = tiny()
    method, cfg = make("fgsm_at", fgsm_variant="clean_adv", dataset="mnist")
    loss, terms = method.loss(f, x, y, [], step=0)
    xr = x.clone().requires_grad_(True)
    logits = f(xr)
    pred = logits.argmax(1)
    assert not torch.equal(pred, y)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, pred, reduction="sum"), xr)
    x_adv = (x + 0.3 * g.sign()).clamp(0, 1)
    clean, adv = F.cross_entropy(f(x), y), F.cross_entropy(f(x_adv), y)
    assert_same_loss(loss, 0.5 * clean + 0.5 * adv, f)
    torch.testing.assert_close(terms["ce_clean"], clean.detach(), **TIGHT)
    torch.testing.assert_close(terms["ce_adv"], adv.detach(), **TIGHT)


def test_fgsm_at_random_start(batch):
    x, y = batch
    f = tiny()
    method, cfg = make("fgsm_at", dataset="mnist")
    loss, _ = method.loss(f, x, y, [], step=0)
    x_adv = fgsm_random_start(f, x, y, 0.3, 1.25 * 0.3, replay())
    assert_same_loss(loss, F.cross_entropy(f(x_adv), y), f)


@pytest.mark.parametrize("samples, phi", [(6, 1.0), (13, 1.0), (4, None)])
def test_ir_against_smoothgrad_targets(batch, tiny_teacher, samples, phi):
    x, y = batch
    teacher, state = tiny_teacher
    f = tiny()
    method, _ = make("ir", state=state, ir_samples=samples, ir_phi=phi, backend="reference")
    loss, terms = method.loss(f, x, y, [], step=0)
    gen = replay()
    scale = (0.15 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))).view(N, 1, 1, 1)
    acc, done = torch.zeros_like(x), 0
    while done < samples:  # drawn in chunks of up to 10 noisy copies of the batch
        c = min(10, samples - done)
        noise = torch.randn((c, *x.shape), generator=gen, dtype=x.dtype) * scale
        for i in range(c):
            acc += class_gradient(teacher, x + noise[i], y, False)
        done += c
    target = (acc / samples).flatten(1)
    if phi is not None:
        mu, sd = target.mean(1, keepdim=True), target.std(1, unbiased=False, keepdim=True)
        target = target * ((target - mu).abs() > phi * sd)
    jc = class_gradient(f, x, y, True).flatten(1)
    cos = F.cosine_similarity(jc, target, dim=1).mean()
    mag = jc.norm(dim=1).mean()
    assert_same_loss(loss, F.cross_entropy(f(x), y) - 3.0 * cos + 0.15 * mag, f)
    torch.testing.assert_close(terms["cos"], cos.detach(), **TIGHT)
    torch.testing.assert_close(terms["mag"], mag.detach(), **TIGHT)


@pytest.mark.parametrize("dataset, preset", [("mnist", (0.3, 40, 0.01)), ("cifar10", (8 / 255, 7, 2 / 255)),
                                             ("imagenet", (16 / 255, 10, 4 / 255))])
def test_attack_presets_are_specs(dataset, preset):
    for name in ("pgd_at", "fgsm_at", "jarn_at1"):
        _, cfg = make(name, dataset=dataset)
        assert (cfg.attack_eps, cfg.attack_steps, cfg.attack_alpha) == pytest.approx(preset, rel=1e-15)


@pytest.mark.parametrize("variant, columns", [("random_start", []), ("clean_adv", ["ce_clean", "ce_adv"])])
def test_fgsm_at_logs_only_the_terms_its_variant_has(tmp_path, variant, columns):
    # random_start declared ce_clean / ce_adv too and left both columns empty in every row
    import csv

    from jsigr_fast.cli import main

    assert main(["train", "--method", "fgsm_at", "--fgsm-variant", variant, "--epochs", "1", "--steps-per-epoch",
                 "2", "--batch-size", "8", "--eval-max-batches", "1", "--log-every", "1", "--threads", "1",
                 "--progress", "false", "--tensorboard", "false", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [k for k in rows[0] if k.startswith("ce_")] == columns
    assert all(r[k] != "" for r in rows for k in ["ce", *columns])
