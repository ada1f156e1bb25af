"""The training configuration: one flat schema shared by flags, YAML/JSON files and checkpoints.

Every key is a field of :class:`TrainConfig`. A file ``--config run.yaml`` is a flat mapping of
those keys (``lambda_m`` or ``lambda-m``); flags override the file, the file overrides the
defaults. An unknown key, a value of the wrong type or out of range raises :class:`ConfigError`
naming the key and where it came from. ``None`` defaults marked "preset" are filled from the
dataset / method by :func:`resolve` (e.g. PGD-AT's eps), so the resolved config written to
``config.yaml`` and to every checkpoint says exactly what ran.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Mapping

from .errors import ConfigError

__all__ = ["TrainConfig", "METHOD_NAMES", "load_config_file", "build_config", "resolve", "coerce",
           "FIELDS", "to_dict", "RESUMABLE_CHANGES", "ATTACK_PRESETS", "EPOCH_IMAGES"]

METHOD_NAMES = ("standard", "jsigr", "jacobian", "input_grad", "jarn", "jarn_at1", "ir", "pgd_at", "fgsm_at",
                "distill")
DATASET_NAMES = ("digits", "mnist", "cifar10", "imagenet", "imagefolder", "synthetic")

# (eps, steps, step size) of the l_inf attacks used for adversarial training and evaluation.
# mnist / cifar10 / imagenet: SPEC (J-SIGR §5.1.2; CIFAR step 2/255 from JARN / Madry et al.; MNIST
# step 0.01 from Madry et al.). imagenet's step and every digits value are ours (2.5 * eps / steps,
# Madry's rule; digits eps 0.1 as in `jsigr-fast demo`: 0.3 erases most of an 8x8 digit).
ATTACK_PRESETS = {
    "mnist": (0.3, 40, 0.01),
    "digits": (0.1, 10, 0.025),
    "cifar10": (8 / 255, 7, 2 / 255),
    "synthetic": (8 / 255, 7, 2 / 255),
    "imagenet": (16 / 255, 10, 4 / 255),
    "imagefolder": (16 / 255, 10, 4 / 255),
}
# Training-set sizes: the default length of a --synthetic stand-in, so throughput projections and
# step counts match the real dataset's epoch.
EPOCH_IMAGES = {"digits": 1347, "mnist": 60_000, "cifar10": 50_000, "imagenet": 1_281_167,
                "imagefolder": 1_281_167, "synthetic": 10_000}

_GROUPS = ("run", "data", "model", "optimization", "precision", "logging", "jsigr", "jacobian", "input_grad",
           "jarn", "attack", "ir", "distill")


def _f(default, kind: str, help: str, group: str, *, choices: Iterable[str] | None = None, optional: bool = False,
       low: float | None = None, high: float | None = None, low_open: bool = False, resume_ok: bool = False):
    """A config field. ``kind``: int, float, bool, str, list_int, list_float, dict.
    ``resume_ok``: may differ between a checkpoint and the run resuming it (it does not change the
    trajectory of the weights, or it is a path that may legitimately move)."""
    meta = dict(kind=kind, help=help, group=group, choices=tuple(choices) if choices else None, optional=optional,
                low=low, high=high, low_open=low_open, resume_ok=resume_ok)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- run ------------------------------------------------------------------------------------
    method: str = _f("standard", "str", " | ".join(METHOD_NAMES) + " (docs/TRAINING.md)", "run",
                     choices=METHOD_NAMES)
    out: str | None = _f(None, "str", "run folder (default runs/<dataset>-<method>)", "run", optional=True,
                         resume_ok=True)
    # high: torch.manual_seed takes at most 2**64 - 1 and the loader seeds epoch e with seed + e, so
    # 2**63 - 1 leaves room for any epoch count instead of overflowing (a traceback) mid-run.
    seed: int = _f(0, "int", "seed of everything (init, data order, noise, attacks), 0 to 2**63 - 1", "run", low=0,
                   high=2 ** 63 - 1)
    device: str = _f("auto", "str", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)", "run")
    threads: int | None = _f(None, "int", "torch.set_num_threads (CPU)", "run", optional=True, low=1, resume_ok=True)
    # --- data -----------------------------------------------------------------------------------
    dataset: str = _f("digits", "str", "digits (embedded) | mnist | cifar10 | imagenet | imagefolder | synthetic",
                      "data", choices=DATASET_NAMES)
    data_root: str | None = _f(None, "str", "data folder (mnist, cifar10, imagenet, imagefolder)", "data",
                               optional=True, resume_ok=True)
    synthetic: bool = _f(False, "bool", "random images with the dataset's shape, classes and size (throughput "
                         "without data)", "data")
    synthetic_samples: int | None = _f(None, "int", "length of the synthetic training set (default: the real "
                                       "dataset's, 1,281,167 for imagenet)", "data", optional=True, low=1)
    num_classes: int | None = _f(None, "int", "classes (synthetic / imagefolder override)", "data", optional=True,
                                 low=1)
    image_size: int | None = _f(None, "int", "crop size for imagenet/imagefolder; side of synthetic images",
                                "data", optional=True, low=1)
    batch_size: int = _f(128, "int", "GLOBAL batch size (split evenly over DDP ranks)", "data", low=1)
    eval_batch_size: int | None = _f(None, "int", "global evaluation batch (default batch_size)", "data",
                                     optional=True, low=1, resume_ok=True)
    workers: int = _f(0, "int", "data-loader worker processes per rank", "data", low=0, resume_ok=True)
    steps_per_epoch: int | None = _f(None, "int", "cap on optimizer steps per epoch", "data", optional=True, low=1)
    # --- model ----------------------------------------------------------------------------------
    model: str | None = _f(None, "str", "model name from jsigr_fast.models (default: the paper's for the "
                           "dataset)", "model", optional=True)
    model_args: dict = _f({}, "dict", "extra constructor arguments, e.g. {activation: gelu, norm: group}",
                          "model")
    channels_last: bool = _f(False, "bool", "channels_last memory format (faster convs on tensor cores)", "model")
    init_from: str | None = _f(None, "str", "start from these weights (a training checkpoint or a state_dict): "
                               "J-SIGR's pre-trained start, Jacobian post-processing", "model", optional=True,
                               resume_ok=True)
    # --- optimization ---------------------------------------------------------------------------
    epochs: int = _f(10, "int", "training epochs", "optimization", low=1, resume_ok=True)
    optimizer: str = _f("sgd", "str", "sgd | adam | adamw", "optimization", choices=("sgd", "adam", "adamw"))
    lr: float = _f(0.1, "float", "peak learning rate", "optimization", low=0, low_open=True)
    momentum: float = _f(0.9, "float", "SGD momentum", "optimization", low=0, high=1)
    nesterov: bool = _f(False, "bool", "Nesterov momentum (SGD)", "optimization")
    weight_decay: float = _f(5e-4, "float", "weight decay (decoupled for adamw)", "optimization", low=0)
    schedule: str = _f("cosine", "str", "per-step LR schedule: constant | cosine | step", "optimization",
                       choices=("constant", "cosine", "step"))
    warmup_epochs: float = _f(0.0, "float", "linear warm-up length in epochs", "optimization", low=0)
    milestones: list = _f([0.5, 0.75], "list_float", "step schedule: fractions of training where lr *= gamma",
                          "optimization")
    gamma: float = _f(0.1, "float", "step schedule factor", "optimization", low=0, low_open=True)
    grad_clip: float | None = _f(None, "float", "clip the global gradient norm", "optimization", optional=True,
                                 low=0, low_open=True)
    max_nonfinite: int = _f(10, "int", "stop after this many consecutive steps with a non-finite loss/gradient",
                            "optimization", low=1)
    # --- precision and speed --------------------------------------------------------------------
    amp: str = _f("none", "str", "none | bf16 (autocast) | fp16 (autocast + GradScaler)", "precision",
                  choices=("none", "bf16", "fp16"))
    cudnn_benchmark: bool = _f(True, "bool", "torch.backends.cudnn.benchmark", "precision", resume_ok=True)
    deterministic: bool = _f(False, "bool", "deterministic kernels (bit-exact resume on GPU; slower)",
                             "precision")
    # --- logging, checkpoints, evaluation -------------------------------------------------------
    progress: bool = _f(True, "bool", "tqdm progress bar", "logging", resume_ok=True)
    log_every: int = _f(10, "int", "steps between CSV/TensorBoard rows", "logging", low=1, resume_ok=True)
    tensorboard: bool = _f(True, "bool", "TensorBoard events in <out>/tb (needs the tensorboard package)",
                           "logging", resume_ok=True)
    save_every_steps: int = _f(0, "int", "also checkpoint every N steps (0: at epoch ends only)", "logging",
                               low=0, resume_ok=True)
    eval_every: int = _f(1, "int", "evaluate every N epochs (and after the last)", "logging", low=1,
                         resume_ok=True)
    eval_attack: str = _f("none", "str", "also evaluate under none | fgsm | pgd (attack_* presets)", "logging",
                          choices=("none", "fgsm", "pgd"), resume_ok=True)
    keep_best: str = _f("none", "str", "also keep best.pt, the checkpoint of the evaluated epoch with the highest "
                        "eval_clean or eval_adv (robust overfitting, Rice et al. 2020)", "logging",
                        choices=("none", "eval_clean", "eval_adv"), resume_ok=True)
    eval_max_batches: int | None = _f(None, "int", "cap on evaluation batches per rank", "logging",
                                      optional=True, low=0, resume_ok=True)
    throughput_steps: int = _f(0, "int", "measure img/s over N steps, project the epoch time, exit", "logging",
                               low=0, resume_ok=True)
    throughput_warmup: int = _f(3, "int", "untimed steps before the throughput measurement", "logging", low=0,
                                resume_ok=True)
    # --- J-SIGR ---------------------------------------------------------------------------------
    backend: str = _f("auto", "str", "auto | reference | fused (library kernels)", "jsigr",
                      choices=("auto", "reference", "fused"))
    mode: str = _f("autograd", "str", "autograd (exact penalties, double backprop) | fd (finite differences, "
                   "one ordinary backward; jsigr, jacobian, input_grad)", "jsigr", choices=("autograd", "fd"))
    fd_step: float = _f(0.01, "float", "mode fd: the difference step, in input units", "jsigr", low=0, low_open=True)
    lambda_m: float | None = _f(None, "float", "weight of the selective input-gradient term (preset 0.5)", "jsigr",
                                optional=True, low=0)
    lambda_j: float | None = _f(None, "float", "weight of the Jacobian term (jsigr 0.5; jacobian 0.1 on "
                                "digits/mnist, 0.5 otherwise)", "jsigr", optional=True, low=0)
    jsigr_eps: float = _f(0.3, "float", "saliency perturbation, in units of std(x)", "jsigr", low=0)
    beta: float = _f(0.0, "float", "mask threshold on the adaptor's tanh output", "jsigr", low=-1, high=1)
    mask_quantile: float | None = _f(None, "float", "leave the top q fraction unpenalised (instead of beta)",
                                     "jsigr", optional=True, low=0, high=1)
    jacobian_estimator: str = _f("projection", "str", "exact | projection | hutchinson", "jsigr",
                                 choices=("exact", "projection", "hutchinson"))
    n_proj: int = _f(1, "int", "random projections per step", "jsigr", low=1)
    disc: str | None = _f(None, "str", "discriminator preset cifar | mnist | svhn (preset: mnist for "
                          "digits/mnist)", "jsigr", optional=True, choices=("cifar", "mnist", "svhn"))
    disc_every: int | None = _f(None, "int", "discriminator step every N steps (preset 10 mnist, 20 cifar)",
                                "jsigr", optional=True, low=1)
    adaptor_lr: float = _f(1e-3, "float", "adaptor Adam lr", "jsigr", low=0, low_open=True)
    disc_lr: float = _f(2e-4, "float", "discriminator Adam lr", "jsigr", low=0, low_open=True)
    generator_loss: str = _f("minimax", "str", "minimax | nonsaturating", "jsigr",
                             choices=("minimax", "nonsaturating"))
    # --- Jacobian regularization / double backprop ----------------------------------------------
    jacobian_squared: bool = _f(True, "bool", "mean ||J||_F^2 (true) or Jakubovitz's sqrt(sum ||J||_F^2) / N",
                                "jacobian")
    lambda_ig: float = _f(1.0, "float", "input_grad: weight of mean ||grad_x l||^2", "input_grad", low=0)
    # --- JARN -----------------------------------------------------------------------------------
    lambda_adv: float | None = _f(None, "float", "JARN adversarial weight (preset 1)", "jarn", optional=True,
                                  low=0)
    jarn_noise: float | None = _f(None, "float", "uniform input noise half-width (preset 8/255; 0 for "
                                  "jarn_at1)", "jarn", optional=True, low=0)
    jarn_start: float = _f(0.75, "float", "JARN on from this fraction of training (earlier: CE / FGSM-AT1)",
                           "jarn", low=0, high=1)
    # --- adversarial training -------------------------------------------------------------------
    attack_eps: float | None = _f(None, "float", "l_inf eps (preset per dataset)", "attack", optional=True, low=0)
    attack_steps: int | None = _f(None, "int", "PGD steps (preset per dataset)", "attack", optional=True, low=1)
    attack_alpha: float | None = _f(None, "float", "PGD step size (preset per dataset)", "attack", optional=True,
                                    low=0, low_open=True)
    fgsm_variant: str = _f("random_start", "str", "random_start (Wong et al. 2020) | clean_adv (J-SIGR: mean of "
                           "clean and FGSM-at-predicted-label CE)", "attack", choices=("random_start", "clean_adv"))
    fgsm_alpha: float = _f(1.25, "float", "random_start step size in units of eps", "attack", low=0, low_open=True)
    # --- Interpretation Regularization ----------------------------------------------------------
    teacher: str | None = _f(None, "str", "teacher checkpoint (ir: SmoothGrad targets; distill stage 2)",
                             "ir", optional=True, resume_ok=True)
    ir_lambda_d: float = _f(3.0, "float", "weight of the cosine alignment", "ir", low=0)
    ir_lambda_m: float = _f(0.15, "float", "weight of ||J_c||", "ir", low=0)
    ir_targets: str = _f("online", "str", "online (per batch) | precompute (once, un-augmented data only)", "ir",
                         choices=("online", "precompute"))
    ir_samples: int | None = _f(None, "int", "SmoothGrad samples (preset 8 online, 50 precompute)", "ir",
                                optional=True, low=1)
    ir_sigma: float = _f(0.15, "float", "SmoothGrad noise, fraction of each image's range", "ir", low=0)
    ir_phi: float | None = _f(1.0, "float", "zero target values within mean +- phi*std (null: keep all)", "ir",
                              optional=True, low=0)
    # --- defensive distillation -----------------------------------------------------------------
    temperature: float = _f(50.0, "float", "softmax temperature T", "distill", low=0, low_open=True)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
RESUMABLE_CHANGES = frozenset(n for n, f in FIELDS.items() if f.metadata["resume_ok"])
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def to_dict(cfg: TrainConfig) -> dict:
    """A plain dict of primitives (what checkpoints and config.yaml store)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _where(source: str | None) -> str:
    return f" (from {source})" if source else ""


