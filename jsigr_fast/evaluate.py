"""``jsigr-fast eval``: robustness tables for trained checkpoints, and the library functions beneath it.

What it reports (all on the first ``--limit`` images of a dataset's test split, models in eval mode):

* **accuracy** under ``clean`` and each attack (default: FGSM and PGD at the papers' budget for the
  dataset), as ``mean ± std`` over ``--seeds``: the seeds drive the attacks' random starts (PGD);
  deterministic attacks (clean, FGSM, MI/NI-FGSM, ABI-FGM) are run once and shown without ``±``.
  The std is the sample standard deviation (n - 1 in the denominator). Columns are labelled by
  attack, steps, eps, norm, restarts and a missing random start (``PGD-20 (ε=8/255)``); attacks that
  differ only in their step size get ``α=`` as well (:func:`attack_labels`), and the same attack
  requested twice is an error.
* **transfer** (``--transfer``): for every ordered pair of models, the examples crafted on the
  source (row) scored by the target (column) — J-SIGR Table 2's protocol, the diagonal is white-box.
* **per-layer Jacobian norms** (``--jacobian-layers``): ``mean_n ||d h_l(x_n)/d x_n||_F^2`` for every
  conv/linear layer ``l`` (J-SIGR Table 1 / Fig. 4), see :mod:`jsigr_fast.jacobian_layers`.
* **rho_adv** (``--rho-adv``): DeepFool's ``mean ||delta||_2 / ||x||_2`` over the flipped samples
  (Jakubovitz & Giryes), with the number flipped.

Library API (the CLI is a thin layer over it)::

    models = {"standard": m1, "jsigr": m2}
    attacks = [parse_attack("clean"), parse_attack("fgsm:eps=8/255"), parse_attack("pgd:eps=8/255,steps=20")]
    rows = robustness_table(models, x, y, attacks, seeds=[0, 1, 2], transfer=True)
    print(format_markdown(rows)); write_csv(rows, "acc.csv"); rows == read_csv("acc.csv")
    layers = layer_jacobian_norms(models["jsigr"], x[:256], n_proj=8)      # [LayerJacobian(name, sq_fro, ...)]
    rho = rho_adv_table(models, x)                                         # [RhoRow(model, rho, n_success, n_total)]
    lm = load_checkpoint("runs/cifar10-jsigr/last.pt"); x, y = load_eval_data(lm.dataset, limit=1000)

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)`` (tensors,
numbers, strings and containers only; no code runs). Accepted layouts:

* ``jsigr-fast train``'s checkpoints (``jsigr_fast.train.checkpoint``): ``{"format": ..., "arch": {"model":
  name, "kwargs": {...}}, "config": {"dataset": ..., "data_root": ..., "method": ..., ...}, "model":
  state_dict, "method": {"criterion": JSIGR/JARN state}, ...}``: the model is rebuilt from ``arch``, the
  data from the config, and a trained saliency adaptor is picked up from the criterion's state;
* ``{"model": state_dict, "config": {"model": name, "model_kwargs": {...}, "dataset": name, ...}}``
  (``config["model"]`` may also be ``{"name": ..., "kwargs": {...}}``; ``"state_dict"`` is accepted for
  ``"model"``);
* a bare ``state_dict`` (e.g. ``jsigr-fast demo``'s files): ``--model NAME [--model-kwargs JSON]
  --dataset NAME`` say what it is.

Explicit flags override the checkpoint (with a warning when they differ). ``module.`` (DDP) and
``_orig_mod.`` (``torch.compile``) prefixes are stripped.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ._progress import progress_bar
from .jacobian_layers import LayerJacobian, format_layer_markdown, layer_jacobian_norms

__all__ = [
    "AttackSpec", "Row", "LoadedModel", "parse_attack", "attack_labels", "default_attacks", "craft", "robustness_table",
    "rho_adv_table", "mean_std", "format_mean_std", "format_markdown", "format_rho_markdown",
    "write_csv", "read_csv", "load_checkpoint", "load_eval_data", "build_model", "DATASET_BUDGETS",
    "layer_jacobian_norms", "format_layer_markdown", "LayerJacobian",
    "add_arguments", "run",
]

# (eps, PGD steps, PGD step size or None for pgd's 2.5 * eps / steps) per dataset, in [0, 1] pixels:
# MNIST 0.3 / 40 (Madry; J-SIGR), CIFAR-10 8/255 / 20 at 2/255 (JARN's PGD-20), ImageNet 16/255 / 10
# (SPEC), digits 0.1 / 20 (the demo's), synthetic as CIFAR-10 with 10 steps.
DATASET_BUDGETS = {
    "mnist": (0.3, 40, None),
    "digits": (0.1, 20, None),
    "cifar10": (8 / 255, 20, 2 / 255),
    "imagenet": (16 / 255, 10, None),
    "imagefolder": (16 / 255, 10, None),
    "synthetic": (8 / 255, 10, None),
}
ATTACK_NAMES = ("clean", "fgsm", "pgd", "mi_fgsm", "ni_fgsm", "abi_fgm")
_ITERATIVE = ("pgd", "mi_fgsm", "ni_fgsm", "abi_fgm")
# The spec options each attack reads (what :func:`craft` passes on to jsigr_fast.attacks).
ATTACK_OPTIONS = {"clean": (), "fgsm": ("eps",),
                  "pgd": ("eps", "steps", "alpha", "norm", "restarts", "random_start"),
                  **{n: ("eps", "steps", "alpha") for n in ("mi_fgsm", "ni_fgsm", "abi_fgm")}}
_DISPLAY = {"clean": "clean", "fgsm": "FGSM", "pgd": "PGD", "mi_fgsm": "MI-FGSM", "ni_fgsm": "NI-FGSM",
            "abi_fgm": "ABI-FGM"}


# ----------------------------------------------------------------------------------------------
# attacks
# ----------------------------------------------------------------------------------------------
def _fmt_eps(eps: float) -> str:
    """8/255 for multiples of 1/255, else the shortest decimal."""
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-6 and round(k) != 255:
        return f"{round(k)}/255"
    return f"{eps:g}"


def _parse_number(text: str) -> float:
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a number: {text!r} (write e.g. 0.03 or 8/255)") from None


@dataclass(frozen=True)
class AttackSpec:
    """One column of the robustness table. ``name`` in :data:`ATTACK_NAMES`; ``steps``/``alpha``
    apply to the iterative attacks (``alpha=None``: the attack's default); ``norm``, ``restarts`` and
    ``random_start`` to PGD only."""
    name: str
    eps: float = 0.0
    steps: int = 10
    alpha: float | None = None
    norm: str = "linf"
    restarts: int = 1
    random_start: bool = True

    def __post_init__(self):
        if self.name not in ATTACK_NAMES:
            raise ValueError(f"unknown attack {self.name!r}; choose one of {', '.join(ATTACK_NAMES)}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"attack {self.name}: eps must be a finite number >= 0, got {self.eps!r}")
        if self.name != "clean" and self.eps == 0:
            raise ValueError(f"attack {self.name}: eps must be > 0")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"attack {self.name}: steps must be an int >= 1, got {self.steps!r}")
        if self.norm not in ("linf", "l2") or (self.norm == "l2" and self.name != "pgd"):
            raise ValueError(f"attack {self.name}: norm must be 'linf' (or 'l2' for pgd), got {self.norm!r}")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise ValueError(f"attack {self.name}: restarts must be an int >= 1, got {self.restarts!r}")
        if self.alpha is not None:
            if self.name not in _ITERATIVE:
                raise ValueError(f"attack {self.name}: alpha applies to the iterative attacks only "
                                 f"({', '.join(_ITERATIVE)})")
            if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
                raise ValueError(f"attack {self.name}: alpha must be a finite number > 0, got {self.alpha!r}")
        # options another attack would silently ignore are refused, so every column is what it says
        if self.name != "pgd" and (self.restarts != 1 or not self.random_start):
            raise ValueError(f"attack {self.name}: restarts and random_start apply to pgd only")
        if self.restarts > 1 and not self.random_start:
            raise ValueError(f"attack pgd: restarts={self.restarts} needs the random start: without it every restart "
                             "starts from x and finds the same example (drop random_start=0, or use restarts=1)")

    @property
    def stochastic(self) -> bool:
        """Whether the result depends on the seed (PGD's random start)."""
        return self.name == "pgd" and self.random_start

    @property
    def step_size(self) -> float | None:
        """The step the attack takes: ``alpha``, or the attack's default
        (:func:`jsigr_fast.attacks.default_alpha`); None for clean and FGSM."""
        from .attacks import default_alpha

        if self.name not in _ITERATIVE:
            return None
        return self.alpha if self.alpha is not None else default_alpha(self.name, self.eps, self.steps)

    @property
    def key(self) -> tuple:
        """What the attack does: two specs with equal keys craft the same examples. Fields the attack
        does not read (FGSM's steps) are left out; eps and the step size count to 10 digits."""
        if self.name == "clean":
            return ("clean",)
        key = (self.name, _sig(self.eps))
        if self.name in _ITERATIVE:
            key += (self.steps, _sig(self.step_size))
        if self.name == "pgd":
            key += (self.norm, self.restarts, self.random_start)
        return key

    @property
    def label(self) -> str:
        """The column name, e.g. ``PGD-20 (ε=8/255)``; :func:`attack_labels` adds the step size where
        two requested attacks differ only in it."""
        return self.describe()

    def describe(self, *, step_size: bool = False, digits: int | None = None) -> str:
        """:attr:`label`, with the step size (``α=``) if asked, and numbers to ``digits``
        significant digits instead of the short form (8/255, 0.3) if given."""
        if self.name == "clean":
            return "clean"
        num = _fmt_eps if digits is None else (lambda v: f"{v:.{digits}g}")
        base = _DISPLAY[self.name] + (f"-{self.steps}" if self.name in _ITERATIVE else "")
        extra = [f"ε={num(self.eps)}"]
        if step_size and self.step_size is not None:
            extra.append(f"α={num(self.step_size)}")
        if self.norm == "l2":
            extra.append("ℓ2")
        if self.restarts > 1:
            extra.append(f"{self.restarts} restarts")
        if self.name == "pgd" and not self.random_start:  # deterministic PGD: a different attack, always said
            extra.append("no random start")
        return f"{base} ({', '.join(extra)})"


def _sig(v: float) -> float:
    return float(f"{v:.10g}")


def attack_labels(specs: Sequence[AttackSpec], sources: Sequence[str] | None = None) -> list[str]:
    """One distinct column label per attack (the keys of the table rows, the CSV and the JSON).

    Each attack gets its :attr:`~AttackSpec.label`; attacks that would share one (they differ only
    in the step size, which the label leaves out) get ``α=`` added, and full precision if even
    that does not tell them apart, so no column overwrites another while the usual labels stay as
    they are. Two attacks that craft the same examples (equal :attr:`~AttackSpec.key`) are refused
    with a ValueError rather than computed twice: ``sources`` (e.g. the spec strings) name them.
    """
    names = [repr(str(n)) for n in sources] if sources is not None else [f"#{i + 1}" for i in range(len(specs))]
    first: dict[tuple, int] = {}
    for i, s in enumerate(specs):
        j = first.setdefault(s.key, i)
        if j != i:
            raise ValueError(f"{'' if sources is not None else 'attacks '}{names[j]} and {names[i]} are the same "
                             f"attack ({s.describe(step_size=True)}); list each attack once")
    labels = [s.label for s in specs]
    for rule in ({"step_size": True}, {"step_size": True, "digits": 10}):
        shared = {lab for lab in labels if labels.count(lab) > 1}
        if not shared:
            break
        labels = [s.describe(**rule) if lab in shared else lab for s, lab in zip(specs, labels)]
    return labels


def parse_attack(spec: str, *, eps: float | None = None, steps: int | None = None,
                 alpha: float | None = None) -> AttackSpec:
    """``"pgd:eps=8/255,steps=20,alpha=2/255,norm=l2,restarts=2,random_start=0"`` -> AttackSpec.

    Options missing from ``spec`` take the keyword defaults given here (``eps``, ``steps``,
    ``alpha``: usually the dataset's :data:`DATASET_BUDGETS`). Numbers may be fractions (8/255).
    Each attack takes only the options it uses (:data:`ATTACK_OPTIONS`) and refuses others written
    in ``spec`` (``"clean:eps=8/255"``, ``"fgsm:eps=0.1,steps=3"``); the keyword defaults apply where
    the attack uses them and are dropped where it does not (eps for clean, steps for FGSM).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"attack spec must be a non-empty string like 'pgd:eps=8/255,steps=20', got {spec!r}")
    name, _, opts = spec.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r} in {spec!r}; choose one of {', '.join(ATTACK_NAMES)}")
    takes = ATTACK_OPTIONS[name]
    kw: dict = {}
    if eps is not None and "eps" in takes:
        kw["eps"] = float(eps)
    if steps is not None and "steps" in takes:
        kw["steps"] = int(steps)
    # alpha: the dataset's PGD step; the momentum attacks keep their own default (eps / steps)
    if alpha is not None and name == "pgd":
        kw["alpha"] = float(alpha)
    unused = []  # options written in the spec that this attack would not read
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"attack option {item!r} in {spec!r} is not key=value")
        if key not in ATTACK_OPTIONS["pgd"]:  # pgd takes every option there is
            raise ValueError(f"unknown attack option {key!r} in {spec!r}; options: {', '.join(ATTACK_OPTIONS['pgd'])}")
        if key not in takes:
            unused.append(item)
            continue
        if key in ("eps", "alpha"):
            kw[key] = _parse_number(value)
        elif key in ("steps", "restarts"):
            try:
                kw[key] = int(value)
            except ValueError:
                raise ValueError(f"attack option {key} must be an integer, got {value!r}") from None
        elif key == "norm":
            kw["norm"] = value.strip()
        elif key == "random_start":
            kw["random_start"] = value.strip().lower() not in ("0", "false", "no")
    if unused:
        # An ignored option would label the column with something the attack did not do (and make
        # fgsm:steps=3 a silent duplicate of fgsm), so it is refused, naming what the attack takes.
        what = f"takes only {', '.join(takes)}" if takes else "takes no options"
        raise ValueError(f"attack {name!r} {what}, got {', '.join(unused)} in {spec!r}")
    if name != "clean" and "eps" not in kw:
        raise ValueError(f"attack {spec!r} needs eps= (no dataset default given)")
    return AttackSpec(name, **kw)


def default_attacks(dataset: str | None) -> list[AttackSpec]:
    """clean, FGSM and PGD at the dataset's budget (:data:`DATASET_BUDGETS`)."""
    eps, steps, alpha = DATASET_BUDGETS.get((dataset or "").lower(), DATASET_BUDGETS["cifar10"])
    return [AttackSpec("clean"), AttackSpec("fgsm", eps=eps), AttackSpec("pgd", eps=eps, steps=steps, alpha=alpha)]


def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, *,
          generator: torch.Generator | None = None, batch_size: int | None = None, on_batch=None) -> torch.Tensor:
    """Adversarial examples for ``spec`` against ``model`` (``x`` itself for ``clean``), crafted in
    chunks of ``batch_size`` (the generator's stream runs on across chunks). ``on_batch(k)`` is
    called after each chunk of ``k`` images (a progress bar's ``update``)."""
    from . import attacks as A

    if spec.name == "clean":
        return x.detach()
    n = x.shape[0]
    bs = n if batch_size is None else batch_size
    out = []
    for i in range(0, n, bs):
        xi, yi = x[i:i + bs], y[i:i + bs]
        if spec.name == "fgsm":
            xa = A.fgsm(model, xi, yi, spec.eps)
        elif spec.name == "pgd":
            xa = A.pgd(model, xi, yi, spec.eps, alpha=spec.alpha, steps=spec.steps, norm=spec.norm,
                       random_start=spec.random_start, restarts=spec.restarts, generator=generator)
        else:
            xa = A.ATTACKS[spec.name](model, xi, yi, spec.eps, steps=spec.steps, alpha=spec.alpha)
        out.append(xa)
        if on_batch is not None:
            on_batch(xi.shape[0])
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def format_mean_std(values: Sequence[float], *, percent: bool = True, digits: int = 1) -> str:
    """``"60.0 ± 10.0"`` for ``[0.5, 0.6, 0.7]`` (percent); one value prints without ``±``."""
    m, s = mean_std(values)
    k = 100.0 if percent else 1.0
    if len(values) == 1:
        return f"{m * k:.{digits}f}"
    return f"{m * k:.{digits}f} ± {s * k:.{digits}f}"


@dataclass(frozen=True)
class Row:
    """Accuracy of ``target`` on ``attack``'s examples crafted against ``source`` (``table`` is
    ``"robustness"`` when source == target, ``"transfer"`` otherwise), one value per seed."""
    table: str
    source: str
    target: str
    attack: str
    eps: float
    values: tuple[float, ...]
    seeds: tuple[int, ...] = ()

    @property
    def mean(self) -> float:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float:
        return mean_std(self.values)[1]

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(values=list(self.values), seeds=list(self.seeds), mean=self.mean, std=self.std)
        return d


def _check_models(models) -> dict[str, nn.Module]:
    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty dict {name: nn.Module}")
    for k, m in models.items():
        if not isinstance(k, str) or not isinstance(m, nn.Module):
            raise TypeError(f"models must map names (str) to nn.Module, got {k!r}: {type(m).__name__}")
    return dict(models)


def robustness_table(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                     attacks: Iterable[AttackSpec | str], seeds: Sequence[int] = (0,), *, transfer: bool = False,
                     batch_size: int = 256, progress: bool = False) -> list[Row]:
    """Accuracy of every model under every attack, one value per seed.

    Models are used in their current mode (put them in eval mode first). For each attack, seed
    and source model the examples are crafted once (seed ``s`` gives the attack a fresh CPU
    ``torch.Generator().manual_seed(s)``), then scored by the source itself (a ``"robustness"`` row)
    and, with ``transfer=True``, by every other model (``"transfer"`` rows). Deterministic attacks
    run once (one value, whatever the seeds). Strings in ``attacks`` go through :func:`parse_attack`.
    ``progress=True`` shows a bar on stderr over the images crafted (attack, seed and model in its label).
    """
    from .attacks import accuracy

    models = _check_models(models)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    specs = [parse_attack(a) if isinstance(a, str) else a for a in attacks]
    for s in specs:
        if not isinstance(s, AttackSpec):
            raise TypeError(f"attacks must be AttackSpec or spec strings, got {type(s).__name__}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    labels = attack_labels(specs)
    crafted = sum((len(seeds) if s.stochastic else 1) * len(models) * x.shape[0] for s in specs if s.name != "clean")
    bar = progress_bar(crafted, progress, desc="attacks", unit="img")
    rows = []
    for spec, label in zip(specs, labels):
        run_seeds = seeds if spec.stochastic else seeds[:1]
        acc: dict[tuple[str, str], list[float]] = {}
        for seed in run_seeds:
            for src, ms in models.items():
                gen = torch.Generator().manual_seed(seed)
                if spec.name != "clean":
                    bar.set_description(f"{label} on {src}" + (f", seed {seed}" if spec.stochastic else ""))
                x_adv = craft(ms, x, y, spec, generator=gen, batch_size=batch_size, on_batch=bar.update)
                targets = models.items() if transfer and spec.name != "clean" else [(src, ms)]
                for tgt, mt in targets:
                    acc.setdefault((src, tgt), []).append(accuracy(mt, x_adv, y, batch_size=batch_size))
        for (src, tgt), vals in acc.items():
            rows.append(Row("robustness" if src == tgt else "transfer", src, tgt, label, spec.eps,
                            tuple(vals), tuple(run_seeds)))
    bar.close()
    return rows


def format_markdown(rows: Sequence[Row], *, percent: bool = True) -> str:
    """White-box rows as one table (models x attacks); transfer rows as one matrix per attack
    (rows: the source the examples were crafted on; columns: the target model scored; the diagonal
    is the white-box accuracy). Accuracies in percent, ``mean ± std`` over seeds."""
    out = []
    wb = [r for r in rows if r.table == "robustness"]
    if wb:
        models = list(dict.fromkeys(r.source for r in wb))
        attacks = list(dict.fromkeys(r.attack for r in wb))
        cell = {(r.source, r.attack): r for r in wb}
        out += ["| model | " + " | ".join(attacks) + " |", "|---|" + "---:|" * len(attacks)]
        for m in models:
            cells = [format_mean_std(cell[m, a].values, percent=percent) if (m, a) in cell else "–" for a in attacks]
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    tr = [r for r in rows if r.table == "transfer"]
    for attack in dict.fromkeys(r.attack for r in tr):
        both = [r for r in rows if r.attack == attack]
        models = list(dict.fromkeys([r.source for r in both] + [r.target for r in both]))
        cell = {(r.source, r.target): r for r in both}
        out += ["", f"Transfer, {attack}: accuracy of the column model on examples crafted against the row model",
                "", "| crafted on ↓ / scored by → | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        for s in models:
            cells = [format_mean_std(cell[s, t].values, percent=percent) if (s, t) in cell else "–" for t in models]
            out.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(out)


_CSV_FIELDS = ("table", "source", "target", "attack", "eps", "n", "mean", "std", "values", "seeds")


def write_csv(rows: Sequence[Row], path: str) -> str:
    """One line per row: ``table, source, target, attack, eps, n, mean, std, values, seeds`` (values
    and seeds ``;``-separated, full precision). :func:`read_csv` reads it back to equal rows."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_CSV_FIELDS)
        for r in rows:
            w.writerow([r.table, r.source, r.target, r.attack, repr(float(r.eps)), len(r.values), repr(r.mean),
                        repr(r.std), ";".join(repr(float(v)) for v in r.values), ";".join(str(s) for s in r.seeds)])
    return path


def read_csv(path: str) -> list[Row]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != _CSV_FIELDS:
            raise ValueError(f"{path}: not an accuracy CSV written by write_csv (columns {reader.fieldnames})")
        return [Row(d["table"], d["source"], d["target"], d["attack"], float(d["eps"]),
                    tuple(float(v) for v in d["values"].split(";") if v),
                    tuple(int(s) for s in d["seeds"].split(";") if s)) for d in reader]


@dataclass(frozen=True)
class RhoRow:
    model: str
    rho: float
    n_success: int
    n_total: int


def rho_adv_table(models: Mapping[str, nn.Module], x: torch.Tensor, *, batch_size: int = 256,
                  progress: bool = False, **deepfool_kwargs) -> list[RhoRow]:
    """DeepFool's ``rho_adv`` per model (:func:`jsigr_fast.attacks.rho_adv`), over all of ``x`` in
    chunks; the mean is over the flipped samples, whose number is reported. ``progress=True``: a
    bar on stderr."""
    from .attacks import rho_adv

    models = _check_models(models)
    bar = progress_bar(len(models) * x.shape[0], progress, desc="DeepFool", unit="img")
    out = []
    for name, m in models.items():
        bar.set_description(f"DeepFool on {name}")
        ratios = []
        for i in range(0, x.shape[0], batch_size):
            ratios.append(rho_adv(m, x[i:i + batch_size], **deepfool_kwargs).ratios)
            bar.update(ratios[-1].numel())
        r = torch.cat(ratios)
        ok = ~torch.isnan(r)
        n_ok = int(ok.sum())
        out.append(RhoRow(name, float(r[ok].mean()) if n_ok else math.nan, n_ok, int(r.numel())))
    bar.close()
    return out


def format_rho_markdown(rows: Sequence[RhoRow]) -> str:
    lines = ["| model | ρ_adv (DeepFool) | flipped |", "|---|---:|---:|"]
    lines += [f"| {r.model} | {r.rho:.4g} | {r.n_success}/{r.n_total} |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# checkpoints and data
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, with what was learnt about it."""
    model: nn.Module
    arch: str
    dataset: str | None
    model_kwargs: dict = field(default_factory=dict)
    dataset_kwargs: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    path: str = ""
    adaptor: nn.Module | None = None  # a trained J-SIGR saliency adaptor, if the checkpoint holds one
    data_root: str | None = None  # the training run's data folder, if recorded


def build_model(arch: str, dataset: str | None = None, model_kwargs: Mapping | None = None,
                dataset_kwargs: Mapping | None = None) -> nn.Module:
    """``get_model(arch, ...)`` with classes / channels (and normalisation statistics where known)
    taken from ``dataset``; ``model_kwargs`` win."""
    from .data import dataset_info
    from .models import DATASET_STATS, get_model

    kw = dict(model_kwargs or {})
    if dataset is not None and dataset.lower() in DATASET_STATS:
        return get_model(arch, dataset=dataset.lower(), **kw)
    if dataset is not None:
        shape, classes = dataset_info(dataset, **dict(dataset_kwargs or {}))
        if classes is not None:
            kw.setdefault("num_classes", classes)
        kw.setdefault("in_channels", shape[0])
    return get_model(arch, **kw)


def _strip_prefixes(state: Mapping) -> dict:
    out = {}
    for k, v in state.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _find_adaptor(obj: Mapping, depth: int = 3):
    """A saliency adaptor's weights anywhere in the checkpoint outside the classifier (e.g. a J-SIGR
    criterion's state under ``["method"]["criterion"]``): keys ending in ``adaptor.conv.weight`` / ``.bias``."""
    from .saliency import SaliencyAdaptor

    for key, value in obj.items():
        if key == "model" or not isinstance(value, Mapping):
            continue
        w = next((k for k in value if isinstance(k, str) and k.endswith("adaptor.conv.weight")), None)
        if w is None:
            found = _find_adaptor(value, depth - 1) if depth > 1 else None
            if found is not None:
                return found
            continue
        prefix = w[: -len("conv.weight")]
        weight, bias = value[w], value.get(prefix + "conv.bias")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or not isinstance(bias, torch.Tensor):
            continue
        adaptor = SaliencyAdaptor(int(weight.shape[0]))
        adaptor.load_state_dict({"conv.weight": weight, "conv.bias": bias})
        return adaptor.eval()
    return None


def _kwargs_field(value, path: str, field: str) -> dict:
    """A constructor-arguments entry of a checkpoint (``field`` names it for the message): absent
    (None) or a mapping, copied. Checked here because ``dict(...)`` of a list, a string or a number
    fails with a TypeError that names neither the file nor the entry, or turns pairs into a dict."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(f"checkpoint {path!r}: {field} must be a dict of keyword arguments, got "
                         f"{type(value).__name__} {shown}")
    return dict(value)


def load_checkpoint(path: str, *, model: str | None = None, dataset: str | None = None,
                    model_kwargs: Mapping | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a model from ``path`` (see the module docstring for the accepted layouts).

    Raises:
        TypeError: ``model_kwargs`` is neither None nor a mapping.
        FileNotFoundError: no such file.
        ValueError: not loadable with ``weights_only=True``, an unknown layout, a config entry of the
            wrong type (``model_kwargs`` that is not a dict, ...), no model name, or weights that do
            not fit the named architecture (the message lists the mismatches).
    """
    from .models import get_model

    # checked before the file is read: a caller's mistake, whatever the checkpoint holds
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a mapping of constructor arguments (or None), got "
                        f"{type(model_kwargs).__name__} {model_kwargs!r:.60}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (objects outside the allow-list), corrupt archives, ...
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = [ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln]
        first = (why or lines or [type(err).__name__])[0]
        raise ValueError(f"checkpoint {path!r} cannot be read with torch.load(weights_only=True): {first}. "
                         "Only tensors, numbers, strings and containers are loaded from checkpoints "
                         "(save model.state_dict(), not the model object)") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state_dict or a training "
                         "checkpoint dict")
    config: dict = {}
    if isinstance(obj.get("model"), Mapping):
        state, config = obj["model"], obj.get("config") or {}
    elif isinstance(obj.get("state_dict"), Mapping):
        state, config = obj["state_dict"], obj.get("config") or {}
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise ValueError(f"checkpoint {path!r}: expected a state_dict (names -> tensors) or "
                         "{'model': state_dict, 'config': {...}}; got a dict with keys "
                         f"{sorted(map(str, obj))[:10]}")
    if not isinstance(config, Mapping):
        raise ValueError(f"checkpoint {path!r}: 'config' must be a dict, got {type(config).__name__}")
    config = dict(config)

    arch_rec = obj.get("arch") if isinstance(obj.get("arch"), Mapping) else None
    if arch_rec is not None and isinstance(arch_rec.get("model"), str):  # jsigr-fast train: exact constructor args
        cfg_model, cfg_kwargs = arch_rec["model"], _kwargs_field(arch_rec.get("kwargs"), path, "arch['kwargs']")
    else:
        cfg_model = config.get("model")
        # both are checked, so a malformed one is reported even where the other would be used
        kw_given = _kwargs_field(config.get("model_kwargs"), path, "config['model_kwargs']")
        args_given = _kwargs_field(config.get("model_args"), path, "config['model_args']")
        cfg_kwargs = kw_given or args_given
        if isinstance(cfg_model, Mapping):
            cfg_kwargs = {**_kwargs_field(cfg_model.get("kwargs"), path, "config['model']['kwargs']"), **cfg_kwargs}
            cfg_model = cfg_model.get("name")
    cfg_dataset = config.get("dataset")
    if isinstance(cfg_dataset, Mapping):
        cfg_dataset = cfg_dataset.get("name")
    dataset_kwargs = _kwargs_field(config.get("dataset_kwargs"), path, "config['dataset_kwargs']")
    if config.get("synthetic") and cfg_dataset:  # trained on random images of the dataset's shape
        cfg_dataset = "synthetic"
    for flag, cfg, what in ((model, cfg_model, "model"), (dataset, cfg_dataset, "dataset")):
        if flag is not None and cfg is not None and str(flag).lower() != str(cfg).lower():
            warnings.warn(f"{path}: --{what} {flag} overrides the checkpoint's {what} {cfg}", stacklevel=2)
    arch = model if model is not None else cfg_model
    ds = dataset if dataset is not None else cfg_dataset
    if not arch:
        raise ValueError(f"checkpoint {path!r} has no config naming its model (a bare state_dict?): "
                         "pass --model NAME [--model-kwargs JSON] and --dataset NAME")
    kwargs = {**cfg_kwargs, **dict(model_kwargs or {})}
    exact = arch_rec is not None and model is None  # arch holds every constructor argument
    try:
        net = get_model(str(arch), **kwargs) if exact else build_model(str(arch), ds, kwargs, dataset_kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {path!r}: cannot build model {arch!r} for dataset {ds!r}: {err}") from None
    state = _strip_prefixes(state)
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        msg = " ".join(str(err).split())
        raise ValueError(f"checkpoint {path!r}: the weights do not fit {arch}({kwargs}): {msg[:600]}") from None
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r}: the weights do not fit {arch}({kwargs}): missing keys "
                         f"{list(missing)[:8]}, unexpected keys {list(unexpected)[:8]}")
    if ds == "synthetic" and not dataset_kwargs and hasattr(net, "input_shape"):
        with torch.no_grad():
            classes = int(net.eval()(torch.zeros(1, *net.input_shape)).shape[1])
        dataset_kwargs = {"shape": list(net.input_shape), "num_classes": classes}
    return LoadedModel(model=net.to(device).eval(), arch=str(arch), dataset=ds, model_kwargs=kwargs,
                       dataset_kwargs=dataset_kwargs, config=config, path=path, adaptor=_find_adaptor(obj),
                       data_root=config.get("data_root") if isinstance(config.get("data_root"), str) else None)


def load_eval_data(dataset: str, root: str | None = None, *, limit: int | None = None,
                   dataset_kwargs: Mapping | None = None, device: str | torch.device = "cpu"):
    """The first ``limit`` images of ``dataset``'s test split (standard eval transform), stacked:
    ``(x float (N, C, H, W) in [0, 1], y long (N,))``."""
    from .data import build_dataset

    if not dataset:
        raise ValueError("no dataset: pass --dataset NAME (or use training checkpoints whose config names one)")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    ds = build_dataset(dataset, root, train=False, **dict(dataset_kwargs or {}))
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise ValueError(f"dataset {dataset!r} has no test images")
    xs, ys = zip(*(ds[i] for i in range(n)))
    return torch.stack(xs).to(device), torch.tensor(ys, dtype=torch.long).to(device)


def _unique_names(paths: Sequence[str], names: str | None) -> list[str]:
    """``--names`` if given; else the file stems, or ``<folder>/<stem>`` when stems collide (run
    folders all holding ``last.pt``), numbered if even those collide."""
    if names:
        out = [s.strip() for s in names.split(",")]
        if len(out) != len(paths):
            raise ValueError(f"--names gives {len(out)} names for {len(paths)} checkpoints")
        if len(set(out)) != len(out):
            raise ValueError(f"--names must be unique, got {out}")
        return out
    stems = [os.path.splitext(os.path.basename(p))[0] or "model" for p in paths]
    if len(set(stems)) < len(stems):
        stems = [f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}/{s}" for p, s in zip(paths, stems)]
    out, seen = [], {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}_{seen[s]}")
    return out


def _json_arg(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} must be a JSON object, e.g. '{{\"activation\": \"gelu\"}}': {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def load_models(args) -> tuple[dict[str, LoadedModel], str | None, dict]:
    """Checkpoints named on the command line -> ({name: LoadedModel}, dataset, dataset_kwargs); all
    must agree on the dataset."""
    kwargs = _json_arg(getattr(args, "model_kwargs", None), "--model-kwargs")
    names = _unique_names(args.checkpoints, getattr(args, "names", None))
    loaded = {n: load_checkpoint(p, model=args.model, dataset=args.dataset, model_kwargs=kwargs, device=args.device)
              for n, p in zip(names, args.checkpoints)}
    datasets = {(lm.dataset or "").lower() for lm in loaded.values()}
    if len(datasets) > 1:
        raise ValueError(f"the checkpoints were trained on different datasets {sorted(datasets)}: pass --dataset")
    first = next(iter(loaded.values()))
    dataset = args.dataset or first.dataset
    dataset_kwargs = _json_arg(getattr(args, "dataset_kwargs", None), "--dataset-kwargs") or first.dataset_kwargs
    if getattr(args, "data_root", None) is None:
        args.data_root = first.data_root
    return loaded, dataset, dataset_kwargs


def _check_shapes(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward on one image per model, so a model/data mismatch fails here with a clear message."""
    for name, m in models.items():
        try:
            with torch.no_grad():
                out = m(x[:1])
        except RuntimeError as err:
            msg = " ".join(str(err).split())[:300]
            raise ValueError(f"model {name!r} cannot take the data's images of shape {tuple(x.shape[1:])}: {msg}") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError(f"model {name!r} must return (N, K) logits")
        if int(y.max()) >= out.shape[1]:
            raise ValueError(f"model {name!r} has {out.shape[1]} outputs but the data has labels up to {int(y.max())}")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _number_arg(text: str) -> float:
    """argparse type for --eps: 0.03 or 8/255, with the parser's own one-line error otherwise."""
    try:
        return _parse_number(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _bool_arg(text: str) -> bool:
    """argparse type for true/false flags, as the train CLI spells them."""
    from .train.config import _FALSE, _TRUE  # the same spellings as every train flag

    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def check_device(spec: str, flag: str = "--device") -> str:
    """``spec`` if this machine has that device, else a ValueError naming ``flag`` (checked before
    anything is loaded: a missing GPU would otherwise surface as a traceback from ``.to()``)."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {spec!r} is not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {spec}: CUDA is not available on this machine (use {flag} cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as err:  # noqa: BLE001 - any backend's refusal is the same user error
            raise ValueError(f"{flag} {spec}: not usable on this machine: {str(err).splitlines()[0]}") from None
    return spec


def check_positive(args, *names: str) -> None:
    """Each of these integer flags, when given, is >= 1."""
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v}")


def _check_args(args) -> None:
    """The flags' own ranges, before any checkpoint is read (each error names its flag)."""
    check_positive(args, "batch_size", "limit", "n_proj", "jacobian_limit", "deepfool_max_iter", "steps")
    if args.eps is not None and not (math.isfinite(args.eps) and args.eps > 0):
        raise ValueError(f"--eps must be a finite number > 0, got {args.eps:g}")
    if len(set(args.seeds)) != len(args.seeds):  # a repeated seed would shrink the reported std
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")
    check_device(args.device)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Checkpoint / model / data flags shared with ``jsigr-fast visualize``."""
    p.add_argument("checkpoints", nargs="+", help="model checkpoints (state_dict or training checkpoint)")
    p.add_argument("--names", help="comma-separated display names, one per checkpoint (default: file stems)")
    p.add_argument("--model", help="architecture (jsigr_fast.models.list_models()); needed for bare state_dicts")
    p.add_argument("--model-kwargs", help="JSON object of constructor arguments, e.g. '{\"activation\": \"gelu\"}'")
    p.add_argument("--dataset", help="dataset name (jsigr_fast.data.DATASETS); default: the checkpoint's")
    p.add_argument("--dataset-kwargs", help="JSON object passed to build_dataset (e.g. synthetic shape)")
    p.add_argument("--data-root", help="data directory (mnist, cifar10, imagenet, imagefolder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--limit", type=int, help="evaluate the first N test images (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--attack", action="extend", nargs="+", metavar="SPEC",
                   help="attacks to tabulate (several per flag, or repeat the flag): clean, fgsm, pgd, mi_fgsm, "
                        "ni_fgsm, abi_fgm with options, "
                        "e.g. 'pgd:eps=8/255,steps=20,alpha=2/255'. Default: clean, fgsm, pgd at the dataset's budget. "
                        "Attacks that differ only in alpha get it in their column label (α=...); the same attack "
                        "given twice is an error")
    p.add_argument("--eps", type=_number_arg, help="default eps of the attacks (e.g. 8/255); default per dataset")
    p.add_argument("--steps", type=int, help="default steps of the iterative attacks; default per dataset")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="attack seeds (PGD random starts): mean ± std")
    p.add_argument("--transfer", action="store_true", help="also the transfer matrix over all given models")
    p.add_argument("--jacobian-layers", action="store_true", help="per-layer Jacobian norms (J-SIGR Table 1)")
    p.add_argument("--n-proj", type=int, default=8, help="Hutchinson probes per sample for --jacobian-layers")
    p.add_argument("--jacobian-limit", type=int, default=256, help="images used for --jacobian-layers")
    p.add_argument("--rho-adv", action="store_true", help="DeepFool rho_adv")
    p.add_argument("--deepfool-max-iter", type=int, default=50)
    p.add_argument("--out", default="out/eval", help="output folder (created)")
    p.add_argument("--progress", type=_bool_arg, default=True, metavar="{true,false}",
                   help="progress bars on stderr (default true)")


def _attacks_from_args(args, dataset: str | None) -> list[AttackSpec]:
    eps, steps, alpha = DATASET_BUDGETS.get((dataset or "").lower(), DATASET_BUDGETS["cifar10"])
    if args.eps is not None:
        eps, alpha = args.eps, None
    if args.steps is not None:
        steps, alpha = args.steps, None
    specs = args.attack or ["clean", "fgsm", "pgd"]
    attacks = []
    for spec in specs:
        try:
            attacks.append(parse_attack(spec, eps=eps, steps=steps, alpha=alpha))
        except ValueError as err:
            raise ValueError(f"--attack {spec!r}: {err}") from None
    try:
        attack_labels(attacks, specs)
    except ValueError as err:
        raise ValueError(f"--attack: {err}") from None
    return attacks


def run(args) -> int:
    try:
        _check_args(args)
        loaded, dataset, dataset_kwargs = load_models(args)
        x, y = load_eval_data(dataset, args.data_root, limit=args.limit, dataset_kwargs=dataset_kwargs,
                              device=args.device)
        models = {n: lm.model for n, lm in loaded.items()}
        _check_shapes(models, x, y)
        attacks = _attacks_from_args(args, dataset)
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--out {args.out}: cannot create the output folder: {err.strerror or err}") from None
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"jsigr-fast eval: error: {err}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    rows = robustness_table(models, x, y, attacks, args.seeds, transfer=args.transfer, batch_size=args.batch_size,
                            progress=args.progress)
    seeds_note = (f"mean ± std over seeds {args.seeds} (PGD random starts; deterministic attacks run once)"
                  if len(args.seeds) > 1 else f"seed {args.seeds[0]}")
    head = [f"### Robustness on {dataset} (first {x.shape[0]} test images)", "",
            f"Accuracy in %; {seeds_note}. Models: " +
            ", ".join(f"{n} = {lm.arch} from {lm.path}" for n, lm in loaded.items()) + ".", ""]
    sections = ["\n".join(head) + "\n" + format_markdown(rows)]
    write_csv(rows, os.path.join(args.out, "accuracy.csv"))
    record = {"dataset": dataset, "n_images": int(x.shape[0]), "seeds": args.seeds,
              "attacks": [asdict(a) | {"label": lab} for a, lab in zip(attacks, attack_labels(attacks))],
              "models": {n: {"path": lm.path, "arch": lm.arch, "model_kwargs": lm.model_kwargs}
                         for n, lm in loaded.items()},
              "accuracy": [r.as_dict() for r in rows]}
    written = ["accuracy.csv"]
    if args.jacobian_layers:
        xj = x[:args.jacobian_limit]
        # the same probes for every model (a fresh generator each), so the models are compared on equal terms
        tables = {n: layer_jacobian_norms(m, xj, n_proj=args.n_proj, batch_size=args.batch_size,
                                          generator=torch.Generator().manual_seed(args.seeds[0]),
                                          progress=args.progress, desc=f"Jacobian norms of {n}")
                  for n, m in models.items()}
        sections.append(f"### Per-layer Jacobian norms, mean_n ‖∂h_l(x_n)/∂x_n‖²_F (Hutchinson, {args.n_proj} "
                        f"probes, {xj.shape[0]} images; ± standard error over images)\n\n" + format_layer_markdown(tables))
        with open(os.path.join(args.out, "jacobian_layers.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("model",) + tuple(tables[next(iter(tables))][0].as_dict()))
            for n, rs in tables.items():
                for r in rs:
                    w.writerow((n,) + tuple(r.as_dict().values()))
        record["jacobian_layers"] = {n: [r.as_dict() for r in rs] for n, rs in tables.items()}
        written.append("jacobian_layers.csv")
    if args.rho_adv:
        rho = rho_adv_table(models, x, batch_size=args.batch_size, max_iter=args.deepfool_max_iter,
                            progress=args.progress)
        sections.append("### DeepFool ρ_adv = mean ‖δ‖₂/‖x‖₂ over the flipped samples\n\n" + format_rho_markdown(rho))
        record["rho_adv"] = [asdict(r) for r in rho]
    record["seconds"] = time.perf_counter() - t0
    text = "\n\n".join(sections)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=2, allow_nan=True)
    written += ["results.md", "results.json"]
    print(text)
    print(f"\nwrote {', '.join(written)} to {os.path.abspath(args.out)}")
    return 0
