"""jsigr_fast._function.LeanFunction: Function.apply without the per-call signature binding, and the same
results as torch.autograd.Function everywhere (plain autograd, double backward, torch.func transforms)."""
from __future__ import annotations

import inspect

import pytest
import torch

from jsigr_fast._function import LeanFunction


def _cube_parts():
    """forward x**3 * s, backward 3 x**2 s g (differentiable, so double backward works too)."""
    def forward(x, s):
        return x ** 3 * s

    def setup_context(ctx, inputs, output):
        x, s = inputs
        ctx.save_for_backward(x)
        ctx.s = s

    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * ctx.s * g, None

    return dict(forward=staticmethod(forward), setup_context=staticmethod(setup_context),
                backward=staticmethod(backward), generate_vmap_rule=True)


Lean = type("Lean", (LeanFunction,), _cube_parts())
Plain = type("Plain", (torch.autograd.Function,), _cube_parts())


def test_same_values_and_derivatives_as_a_plain_function():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for fn in (Lean, Plain):
        y = fn.apply(x, 2.0)
        torch.testing.assert_close(y, 2 * x.detach() ** 3, rtol=0, atol=0)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        torch.testing.assert_close(g, 6 * x.detach() ** 2, rtol=1e-14, atol=0)
        (gg,) = torch.autograd.grad(g.sum(), x)  # the backward is differentiable: 12 x
        torch.testing.assert_close(gg, 12 * x.detach(), rtol=1e-14, atol=0)
    assert torch.autograd.gradcheck(lambda t: Lean.apply(t, 0.5), (x,))


def test_apply_skips_the_signature_binding(monkeypatch):
    # the point of the class: no inspect.signature per call outside transforms (a plain Function binds)
    def refuse(*a, **k):
        raise AssertionError("inspect.signature called")

    monkeypatch.setattr(inspect, "signature", refuse)
    x = torch.randn(3, requires_grad=True)
    Lean.apply(x, 1.0).sum().backward()
    torch.testing.assert_close(x.grad, 3 * x.detach() ** 2)
    with pytest.raises(AssertionError, match="inspect.signature called"):
        Plain.apply(x, 1.0)


def test_transforms_and_keywords_take_function_apply():
    # inside torch.func transforms the full protocol runs (the generated vmap rule, the jvp of the backward)
    x = torch.randn(4, 3, dtype=torch.float64)
    got = torch.func.vmap(lambda t: Lean.apply(t, 2.0))(x)
    torch.testing.assert_close(got, 2 * x ** 3, rtol=0, atol=0)
    (jac,) = torch.func.jacrev(lambda t: Lean.apply(t, 1.0), argnums=(0,))(x[0])
    torch.testing.assert_close(jac, torch.diag(3 * x[0] ** 2), rtol=1e-14, atol=0)
    # a keyword argument is bound to forward's signature, as Function.apply binds it
    torch.testing.assert_close(Lean.apply(x, s=2.0), 2 * x ** 3, rtol=0, atol=0)
