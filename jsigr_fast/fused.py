"""The ``backend="fused"`` implementations: same signatures and results as :mod:`jsigr_fast.reference`.

Each function here must return what its namesake in :mod:`jsigr_fast.reference` returns (values
and parameter gradients; float64 to ~1e-10), only faster. Today the only compiled piece is the
masked squared-norm reduction (csrc/masked_sq_norm.cpp); the fused BatchNorm double backward,
batched VJPs and forward-mode kernels plug in here.
"""
from __future__ import annotations

from . import ops, reference


def _sq_norm(g, mask):
    return ops.masked_sq_norm(g, mask, compiled=True)


def jsigr(model, x, y, **kw):
    kw.setdefault("sq_norm", _sq_norm)
    return reference.jsigr(model, x, y, **kw)


def input_gradient_penalty(model, x, y, **kw):
    kw.setdefault("sq_norm", _sq_norm)
    return reference.input_gradient_penalty(model, x, y, **kw)


def jacobian_norm(model, x, **kw):
    return reference.jacobian_norm(model, x, **kw)
