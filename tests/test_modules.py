"""The stateful criteria JSIGR and JARN: their classifier loss, the adaptor/discriminator updates
(direction and schedule), and exact resume from state_dict."""
import copy

import pytest
import torch
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast.adversarial import adversarial_loss
from jsigr_fast.testing import tiny_input, tiny_model
from oracles import batch_input_gradient, directional_fd, random_direction


def _setup(name="conv_bn_train"):
    model, x = tiny_model(name), tiny_input(name)
    y = torch.tensor([0, 1, 2, 3, 0])
    return model, x, y


def _crit(cls, **kw):
    kw.setdefault("discriminator", (4, 8))
    return cls((2, 6, 6), **kw).double()


def test_adversarial_loss_formula():
    a_real, a_fake = torch.tensor([0.3, -1.2]), torch.tensor([2.0, -0.5, 0.1])
    d_real, d_fake = torch.sigmoid(a_real), torch.sigmoid(a_fake)
    expect = torch.log(d_real).mean() + torch.log(1 - d_fake).mean()  # JARN Eq. 9
    torch.testing.assert_close(adversarial_loss(a_real, a_fake), expect)


def test_jsigr_eval_mode_is_functional_loss_with_adaptor_saliency():
    model, x, y = _setup()
    crit = _crit(jsigr_fast.JSIGR, beta=0.2).eval()
    got = crit(model, x, y, generator=torch.Generator().manual_seed(3))
    expect = jsigr_fast.loss(model, x, y, saliency=lambda g, _: crit.adaptor(g), beta=0.2,
                             generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=0)
    before = copy.deepcopy(crit.state_dict())
    crit(model, x, y)
    for k, v in crit.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k  # eval: nothing trains


