"""Per-layer Jacobian norms: how strongly each layer's output responds to the input (J-SIGR Table 1, Fig. 4).

Definition
----------
For a layer ``l`` (by default every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` of the model) write
``h_l(x_n) in R^{P_l}`` for its output on sample ``n`` (all ``P_l`` output units, flattened) and
``J_{l,n} = d h_l(x_n) / d x_n in R^{P_l x D}`` for its Jacobian w.r.t. the model's input, ``D = C*H*W``.
We report, per layer::

    sq_fro          = mean_n ||J_{l,n}||_F^2               (the layer-wise "JN" of J-SIGR Table 1)
    sq_fro_per_unit = sq_fro / P_l = mean_n mean_u ||grad_x h_{l,u}(x_n)||^2

The second is comparable across layers of different sizes. For the last ``nn.Linear`` of a
classifier ``h`` is the logits and ``sq_fro`` is the model's ``mean_n ||J_n||_F^2`` of
:func:`jsigr_fast.jacobian_norm`. The papers do not define their per-layer normalisation; these two
are what we compute, nothing else.

Estimators
----------
* ``"hutchinson"`` (default): ``||J z||^2`` with ``z ~ N(0, I_D)`` is unbiased for ``||J||_F^2``
  (SPEC term 3, J-SIGR Eq. 6). ``J z`` is a **forward-mode** directional derivative, so one forward
  pass with a dual input gives ``J_{l,n} z_n`` for *every* layer at once: forward hooks read the
  tangent of each layer's output. ``n_proj`` passes are averaged; cost ``~ n_proj`` forwards (x3 for
  the tangents), no backward, no graph.
* ``"exact"``: the sum over the ``D`` basis directions ``e_d`` of ``||J e_d||^2`` — ``D`` forward-mode
  passes, each moving feature ``d`` of every sample at once, so it needs independent samples (refused
  under train-mode BatchNorm); an oracle for small inputs (8x8 digits: 64 passes).

Each sample gets its own ``z_n``. In eval mode samples are independent and the numbers are per-sample
Jacobians; a train-mode BatchNorm couples the batch and the quantity becomes ``(1/N) ||dH_l/dX||_F^2``
of the whole batch (cross-sample terms included, as in :func:`jsigr_fast.jacobian_norm`) — evaluate in
eval mode. BatchNorm running statistics are never updated. A layer called several times in one
forward contributes the sum over its calls (the Jacobian of the concatenated outputs).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from . import _checks
from ._progress import progress_bar
from .batchnorm import batch_coupled, frozen_running_stats
from .higher_order import safe_ops

__all__ = ["LayerJacobian", "layer_jacobian_norms", "default_layers", "LAYER_TYPES", "format_layer_markdown"]

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ESTIMATORS = ("hutchinson", "exact")


@dataclass(frozen=True)
class LayerJacobian:
    """One layer's row. ``sem``: standard error of ``sq_fro`` over the samples (the spread of the
    per-sample estimates / sqrt(N); for ``hutchinson`` it includes the projection noise)."""
    name: str
    kind: str
    units: int
    sq_fro: float
    sq_fro_per_unit: float
    sem: float
    n_samples: int
    estimator: str
    n_proj: int

    def as_dict(self) -> dict:
        return asdict(self)


def default_layers(model: nn.Module, types: Sequence[type] = LAYER_TYPES) -> list[str]:
    """Names (``model.named_modules()`` order) of the model's conv and linear layers."""
    return [name for name, m in model.named_modules() if isinstance(m, tuple(types)) and name]


