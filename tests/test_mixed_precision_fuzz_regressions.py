"""Regressions found by a differential mixed-precision fuzz (fused vs reference under bf16/fp16
autocast, against float32/float64): the dtype of returned terms must not depend on the backend or on
the Jacobian estimator, and the values must match float64 oracles computed independently here."""
import pytest
import torch
import torch.nn as nn

import jsigr_fast
from jsigr_fast.testing import tiny_input, tiny_model

BACKENDS = jsigr_fast.available_backends()


def _labels(x):
    return torch.arange(x.shape[0]) % 4


# ----------------------------------------------------------------------------------------------
# mask_fraction: the share of penalised features, averaged in x's dtype in every backend
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_fraction_of_a_bfloat16_saliency_map_is_exact_and_in_x_dtype(backend):
    # a precomputed saliency map in bfloat16 for a float32 x: the reference used to average its float
    # mask in the map's dtype (bfloat16: 0.33984375 for 0.3379...), the fused backend in x's dtype
    model, x = tiny_model("conv_tanh", dtype=torch.float32), tiny_input("conv_tanh", n=3, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    M = torch.rand(x.shape, generator=g).to(torch.bfloat16)
    beta = 0.37
    oracle = (M.double() <= beta).double().mean().item()  # the mask's definition, 1[M <= beta]
    _, terms = jsigr_fast.loss(model, x, _labels(x), saliency=M, beta=beta, backend=backend, return_terms=True,
                               generator=torch.Generator().manual_seed(1))
    assert terms["mask_fraction"].dtype == x.dtype
    assert terms["mask_fraction"].item() == pytest.approx(oracle, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mask_fraction_under_autocast_same_dtype_in_both_backends(dtype):
    # a trained adaptor's map is computed in the autocast dtype: the fraction is still a count / D in x's dtype
    if "fused" not in BACKENDS:
        pytest.skip("fused backend unavailable")
    model, x = tiny_model("conv_bn_train", dtype=torch.float32), tiny_input("conv_bn_train", n=3, dtype=torch.float32)
    adaptor = jsigr_fast.SaliencyAdaptor(x.shape[1])
    total = x.numel()
    for backend in ("reference", "fused"):
        with torch.autocast("cpu", dtype=dtype):
            _, terms = jsigr_fast.loss(model, x, _labels(x), saliency=adaptor, beta=0.3, backend=backend,
                                       return_terms=True, generator=torch.Generator().manual_seed(2))
        frac = terms["mask_fraction"]
        assert frac.dtype == torch.float32, (backend, frac.dtype)
        count = frac.double().item() * total
        assert abs(count - round(count)) < 1e-3, (backend, frac.item())  # k / D, not rounded to 8 bits


# ----------------------------------------------------------------------------------------------
# Hutchinson: ||J z||^2 in the dtype the other estimators give (float32 under autocast)
# ----------------------------------------------------------------------------------------------
def _hutchinson_oracle(model, x, n_proj, seed):
    """mean_n (1/P) sum_p ||J_n z_p||^2 in float64 with torch.func.jvp, the probes drawn as documented
    (standard normal of x's shape and dtype, consecutively from the generator)."""
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(n_proj)]
    m64 = tiny_model("conv_tanh", dtype=torch.float64)
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    total = 0.0
    for z in zs:
        _, jz = torch.func.jvp(m64, (x.double(),), (z.double(),))
        total = total + jz.pow(2).sum(dim=1)
    return (total / n_proj).mean().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_proj", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hutchinson_jacobian_norm_under_autocast_is_float32_and_accurate(backend, n_proj, dtype):
    model, x = tiny_model("conv_tanh", dtype=torch.float32), tiny_input("conv_tanh", n=4, dtype=torch.float32)
    oracle = _hutchinson_oracle(model, x, n_proj, seed=7)
    with torch.autocast("cpu", dtype=dtype):
        hut = jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", n_proj=n_proj, backend=backend,
                                       generator=torch.Generator().manual_seed(7))
        proj = jsigr_fast.jacobian_norm(model, x, estimator="projection", backend=backend,
                                        generator=torch.Generator().manual_seed(7))
    assert hut.dtype == proj.dtype == torch.float32, (hut.dtype, proj.dtype)
    assert hut.item() == pytest.approx(oracle, rel=3e-2)
    (g,) = torch.autograd.grad(hut, [model[0][0].weight])
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_proj", [1, 3])
def test_hutchinson_terms_under_bfloat16_autocast_are_float32(backend, n_proj):
    # loss(): the fused backend carries the first probe on the training forward; jacobian_regularization
    # with squared=False takes a sqrt of the sum: every Jacobian term comes back in float32
    model, x = tiny_model("conv_bn_train", dtype=torch.float32), tiny_input("conv_bn_train", n=3, dtype=torch.float32)
    y = _labels(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = jsigr_fast.loss(model, x, y, jacobian="hutchinson", n_proj=n_proj, backend=backend,
                                   return_terms=True, generator=torch.Generator().manual_seed(3))
        _, jterms = jsigr_fast.jacobian_regularization(model, x, y, estimator="hutchinson", n_proj=n_proj,
                                                       squared=False, backend=backend, return_terms=True,
                                                       generator=torch.Generator().manual_seed(3))
    assert terms["jac"].dtype == torch.float32
    assert jterms["jac"].dtype == torch.float32


def test_hutchinson_in_a_bfloat16_model_stays_bfloat16():
    # no autocast, model and x in bfloat16: the estimator keeps x's dtype (nothing is silently widened)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 4)).bfloat16()
    x = tiny_input("conv_tanh", n=2, dtype=torch.bfloat16)
    for backend in BACKENDS:
        out = jsigr_fast.jacobian_norm(model, x, estimator="hutchinson", backend=backend,
                                       generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# interpretation_regularization: a sample whose class gradient J_c is identically zero (every ReLU
# off). The cosine to the target map is undefined there; F.cosine_similarity(eps=1e-12) returned 0
# with a gradient b / (eps ||b||) ~ 1e11, which overflowed float16 in the model's double backward
# (inf * 0 = NaN parameter gradients in both backends; a ReLU/max-pool conv net in the fuzz) and is
# 0 / 0 in a float16 model. The right parameter gradient is that of float64: J_c is 0 on a whole
# neighbourhood of the parameters, so that sample's cosine contributes nothing.
# ----------------------------------------------------------------------------------------------
def _dead_sample_mlp():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.copy_(0.2 + torch.rand(6, 4, generator=g))  # all positive
        model[0].bias.zero_()
        model[2].weight.copy_(torch.randn(3, 6, generator=g))
        model[2].bias.copy_(torch.randn(3, generator=g))
    x = torch.cat([-torch.ones(1, 4), 0.1 + torch.rand(3, 4, generator=g)])  # sample 0: every ReLU off
    y = torch.tensor([1, 0, 2, 1])
    targets = torch.randn(x.shape, generator=g)
    return model, x, y, targets


def _ir_oracle(model, x, y, targets, lambda_d=3.0, lambda_m=0.15):
    """Noack et al. Eq. 9 in float64 from the closed form of a Linear-ReLU-Linear net:
    J_c(x_n) = W1^T (1[W1 x_n + b1 > 0] * W2[y_n]); a sample with J_c = 0 adds cos 0 and ||J_c|| 0."""
    w1, b1, w2, b2 = (p.detach().double().requires_grad_(True) for p in model.parameters())
    xd, t = x.double(), targets.double()
    pre = xd @ w1.T + b1
    on = (pre > 0).double()
    ce = torch.nn.functional.cross_entropy(torch.relu(pre) @ w2.T + b2, y)
    cos, mag = [], []
    for n in range(x.shape[0]):
        if not on[n].any():
            cos.append(xd.new_zeros(()))
            mag.append(xd.new_zeros(()))
            continue
        j = (on[n] * w2[y[n]]) @ w1
        cos.append((j * t[n]).sum() / (j.norm() * t[n].norm()))
        mag.append(j.norm())
    cos, mag = torch.stack(cos).mean(), torch.stack(mag).mean()
    total = ce - lambda_d * cos + lambda_m * mag
    grads = torch.autograd.grad(total, [w1, b1, w2, b2])
    return total.item(), cos.item(), mag.item(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["autocast_fp16", "float16_model", "float64"])
def test_interpretation_regularization_with_an_all_zero_class_gradient(backend, how):
    model, x, y, targets = _dead_sample_mlp()
    total64, cos64, mag64, g64 = _ir_oracle(model, x, y, targets)
    if how == "float16_model":
        model, x, targets = model.half(), x.half(), targets.half()
    elif how == "float64":
        model, x, targets = model.double(), x.double(), targets.double()
    with torch.autocast("cpu", dtype=torch.float16, enabled=how == "autocast_fp16"):
        out, terms = jsigr_fast.interpretation_regularization(model, x, y, targets, backend=backend,
                                                              return_terms=True)
    grads = torch.autograd.grad(out, list(model.parameters()))
    for g in grads:
        assert torch.isfinite(g).all(), (how, backend)
    tol = 1e-10 if how == "float64" else 1e-2
    assert out.item() == pytest.approx(total64, rel=tol)
    assert terms["cos"].item() == pytest.approx(cos64, rel=tol, abs=tol)
    assert terms["mag"].item() == pytest.approx(mag64, rel=tol)
    err = sum((g.double() - e).pow(2).sum() for g, e in zip(grads, g64)).sqrt()
    scale = sum(e.pow(2).sum() for e in g64).sqrt()
    assert err <= tol * scale, (how, backend, err.item(), scale.item())


def test_cosine_rows_zero_row_has_value_and_gradient_zero():
    g = torch.Generator().manual_seed(0)
    a64 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    a64[1] = 0
    b64 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32, torch.float16):
        a = a64.to(dtype).requires_grad_(True)
        c = jsigr_fast.reference.cosine_rows(a, b64.to(dtype))
        assert c.dtype == dtype
        (ga,) = torch.autograd.grad(c.sum(), a)
        tol = 1e-12 if dtype == torch.float64 else 2e-3
        for n in (0, 2):  # rows with a defined cosine: value and gradient in closed form
            an, bn = a64[n], b64[n]
            cos = (an @ bn) / (an.norm() * bn.norm())
            grad = bn / (an.norm() * bn.norm()) - cos * an / an.norm() ** 2
            assert c[n].item() == pytest.approx(cos.item(), abs=tol)
            torch.testing.assert_close(ga[n].double(), grad, rtol=tol, atol=tol)
        assert c[1].item() == 0.0
        assert torch.equal(ga[1], torch.zeros_like(ga[1]))