def test_adaptor_untrained_is_tanh_of_rms_normalised_gradient():
    g = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    a = jsigr_fast.SaliencyAdaptor(2).double()
    rms = g.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(a(g), torch.tanh(g / rms), rtol=1e-12, atol=1e-15)
    v = torch.randn(3, 7, dtype=torch.float64)  # vector inputs: one channel
    a1 = jsigr_fast.SaliencyAdaptor(1).double()
    torch.testing.assert_close(a1(v), torch.tanh(v / v.pow(2).mean(1, keepdim=True).sqrt()), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls", [jsigr_fast.JSIGR, jsigr_fast.JARN])
def test_update_schedule(cls):
    model, x, y = _setup()
    crit = _crit(cls, disc_every=3)
    disc_changed, apt_changed = [], []
    for _ in range(7):
        d0 = [p.detach().clone() for p in crit.discriminator.parameters()]
        a0 = [p.detach().clone() for p in crit.adaptor.parameters()]
        crit(model, x, y).backward()
        disc_changed.append(any(not torch.equal(a, p) for a, p in zip(d0, crit.discriminator.parameters())))
        apt_changed.append(any(not torch.equal(a, p) for a, p in zip(a0, crit.adaptor.parameters())))
    assert disc_changed == [True, False, False, True, False, False, True]  # every 3rd step, from the first
    assert all(apt_changed)
    assert crit.gan.steps == 7


@pytest.mark.parametrize("cls", [jsigr_fast.JSIGR, jsigr_fast.JARN])
def test_update_directions(cls):
    # Adaptor minimises L_adv, discriminator maximises it. On Adam's first step the update is
    # -lr * g / (|g| + eps), i.e. about lr * sign: check the signs against independently computed gradients.
    model, x, y = _setup("conv_tanh")
    crit = _crit(cls, disc_every=1, adaptor_lr=1e-3, disc_lr=1e-3)
    gen = torch.Generator().manual_seed(4)
    # replay what the criterion will see
    if cls is jsigr_fast.JSIGR:
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
        fake_in = batch_input_gradient(model, x + crit.eps * x.std(unbiased=False) * z, y)
        real = x
    else:
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
        real = x + (2 * u - 1) * crit.noise
        fake_in = batch_input_gradient(model, real, y)
    apt = copy.deepcopy(crit.adaptor)
    disc = copy.deepcopy(crit.discriminator)
    g_apt = torch.autograd.grad(F.logsigmoid(-disc(apt(fake_in))).mean(), list(apt.parameters()))
    fake = apt(fake_in).detach()
    l_adv = F.logsigmoid(disc(real)).mean() + F.logsigmoid(-disc(fake)).mean()
    g_disc = torch.autograd.grad(l_adv, list(disc.parameters()))

    crit(model, x, y, generator=gen)
    for p0, p1, g in zip(apt.parameters(), crit.adaptor.parameters(), g_apt):
        step = (p1 - p0).detach()
        sel = g.abs() > 1e-6
        assert torch.all(torch.sign(step[sel]) == -torch.sign(g[sel]))  # descent
    for p0, p1, g in zip(disc.parameters(), crit.discriminator.parameters(), g_disc):
        step = (p1 - p0).detach()
        sel = g.abs() > 1e-6
        assert torch.all(torch.sign(step[sel]) == torch.sign(g[sel]))  # ascent


@pytest.mark.parametrize("cls", [jsigr_fast.JSIGR, jsigr_fast.JARN])
def test_state_dict_resume_is_exact(cls):
    def run(model, crit, opt, steps, start):
        for s in range(start, start + steps):
            loss = crit(model, x, y, generator=torch.Generator().manual_seed(100 + s))
            opt.zero_grad()
            loss.backward()
            opt.step()

    model, x, y = _setup()
    crit = _crit(cls, disc_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run(model, crit, opt, 3, 0)
    saved = copy.deepcopy({"model": model.state_dict(), "crit": crit.state_dict(), "opt": opt.state_dict()})
    run(model, crit, opt, 4, 3)  # the uninterrupted run

    model2, _, _ = _setup()
    crit2 = _crit(cls, disc_every=2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    model2.load_state_dict(saved["model"])
    crit2.load_state_dict(saved["crit"])
    opt2.load_state_dict(saved["opt"])
    assert crit2.gan.steps == 3
    run(model2, crit2, opt2, 4, 3)  # the resumed run
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(crit.state_dict().items(), crit2.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k


def test_jarn_classifier_loss_matches_definition():
    model, x, y = _setup("conv_tanh")
    crit = _crit(jsigr_fast.JARN, lambda_adv=0.7).eval()
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(8), dtype=x.dtype)
    x_noisy = x + (2 * u - 1) * crit.noise
    J = batch_input_gradient(model, x_noisy, y)
    expect = F.cross_entropy(model(x_noisy), y) + 0.7 * F.logsigmoid(-crit.discriminator(crit.adaptor(J))).mean()
    got = crit(model, x, y, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["conv_tanh", "conv_bn_train"])
def test_jarn_parameter_gradient_matches_finite_differences(name):
    model, x, y = _setup(name)
    crit = _crit(jsigr_fast.JARN, generator_loss="nonsaturating").eval()
    params = list(model.parameters())
    direction = random_direction(params)

    def value():
        return crit(model, x, y, generator=torch.Generator().manual_seed(2))

    grads = torch.autograd.grad(value(), params, allow_unused=True)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)
    assert analytic == pytest.approx(directional_fd(value, params, direction), rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_jarn_running_stats_one_forward(backend):
    model, x, y = _setup()
    crit = _crit(jsigr_fast.JARN, noise=0.0, backend=backend)
    ref = copy.deepcopy(model)
    ref(x)
    crit(model, x, y).backward()
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        if backend == "reference" or not a.is_floating_point():
            assert torch.equal(a, b), k
        else:  # the fused backend's channels-last convolutions round differently (fused.CHANNELS_LAST)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=k)


def test_jsigr_running_stats_one_forward():
    model, x, y = _setup()
    crit = _crit(jsigr_fast.JSIGR, jacobian="hutchinson")
    ref = copy.deepcopy(model)
    ref(x)
    crit(model, x, y).backward()
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        if not a.is_floating_point():
            assert torch.equal(a, b), k
        else:  # channels-last convolutions (fused.CHANNELS_LAST) in the forward-mode pass too
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=k)


def test_state_dict_loads_with_weights_only(tmp_path):
    crit = _crit(jsigr_fast.JSIGR)
    model, x, y = _setup()
    crit(model, x, y).backward()
    path = tmp_path / "crit.pt"
    torch.save(crit.state_dict(), path)
    state = torch.load(path, weights_only=True)  # a checkpoint is untrusted input
    crit2 = _crit(jsigr_fast.JSIGR)
    crit2.load_state_dict(state)
    assert crit2.gan.steps == 1


@pytest.mark.skipif("fused" not in jsigr_fast.available_backends(), reason="fused backend not built")
@pytest.mark.parametrize("cls", [jsigr_fast.JSIGR, jsigr_fast.JARN])
@pytest.mark.parametrize("name", ["conv_bn_train", "residual_bn"])
def test_fused_backend_equals_reference_in_training(cls, name):
    # backend="fused" (the default when built) against "reference": the classifier's loss and
    # parameter gradients, and the adaptor/discriminator states after the step (float64)
    results = []
    for backend in ("reference", "fused"):
        model, x, y = _setup(name)
        torch.manual_seed(0)
        crit = _crit(cls, backend=backend, disc_every=1)
        loss = crit(model, x, y, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        tensors = {k: v.detach().clone() for k, v in crit.state_dict().items() if torch.is_tensor(v)}
        assert any("adaptor" in k for k in tensors) and any("disc" in k for k in tensors), list(tensors)
        results.append((loss.detach(), grads, tensors))
    (lr, gr, sr), (lf, gf, sf) = results
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=0)
    scale = max(g.abs().max().item() for g in gr)
    for a, b in zip(gr, gf):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12 * scale)
    for k in sr:
        if sr[k].is_floating_point():
            torch.testing.assert_close(sf[k], sr[k], rtol=1e-9, atol=1e-12, msg=k)
        else:
            assert torch.equal(sf[k], sr[k]), k