def _resolve_layers(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    names = default_layers(model) if layers is None else list(layers)
    if not names:
        raise ValueError("the model has no conv or linear layer; pass layers=[module names]")
    unknown = [n for n in names if n not in modules or not n]
    if unknown:
        raise ValueError(f"unknown layer names {unknown}; the model's modules include "
                         f"{', '.join(default_layers(model)) or '(no conv/linear)'}")
    return {n: modules[n] for n in names}


def layer_jacobian_norms(model: nn.Module, x: torch.Tensor, n_proj: int = 8, *, estimator: str = "hutchinson",
                         layers: Iterable[str] | None = None, batch_size: int | None = None,
                         generator: torch.Generator | None = None, progress: bool = False,
                         desc: str = "Jacobian norms") -> list[LayerJacobian]:
    """Per-layer ``mean_n ||d h_l(x_n) / d x_n||_F^2`` (see the module docstring), one row per layer.

    Args:
        model: any ``nn.Module``; put it in eval mode first for per-sample numbers.
        x: ``(N, ...)`` floating inputs (pixels in [0, 1] for the zoo models).
        n_proj: Gaussian probes per sample for ``"hutchinson"`` (ignored by ``"exact"``).
        estimator: ``"hutchinson"`` (forward-mode, unbiased) or ``"exact"`` (D forward-mode passes).
        layers: module names (``model.named_modules()``); default every conv/linear layer.
        batch_size: samples per pass (None: all at once).
        generator: a ``torch.Generator`` for the probes (on x's device or the CPU).
        progress: a bar on stderr over the forward-mode passes (``"exact"`` takes D per batch), labelled ``desc``.

    Returns:
        A list of :class:`LayerJacobian`, in the order of ``layers``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _checks.check_input(x, model)
    _checks.check_choice("estimator", estimator, ESTIMATORS)
    n_proj = _checks.check_int("n_proj", n_proj)
    _checks.as_generator(generator, x.device)
    n = x.shape[0]
    batch_size = n if batch_size is None else _checks.check_int("batch_size", batch_size)
    model = _checks.unwrap_parallel(model)
    named = _resolve_layers(model, layers)
    if estimator == "exact" and batch_coupled(model):
        raise ValueError("estimator='exact' needs independent samples, but the model has BatchNorm layers using "
                         "batch statistics: call model.eval() first (or use estimator='hutchinson')")

    per_sample = {name: torch.zeros(n, dtype=torch.float64, device=x.device) for name in named}
    units = {name: 0 for name in named}
    current: dict[str, torch.Tensor] = {}
    calls: dict[str, list] = {}

    def make_hook(name):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor")
            tangent = fwAD.unpack_dual(output).tangent
            sq = (torch.zeros(output.shape[0], dtype=torch.float64, device=output.device) if tangent is None
                  else tangent.detach().flatten(1).double().pow(2).sum(1))
            current[name] = current.get(name, 0) + sq
            calls.setdefault(name, []).append(output[0].numel())
        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in named.items()]
    x0 = x.detach()
    d = x0[0].numel()
    passes = n_proj if estimator == "hutchinson" else d
    bar = progress_bar(-(-n // batch_size) * passes, progress, desc=desc, unit="pass")
    try:
        with torch.no_grad(), frozen_running_stats(model):
            for i in range(0, n, batch_size):
                xb = x0[i:i + batch_size]
                for p in range(passes):
                    if estimator == "hutchinson":
                        tangent = _checks.randn(xb.shape, like=xb, generator=generator)
                    else:
                        tangent = torch.zeros_like(xb).flatten(1)
                        tangent[:, p] = 1
                        tangent = tangent.view_as(xb)
                    current.clear()
                    calls.clear()
                    with safe_ops(forward_ad=True), fwAD.dual_level():  # SDPA has no native forward-mode rule
                        # a copy of the slice: make_dual aliases its primal, and an in-place first op
                        # of the model would write into the caller's x (_checks.private_input)
                        model(fwAD.make_dual(_checks.private_input(xb), tangent))
                    for name in named:
                        if name not in current:
                            raise ValueError(f"layer {name!r} was not called by the model's forward")
                        per_sample[name][i:i + batch_size] += current[name]
                        units[name] = sum(calls[name])
                    bar.update(1)
    finally:
        bar.close()
        for h in handles:
            h.remove()

    rows = []
    for name, module in named.items():
        v = per_sample[name] / (n_proj if estimator == "hutchinson" else 1)
        mean = float(v.mean())
        sem = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
        rows.append(LayerJacobian(name=name, kind=type(module).__name__, units=units[name], sq_fro=mean,
                                  sq_fro_per_unit=mean / units[name], sem=sem, n_samples=n,
                                  estimator=estimator, n_proj=n_proj if estimator == "hutchinson" else d))
    return rows


def format_layer_markdown(tables: dict[str, list[LayerJacobian]]) -> str:
    """Markdown with one row per layer and, per model, ``||J||_F^2`` and its per-unit value."""
    names = list(tables)
    if not names:
        return ""
    layers = [r.name for r in tables[names[0]]]
    head = "| layer | units | " + " | ".join(f"{m} ‖J‖²_F | {m} per unit" for m in names) + " |"
    sep = "|---|---:|" + "---:|---:|" * len(names)
    lines = [head, sep]
    by_model = {m: {r.name: r for r in rows} for m, rows in tables.items()}
    for layer in layers:
        first = by_model[names[0]][layer]
        cells = []
        for m in names:
            r = by_model[m].get(layer)
            cells += ["–", "–"] if r is None else [f"{r.sq_fro:.4g} ± {r.sem:.2g}", f"{r.sq_fro_per_unit:.4g}"]
        lines.append(f"| {layer} ({first.kind}) | {first.units} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
