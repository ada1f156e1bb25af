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

``jsigr-fast visualize`` draws each run's mask as the run trained it: with its trained adaptor, the
run's ``mask_quantile`` or else its ``beta`` (from the checkpoint's config); with gradient saliency,
the run's ``mask_quantile`` (scale-free) or else β = 0.1, since the run's beta thresholds the adaptor's
tanh output, not M in [0, 1]. ``--beta`` / ``--quantile`` override it; it prints each model's rule.

Multi-channel maps are shown as their mean over channels (for the mask: the fraction of the
pixel's channels that are penalised). :func:`saliency_panels` returns the library's tensors and
:func:`display_arrays` exactly what is drawn, so both can be checked without looking at a PNG.
Every model sees the same noise ``z`` (the generator is reseeded with ``seed`` per model).

matplotlib (Agg backend) is imported only when a figure is drawn (or its file format checked).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ._atomic import write_atomic

__all__ = ["saliency_panels", "display_arrays", "figure_layout", "build_saliency_figure", "saliency_figure",
           "figure_format", "PANELS", "add_arguments", "run"]

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
                    beta: float | Mapping[str, float | None] | None = 0.1,
                    quantile: float | Mapping[str, float | None] | None = None,
                    saliency: Any = None, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors behind the figure, per model: ``input``, ``gradient`` (signed ∇ₓℓ at x),
    ``perturbed_gradient`` (ĝ), ``saliency`` (M) and ``mask``, all detached on the CPU, x's shape,
    ``beta`` (float), the threshold, and ``quantile`` (float or None; when set, the rule used instead).

    ``beta``: the mask threshold (a number, or per-model dict). ``None`` takes the adaptor's own
    default (a JSIGR criterion's ``beta``, 0.0 for a bare adaptor) and 0.1 for gradient saliency.
    ``quantile``: leave the top q fraction unpenalised instead (see :func:`jsigr_fast.selective_mask`);
    a number, or a per-model dict (None there: that model uses ``beta``).
    ``saliency``: None / ``"gradient"`` / JSIGR / SaliencyAdaptor / callable, or a dict per model name.
    Models run in their current mode (use eval mode); BatchNorm running statistics do not move.
    Raises ValueError for ``eps`` not finite and >= 0, a ``beta`` not finite, a ``quantile`` outside [0, 1].
    """
    from .saliency import perturbed_input_gradient, selective_mask

    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty dict {name: nn.Module}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x must be a batch of 1- or 3-channel images (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    for name in models:
        b = beta.get(name) if isinstance(beta, Mapping) else beta
        q = quantile.get(name) if isinstance(quantile, Mapping) else quantile
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b)):
            raise ValueError(f"beta for {name!r} must be a finite number or None, got {b!r}")
        if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1):
            raise ValueError(f"quantile for {name!r} must be a number in [0, 1] or None, got {q!r}")
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
        q = quantile.get(name) if isinstance(quantile, Mapping) else quantile
        g = perturbed_input_gradient(model, xm, ym, eps=0.0)
        g_hat = perturbed_input_gradient(model, xm, ym, eps=eps, generator=torch.Generator(device="cpu").manual_seed(seed))
        with torch.no_grad():
            M = fn(g_hat, xm)
        if not isinstance(M, torch.Tensor) or M.shape != xm.shape:
            raise ValueError(f"the saliency of {name!r} must be a tensor of x's shape {tuple(xm.shape)}")
        mask = selective_mask(M, beta=b, quantile=q)
        out[name] = {"input": xm.cpu(), "gradient": g.cpu(), "perturbed_gradient": g_hat.cpu(),
                     "saliency": M.detach().cpu(), "mask": mask.cpu(), "beta": float(b),
                     "quantile": None if q is None else float(q)}
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
        q = panels[name].get("quantile")
        rule = f"top {q:g} kept" if q is not None else f"β={beta:g}"
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
                 f"{name}\n{rule}, {100 * frac:.0f}% penalised", fontsize=8, va="center", ha="left")
        axes.append(row)
    if title:
        fig.text(0.5, 1 - 0.12 / H, title, fontsize=9, ha="center", va="top")
    return fig, axes


def figure_format(path: str, arg: str = "path") -> str:
    """The matplotlib ``savefig`` format that ``path``'s extension names (lower-cased: ``.pdf`` -> ``"pdf"``,
    ``.JPG`` -> ``"jpg"``); ``"png"`` for a path without one. ValueError naming ``arg`` and listing the
    extensions matplotlib's Agg canvas can write (``get_supported_filetypes()``: png, pdf, svg, jpg, ...)
    for any other extension. Imports matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ext = os.path.splitext(os.fspath(path))[1]
    fmt = ext[1:].lower()
    if not fmt:  # no extension (or a bare trailing dot): PNG, as it always was
        return "png"
    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"{arg} {path}: matplotlib cannot write {ext} files; the extension picks the format, "
                         f"one of {', '.join('.' + e for e in sorted(supported))} (no extension: PNG)")
    if fmt == "pgf":  # the PGF backend measures every text with LaTeX: without it savefig fails at the end
        import shutil

        import matplotlib

        tex = matplotlib.rcParams["pgf.texsystem"]
        if shutil.which(tex) is None:
            raise ValueError(f"{arg} {path}: writing .pgf needs {tex} (rcParams['pgf.texsystem']), which is not "
                             "installed; use .pdf or .svg for a vector figure")
    return fmt