def coerce(name: str, value: Any, source: str | None = None, *, from_text: bool = False):
    """Check and convert one value for key ``name``. ``from_text``: the value is a command-line
    string (so "true", "none", "3" and "0.5,0.75" are parsed)."""
    if name not in FIELDS:
        raise ConfigError(_unknown_message(name, source))
    meta = FIELDS[name].metadata
    kind, where = meta["kind"], _where(source)

    def fail(expected: str):
        return ConfigError(f"config key '{name}' must be {expected}{where}, got {type(value).__name__} {value!r}")

    if from_text and isinstance(value, str) and value.strip().lower() in _NONE and meta["optional"]:
        return None
    if value is None:
        if meta["optional"]:
            return None
        raise fail("set (it cannot be null)")
    if kind == "bool":
        if isinstance(value, str) and from_text:
            low = value.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if kind == "int":
        if isinstance(value, str) and from_text:
            try:
                value = int(value.strip())
            except ValueError:
                raise fail("an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        out = value
    elif kind == "float":
        if isinstance(value, str):  # flags, and PyYAML reads "1e-3" (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                raise fail("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        out = float(value)
        if not math.isfinite(out):
            raise fail("a finite number")
    elif kind == "str":
        if not isinstance(value, str):
            raise fail("a string")
        out = value
        if meta["choices"] and out not in meta["choices"]:
            hint = difflib.get_close_matches(out, meta["choices"], n=1)
            raise ConfigError(f"config key '{name}' must be one of {', '.join(meta['choices'])}{where}, got {out!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else ""))
        return out
    elif kind in ("list_int", "list_float"):
        if from_text and isinstance(value, (str, list, tuple)):  # "0.5,0.75", or nargs="+" pieces of that
            pieces = [value] if isinstance(value, str) else value
            value = [v for p in pieces for v in str(p).replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            raise fail("a list of numbers")
        item = "int" if kind == "list_int" else "float"
        out = []
        for v in value:
            if isinstance(v, str):
                try:
                    v = int(v) if item == "int" else float(v)
                except ValueError:
                    raise fail(f"a list of {item}s") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (item == "int" and not isinstance(v, int)):
                raise fail(f"a list of {item}s")
            out.append(int(v) if item == "int" else float(v))
        return out
    elif kind == "dict":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise fail("a mapping with string keys")
        return dict(value)
    else:  # pragma: no cover - schema error
        raise AssertionError(kind)
    low, high = meta["low"], meta["high"]
    if low is not None and (out < low or (meta["low_open"] and out == low)):
        raise ConfigError(f"config key '{name}' must be {'>' if meta['low_open'] else '>='} {low}{where}, got {out}")
    if high is not None and out > high:
        raise ConfigError(f"config key '{name}' must be <= {high}{where}, got {out}")
    return out


# Names from other trainers, for the "did you mean" hint of an unknown key.
_ALIASES = {"learning_rate": "lr", "batch": "batch_size", "bs": "batch_size", "wd": "weight_decay",
            "lr_schedule": "schedule", "scheduler": "schedule", "num_workers": "workers", "arch": "model",
            "data": "data_root", "data_dir": "data_root", "output": "out", "output_dir": "out", "epsilon": "attack_eps",
            "eps": "attack_eps", "pretrained": "init_from", "checkpoint": "init_from", "precision": "amp"}


def _unknown_message(name: str, source: str | None) -> str:
    if name in ("config", "resume", "print_config"):
        return f"'{name}' is a command-line flag (--{name.replace('_', '-')}), not a config key{_where(source)}"
    candidates = list(FIELDS) + list(_ALIASES)
    hint = difflib.get_close_matches(name, candidates, n=1)
    hint = [_ALIASES.get(h, h) for h in hint]
    return (f"unknown config key '{name}'{_where(source)}" + (f"; did you mean '{hint[0]}'?" if hint else "")
            + "; `jsigr-fast train --help` lists every key")


def normalize_key(key) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"config keys must be strings, got {key!r}")
    return key.strip().replace("-", "_")


def _unique_pairs(pairs, path: str, lines) -> dict:
    """A mapping from (key, value) pairs that refuses a repeated key: YAML and JSON parsers keep the
    last one silently, so ``lr: 0.1`` twice in a long file would run whichever came last."""
    out = {}
    for i, (key, value) in enumerate(pairs):
        if key in out:
            where = f" (line {lines[i]})" if lines else ""
            raise ConfigError(f"config key '{key}' is given twice in {path}{where}")
        out[key] = value
    return out


def _yaml_unique_keys(text: str, path: str):
    """``yaml.safe_load`` with :func:`_unique_pairs` on every mapping (nested ones too)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        # the keys written in this mapping; a merge key ("<<: *base") may be overridden, as YAML says
        own = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        keys = [loader.construct_object(k, deep=True) for k in own]
        if all(isinstance(k, Hashable) for k in keys):  # else construct_mapping's own error below
            _unique_pairs([(k, None) for k in keys], path, [k.start_mark.line + 1 for k in own])
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def load_config_file(path: str) -> dict:
    """Read a flat YAML or JSON mapping of config keys (validated by :func:`build_config`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text, object_pairs_hook=lambda pairs: _unique_pairs(pairs, path, None))
        else:
            data = _yaml_unique_keys(text, path)
    except ConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: report where it broke
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    out = {}
    for k, v in data.items():
        key = normalize_key(k)
        if key in out:
            raise ConfigError(f"config key '{key}' is given twice in {path}")
        out[key] = v
    return out


def build_config(file_values: Mapping[str, Any] | None = None, flag_values: Mapping[str, Any] | None = None, *,
                 file_source: str = "config file", flags_from_text: bool = True) -> tuple[TrainConfig, set[str]]:
    """Defaults <- file <- flags. Returns the config and the set of keys set explicitly.

    ``model_args`` merges key by key (a flag's ``--model-arg norm=group`` keeps the file's
    ``activation``)."""
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for source, mapping, text in ((file_source, file_values or {}, False), ("command line", flag_values or {},
                                                                             flags_from_text)):
        for key, value in mapping.items():
            key = normalize_key(key)
            v = coerce(key, value, source if source != "command line" else f"--{key.replace('_', '-')}",
                       from_text=text)
            if key == "model_args" and isinstance(values.get(key), dict):
                v = {**values[key], **v}
            values[key] = v
            explicit.add(key)
    return TrainConfig(**values), explicit


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the preset (None) values the method uses from the dataset and method."""
    c = dataclasses.replace(cfg, model_args=dict(cfg.model_args), milestones=list(cfg.milestones))
    m, ds = c.method, c.dataset
    mnist_like = ds in ("digits", "mnist")
    if c.out is None:
        c.out = os.path.join("runs", f"{ds}{'-synthetic' if c.synthetic and ds != 'synthetic' else ''}-{m}")
    if m == "jsigr":
        c.lambda_m = 0.5 if c.lambda_m is None else c.lambda_m
        c.lambda_j = 0.5 if c.lambda_j is None else c.lambda_j
    if m == "jacobian" and c.lambda_j is None:
        c.lambda_j = 0.1 if mnist_like else 0.5  # Jakubovitz & Giryes: 0.1 MNIST, 0.5 CIFAR-10
    if m in ("jsigr", "jarn", "jarn_at1"):
        c.disc = c.disc or ("mnist" if mnist_like else "cifar")
        if c.disc_every is None:
            c.disc_every = 10 if c.disc == "mnist" else 20
    if m in ("jarn", "jarn_at1"):
        c.lambda_adv = (5.0 if c.disc == "svhn" else 1.0) if c.lambda_adv is None else c.lambda_adv
        if c.jarn_noise is None:
            c.jarn_noise = 8 / 255 if m == "jarn" else 0.0
    if m in ("pgd_at", "fgsm_at", "jarn_at1") or c.eval_attack != "none":
        eps, steps, alpha = ATTACK_PRESETS[ds]
        c.attack_eps = eps if c.attack_eps is None else c.attack_eps
        c.attack_steps = steps if c.attack_steps is None else c.attack_steps
        if c.attack_alpha is None:  # the preset's step, or Madry's 2.5 eps / steps for one's own eps / steps
            own = c.attack_eps != eps or c.attack_steps != steps
            c.attack_alpha = 2.5 * c.attack_eps / c.attack_steps if own else alpha
    if m == "ir" and c.ir_samples is None:
        c.ir_samples = 8 if c.ir_targets == "online" else 50
    return c


def check_combination(cfg: TrainConfig, *, resuming: bool = False) -> None:
    """Errors that involve several keys (after :func:`resolve`). A resumed run takes its teacher from
    its checkpoint and ignores init_from, so their files are not needed then."""
    if cfg.method == "ir" and not cfg.teacher and not resuming:
        raise ConfigError("method 'ir' needs a teacher: --teacher CKPT (its SmoothGrad maps are the targets; e.g. a "
                          "run of --method pgd_at, see docs/TRAINING.md)")
    for key in ("teacher", "init_from"):
        path = getattr(cfg, key)
        if path and not resuming and not os.path.isfile(path):
            raise ConfigError(f"{key} checkpoint {path} does not exist")
    if cfg.teacher and cfg.method not in ("ir", "distill"):
        raise ConfigError(f"--teacher is used by methods ir and distill only, not {cfg.method!r}")
    if cfg.dataset in ("mnist", "cifar10", "imagenet", "imagefolder") and not cfg.synthetic and not cfg.data_root:
        raise ConfigError(f"dataset {cfg.dataset!r} needs --data-root DIR (or --synthetic true for random images "
                          f"of its shape)")
    if cfg.keep_best == "eval_adv" and cfg.eval_attack == "none":
        raise ConfigError("keep_best eval_adv needs an evaluation attack: --eval-attack fgsm or pgd")
    if cfg.dataset == "imagefolder" and cfg.synthetic and cfg.num_classes is None:
        raise ConfigError("--synthetic with dataset 'imagefolder' needs --num-classes")
    if cfg.schedule == "step" and any(not 0 < m < 1 for m in cfg.milestones):
        raise ConfigError(f"milestones are fractions of training in (0, 1), got {cfg.milestones}")
    if cfg.ir_targets == "precompute" and cfg.dataset in ("cifar10", "imagenet", "imagefolder") and not cfg.synthetic:
        raise ConfigError(f"ir_targets=precompute needs un-augmented training images, but {cfg.dataset} is trained "
                          f"with random crops/flips; use ir_targets=online")


def reference_markdown() -> str:
    """The key tables of docs/TRAINING.md ("Every key"), one per group, from the fields themselves.
    A test keeps the document equal to this; regenerate with
    ``python -c "from jsigr_fast.train.config import reference_markdown as r; print(r())"``."""
    groups: dict[str, list[str]] = {}
    for name, f in FIELDS.items():
        m = f.metadata
        if m["choices"] and len(m["choices"]) <= 4:  # a long list is in the help already
            kind = " \\| ".join(m["choices"])
        else:
            kind = {"str": "string", "list_int": "list of int", "list_float": "list of float"}.get(m["kind"], m["kind"])
        if m["optional"]:
            kind += " or null"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "preset" if default is None and "preset" in m["help"] else "null" if default is None else default
        help_ = m["help"].replace("|", "\\|") + (" *(may change on resume)*" if m["resume_ok"] else "")
        groups.setdefault(m["group"], []).append(f"| `{name}` | {kind} | `{shown}` | {help_} |")
    out = []
    for group, rows in groups.items():
        out += [f"**{group}**", "", "| key (flag `--key-name`) | type | default | meaning |", "|---|---|---|---|",
                *rows, ""]
    return "\n".join(out[:-1])
