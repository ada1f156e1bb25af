"""``jsigr-fast visualize``: input gradients, J-SIGR saliency maps and selective masks, model by model.

The picture of J-SIGR Figs. 6-7: one row per model (e.g. standard / PGD-AT / J-SIGR), and for each
test image four panels:

=============  ==================================================================================
``input``      the image ``x`` (grey for 1 channel, RGB for 3)
``|gradient|`` ``|g|`` with ``g = ∇_x ℓ(x)``, the per-sample input gradient of the CE at the clean input
               (:func:`jsigr_fast.perturbed_input_gradient` with ``eps=0``)
``saliency``   ``M = f(ĝ)``, ``ĝ = ∇ ℓ(x + eps·σ·z)`` the gradient at the perturbed input
               (:func:`jsigr_fast.perturbed_input_gradient`); ``f`` = :func:`jsigr_fast.gradient_saliency`
               by default, or a trained adaptor (a :class:`jsigr_fast.SaliencyAdaptor` or the
               adaptor of a :class:`jsigr_fast.JSIGR` criterion)
``mask``       ``m = 1[M <= beta]`` (:func:`jsigr_fast.selective_mask`): white = penalised by R_sig
=============  ==================================================================================

Multi-channel maps are shown as their mean over channels (for the mask: the fraction of the
pixel's channels that are penalised). :func:`saliency_panels` returns the library's tensors and
:func:`display_arrays` exactly what is drawn, so both can be checked without looking at a PNG.
Every model sees the same noise ``z`` (the generator is reseeded with ``seed`` per model).

matplotlib (Agg backend) is imported only when a figure is drawn.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["saliency_panels", "display_arrays", "figure_layout", "build_saliency_figure", "saliency_figure",
           "PANELS", "add_arguments", "run"]

PANELS = ("input", "gradient", "saliency", "mask")
_TITLES = {"input": "input", "gradient": "|∇ₓℓ|", "saliency": "saliency M", "mask": "mask 1[M≤β]"}
_CMAPS = {"gradient": "inferno", "saliency": "viridis", "mask": "gray"}


def _saliency_fn(spec, name: str):
    """Resolve one model's saliency spec to ``(fn(g_hat, x) -> M, default beta or None)``."""
    from .jsigr import JSIGR
    from .saliency import SaliencyAdaptor, gradient_saliency

    if isinstance(spec, Mapping):
        spec = spec.get(name)
    if spec is None or (isinstance(spec, str) and spec == "gradient"):
        return gradient_saliency, None
    if isinstance(spec, JSIGR):
        adaptor = spec.adaptor
        return (lambda g, x: adaptor(g)), spec.beta
    if isinstance(spec, SaliencyAdaptor):
        return (lambda g, x: spec(g)), 0.0
    if callable(spec):
        return spec, None
    raise TypeError(f"saliency for {name!r} must be None, 'gradient', a JSIGR, a SaliencyAdaptor or a callable "
                    f"(g_hat, x) -> M; got {type(spec).__name__}")