def saliency_figure(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *, path: str,
                    eps: float = 0.3, beta: float | Mapping[str, float | None] | None = 0.1,
                    quantile: float | Mapping[str, float | None] | None = None, saliency: Any = None,
                    seed: int = 0, panel_inches: float = 1.2, dpi: int = 100) -> str:
    """Write the grid of :func:`build_saliency_figure` for ``models`` on the images ``x`` (labels
    ``y``) to ``path`` (folders created) and return ``path``. Arguments as in :func:`saliency_panels`.
    ``path``'s extension picks the format (:func:`figure_format`: ``.png``, ``.pdf``, ``.svg``, ``.jpg``,
    ... -- whatever matplotlib can write; PNG without an extension); an extension it cannot write is a
    ValueError raised before any gradient is computed.
    The file is written to a temporary file beside ``path`` and renamed over it: a failed or interrupted
    write leaves an existing file at ``path`` as it was."""
    fmt = figure_format(path)  # before the models run: a typo in the extension costs nothing
    panels = saliency_panels(models, x, y, eps=eps, beta=beta, quantile=quantile, saliency=saliency, seed=seed)
    if isinstance(quantile, Mapping):
        rule = "white = penalised; each row's rule on its left"
    else:
        rule = "top " + format(quantile, "g") + " kept" if quantile is not None else "M ≤ β penalised"
    title = f"input gradients, saliency of the gradient at x + {eps:g}·σ·z, and the selective mask ({rule})"
    fig, _ = build_saliency_figure(panels, panel_inches=panel_inches, dpi=dpi, title=title)
    # folders created; a failed or interrupted write (disk full, Ctrl-C) leaves an existing file as it was
    return write_atomic(path, lambda f: fig.savefig(f, dpi=dpi, format=fmt))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .evaluate import add_common_arguments

    add_common_arguments(p)
    p.add_argument("--n-images", type=int, default=4, help="test images to show (the first N)")
    p.add_argument("--eps", type=float, default=0.3, help="saliency perturbation scale, x std(x) (paper: 0.3)")
    p.add_argument("--beta", type=float, default=None,
                   help="mask threshold in [-1, 1] (the saliency's range; >= 0 for gradient saliency, which is in "
                        "[0, 1]). Default: the run's beta with its trained adaptor, else 0.1 for gradient saliency "
                        "(0.0 for an adaptor from a checkpoint without a config)")
    p.add_argument("--quantile", type=float, default=None,
                   help="leave the top q fraction in [0, 1] unpenalised instead of --beta. Default: the run's "
                        "mask_quantile, when it trained with one")
    p.add_argument("--saliency", choices=("auto", "gradient", "adaptor"), default="auto",
                   help="auto: a checkpoint's trained adaptor when it holds one, else gradient saliency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/saliency.png",
                   help="the figure's file; its extension picks the format: .png, .pdf, .svg, .jpg, ... (any that "
                        "matplotlib can write; PNG without an extension)")


def _config_number(lm, key: str, low: float, high: float, optional: bool):
    """The run's config value ``key`` (a checkpoint is untrusted input: checked, with its path)."""
    v = lm.config.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise ValueError(f"checkpoint {lm.path}: the run's config key {key!r} must be a number in [{low:g}, "
                         f"{high:g}]{' or null' if optional else ''}, got {v!r}")
    return float(v)


def _mask_rule(name: str, lm, use_adaptor: bool, args) -> tuple[float | None, float | None, str]:
    """``(beta, quantile, where from)`` for one model. Flags win; then the run's own setting: its
    mask_quantile (scale-free, so it means the same for gradient saliency), or its beta, which
    thresholds its adaptor's tanh output and so is taken only with that adaptor; then the defaults."""
    if args.quantile is not None:
        return None, args.quantile, "--quantile"
    if args.beta is not None:
        if args.beta < 0 and not use_adaptor:
            raise ValueError(f"--beta {args.beta:g} penalises nothing: gradient saliency M is in [0, 1] "
                             f"(model {name!r}); use a beta in [0, 1], or --quantile")
        return args.beta, None, "--beta"
    if lm.config.get("method", "jsigr") == "jsigr" and ("beta" in lm.config or "mask_quantile" in lm.config):
        q = _config_number(lm, "mask_quantile", 0.0, 1.0, optional=True)
        b = _config_number(lm, "beta", -1.0, 1.0, optional=False) if "beta" in lm.config else None
        if q is not None:
            return None, q, "the run's mask_quantile"
        if b is not None and use_adaptor:
            return b, None, "the run's beta"
    if use_adaptor:
        return 0.0, None, "default for an adaptor: the tanh midpoint"
    return 0.1, None, "default for gradient saliency"


