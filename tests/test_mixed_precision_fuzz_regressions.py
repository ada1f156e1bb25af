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