def saliency_panels(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3,
                    beta: float | Mapping[str, float] | None = 0.1, quantile: float | None = None,
                    saliency: Any = None, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors behind the figure, per model: ``input``, ``gradient`` (signed ∇ₓℓ at x),
    ``perturbed_gradient`` (ĝ), ``saliency`` (M) and ``mask``, all detached on the CPU, x's shape, and
    ``beta`` (float), the threshold used.

    ``beta``: the mask threshold (a number, or per-model dict). ``None`` takes the adaptor's own
    default (a JSIGR criterion's ``beta``, 0.0 for a bare adaptor) and 0.1 for gradient saliency.
    ``quantile``: leave the top q fraction unpenalised instead (see :func:`jsigr_fast.selective_mask`).
    ``saliency``: None / ``"gradient"`` / JSIGR / SaliencyAdaptor / callable, or a dict per model name.
    Models run in their current mode (use eval mode); BatchNorm running statistics do not move.
    """
    from .saliency import perturbed_input_gradient, selective_mask

    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty dict {name: nn.Module}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x must be a batch of 1- or 3-channel images (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    out = {}
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{name!r}] must be an nn.Module, got {type(model).__name__}")
        dev = next((p.device for p in model.parameters()), x.device)
        xm, ym = x.detach().to(dev), y.to(dev)
        fn, own_beta = _saliency_fn(saliency, name)
        b = beta.get(name) if isinstance(beta, Mapping) else beta
        if b is None:
            b = 0.1 if own_beta is None else own_beta
        g = perturbed_input_gradient(model, xm, ym, eps=0.0)
        g_hat = perturbed_input_gradient(model, xm, ym, eps=eps, generator=torch.Generator(device="cpu").manual_seed(seed))
        with torch.no_grad():
            M = fn(g_hat, xm)
        if not isinstance(M, torch.Tensor) or M.shape != xm.shape:
            raise ValueError(f"the saliency of {name!r} must be a tensor of x's shape {tuple(xm.shape)}")
        mask = selective_mask(M, beta=b, quantile=quantile)
        out[name] = {"input": xm.cpu(), "gradient": g.cpu(), "perturbed_gradient": g_hat.cpu(),
                     "saliency": M.detach().cpu(), "mask": mask.cpu(), "beta": float(b)}
    return out


def display_arrays(panels: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What is drawn for one model: numpy arrays ``(N, H, W)`` (``(N, H, W, 3)`` for an RGB input).
    ``input``: the image (channels last for RGB); ``gradient``: channel mean of ``|g|``;
    ``saliency``: channel mean of M; ``mask``: channel mean of the mask."""
    x = panels["input"].float()
    img = x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
    return {"input": img.clamp(0, 1).numpy(),
            "gradient": panels["gradient"].float().abs().mean(1).numpy(),
            "saliency": panels["saliency"].float().mean(1).numpy(),
            "mask": panels["mask"].float().mean(1).numpy()}


def figure_layout(n_models: int, n_images: int, *, panel_inches: float = 1.2, left_inches: float = 1.4,
                  top_inches: float = 0.5, dpi: int = 100) -> dict:
    """Rows, columns, figure size (inches) and the PNG's pixel size ``(height, width)``."""
    ncols = n_images * len(PANELS)
    w = left_inches + ncols * panel_inches
    h = top_inches + n_models * panel_inches
    return {"nrows": n_models, "ncols": ncols, "figsize": (w, h), "dpi": dpi,
            "pixels": (int(round(h * dpi)), int(round(w * dpi))),
            "panel_inches": panel_inches, "left_inches": left_inches, "top_inches": top_inches}


def build_saliency_figure(panels: Mapping[str, Mapping[str, torch.Tensor]], *, panel_inches: float = 1.2,
                          dpi: int = 100, title: str | None = None):
    """A matplotlib Figure (Agg, not shown) of :func:`saliency_panels`'s output: rows = models,
    columns = (input, |gradient|, saliency, mask) for each image. Returns ``(fig, axes)`` with
    ``axes[row][col]``. Each map panel has its own colour scale (the mask's is fixed to [0, 1])."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot, no global backend switch
    from matplotlib.figure import Figure

    names = list(panels)
    n_images = next(iter(panels.values()))["input"].shape[0]
    lay = figure_layout(len(names), n_images, panel_inches=panel_inches, dpi=dpi)
    fig = Figure(figsize=lay["figsize"], dpi=dpi)
    FigureCanvasAgg(fig)
    W, H = lay["figsize"]
    pad = 0.04 * panel_inches
    axes = []
    for r, name in enumerate(names):
        arrays = display_arrays(panels[name])
        beta = float(panels[name].get("beta", float("nan")))
        frac = float(panels[name]["mask"].float().mean())
        row = []
        for i in range(n_images):
            for j, kind in enumerate(PANELS):
                c = i * len(PANELS) + j
                x0 = lay["left_inches"] + c * panel_inches + pad
                y0 = H - lay["top_inches"] - (r + 1) * panel_inches + pad
                ax = fig.add_axes((x0 / W, y0 / H, (panel_inches - 2 * pad) / W, (panel_inches - 2 * pad) / H))
                a = arrays[kind][i]
                if kind == "input":
                    ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
                elif kind == "mask":
                    ax.imshow(a, cmap=_CMAPS[kind], vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(a, cmap=_CMAPS[kind], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(_TITLES[kind] + (f" #{i}" if kind == "input" else ""), fontsize=7)
                row.append(ax)
        fig.text(0.1 / W, 1 - (lay["top_inches"] + (r + 0.5) * panel_inches) / H,
                 f"{name}\nβ={beta:g}, {100 * frac:.0f}% penalised", fontsize=8, va="center", ha="left")
        axes.append(row)
    if title:
        fig.text(0.5, 1 - 0.12 / H, title, fontsize=9, ha="center", va="top")
    return fig, axes


def saliency_figure(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *, path: str,
                    eps: float = 0.3, beta: float | None = 0.1, quantile: float | None = None, saliency: Any = None,
                    seed: int = 0, panel_inches: float = 1.2, dpi: int = 100) -> str:
    """Write the PNG grid of :func:`build_saliency_figure` for ``models`` on the images ``x`` (labels
    ``y``) to ``path`` (folders created) and return ``path``. Arguments as in :func:`saliency_panels`."""
    panels = saliency_panels(models, x, y, eps=eps, beta=beta, quantile=quantile, saliency=saliency, seed=seed)
    title = (f"input gradients, saliency of the gradient at x + {eps:g}·σ·z, and the selective mask "
             f"({'top ' + format(quantile, 'g') + ' kept' if quantile is not None else 'M ≤ β penalised'})")
    fig, _ = build_saliency_figure(panels, panel_inches=panel_inches, dpi=dpi, title=title)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .evaluate import add_common_arguments

    add_common_arguments(p)
    p.add_argument("--n-images", type=int, default=4, help="test images to show (the first N)")
    p.add_argument("--eps", type=float, default=0.3, help="saliency perturbation scale, x std(x) (paper: 0.3)")
    p.add_argument("--beta", type=float, default=None,
                   help="mask threshold; default 0.1 for gradient saliency, the adaptor's for a trained one (0.0)")
    p.add_argument("--quantile", type=float, default=None, help="leave the top q fraction unpenalised instead")
    p.add_argument("--saliency", choices=("auto", "gradient", "adaptor"), default="auto",
                   help="auto: a checkpoint's trained adaptor when it holds one, else gradient saliency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/saliency.png", help="PNG path")


def run(args) -> int:
    from .evaluate import load_eval_data, load_models

    try:
        if args.n_images < 1:
            raise ValueError("--n-images must be >= 1")
        loaded, dataset, dataset_kwargs = load_models(args)
        x, y = load_eval_data(dataset, args.data_root, limit=args.n_images, dataset_kwargs=dataset_kwargs,
                              device=args.device)
        saliency = {}
        for name, lm in loaded.items():
            if args.saliency == "adaptor" and lm.adaptor is None:
                raise ValueError(f"--saliency adaptor: checkpoint {lm.path} holds no trained saliency adaptor")
            use = lm.adaptor is not None and args.saliency != "gradient"
            saliency[name] = lm.adaptor.to(args.device) if use else None
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"jsigr-fast visualize: error: {err}", file=sys.stderr)
        return 2
    models = {n: lm.model for n, lm in loaded.items()}
    path = saliency_figure(models, x, y, path=args.out, eps=args.eps, beta=args.beta, quantile=args.quantile,
                           saliency=saliency, seed=args.seed)
    print(f"wrote {os.path.abspath(path)} ({len(models)} models x {x.shape[0]} images of {dataset})")
    return 0