def _check_args(args) -> None:
    from .evaluate import check_device, check_positive

    check_positive(args, "n_images")
    if not (math.isfinite(args.eps) and args.eps >= 0):
        raise ValueError(f"--eps must be a finite number >= 0, got {args.eps:g}")
    if args.quantile is not None and not 0 <= args.quantile <= 1:  # also refuses nan
        raise ValueError(f"--quantile must be a number in [0, 1], got {args.quantile:g}")
    if args.beta is not None and not -1 <= args.beta <= 1:
        raise ValueError(f"--beta must be a number in [-1, 1] (the saliency's range), got {args.beta:g}")
    if args.beta is not None and args.quantile is not None:
        raise ValueError("give --beta or --quantile, not both (a quantile replaces the threshold)")
    # --out is the figure file itself; a folder, or an extension matplotlib cannot write, would only fail
    # in savefig, after the models ran, as a traceback.
    if os.path.isdir(args.out) or args.out.endswith(("/", os.sep)):
        raise ValueError(f"--out must be a PNG file path (or .pdf, .svg, ...: the extension picks the format; "
                         f"e.g. {os.path.join(args.out, 'saliency.png')}), got the folder {args.out}")
    figure_format(args.out, "--out")
    check_device(args.device)


def _check_data(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, dataset) -> None:
    """The data against the models, before any gradient is taken: 1- or 3-channel images, and one
    forward per model (input shape, label range, as ``jsigr-fast eval`` checks them); a mismatch would
    otherwise surface as a traceback from inside the model."""
    from .evaluate import _check_shapes

    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"dataset {dataset!r} gives images of shape {tuple(x.shape[1:])}; visualize draws "
                         "1- or 3-channel images (C, H, W)")
    try:
        _check_shapes(models, x, y)
    except ValueError as err:
        raise ValueError(f"{err} (dataset {dataset!r}; --dataset / --dataset-kwargs choose the data)") from None


def run(args) -> int:
    from .evaluate import load_eval_data, load_models

    try:
        _check_args(args)
        loaded, dataset, dataset_kwargs = load_models(args)
        x, y = load_eval_data(dataset, args.data_root, limit=args.n_images, dataset_kwargs=dataset_kwargs,
                              device=args.device)
        _check_data({n: lm.model for n, lm in loaded.items()}, x, y, dataset)
        saliency, beta, quantile, notes = {}, {}, {}, []
        for name, lm in loaded.items():
            if args.saliency == "adaptor" and lm.adaptor is None:
                raise ValueError(f"--saliency adaptor: checkpoint {lm.path} holds no trained saliency adaptor")
            use = lm.adaptor is not None and args.saliency != "gradient"
            if use and getattr(lm.adaptor, "channels", x.shape[1]) != x.shape[1]:
                raise ValueError(f"checkpoint {lm.path}: its saliency adaptor is for {lm.adaptor.channels}-channel "
                                 f"gradients but the {dataset} images have {x.shape[1]} channels "
                                 "(--saliency gradient draws without it)")
            saliency[name] = lm.adaptor.to(args.device) if use else None
            beta[name], quantile[name], source = _mask_rule(name, lm, use, args)
            rule = (f"leaves the top {quantile[name]:g} unpenalised" if quantile[name] is not None
                    else f"1[M ≤ β] at β={beta[name]:g}")
            kind = "the run's adaptor" if use else "gradient"
            notes.append(f"  {name}: {kind} saliency, mask {rule} ({source})")
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"jsigr-fast visualize: error: {err}", file=sys.stderr)
        return 2
    models = {n: lm.model for n, lm in loaded.items()}
    try:
        path = saliency_figure(models, x, y, path=args.out, eps=args.eps, beta=beta, quantile=quantile,
                               saliency=saliency, seed=args.seed)
    except OSError as err:  # e.g. a parent of --out is a file, or not writable: one line, not a traceback
        print(f"jsigr-fast visualize: error: --out {args.out}: cannot write the {figure_format(args.out).upper()}: "
              f"{err}", file=sys.stderr)
        return 2
    except ValueError as err:  # e.g. Agg's image-size limit for a huge --n-images; --out is left as it was
        print(f"jsigr-fast visualize: error: cannot draw the figure: {err}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.abspath(path)} ({len(models)} models x {x.shape[0]} images of {dataset})")
    print("\n".join(notes))
    return 0
