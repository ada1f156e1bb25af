"""Checkpoints: atomic writes, ``weights_only`` reads, and every RNG state as plain tensors.

A checkpoint is untrusted input, so it is read with ``torch.load(weights_only=True)``: only
tensors and primitive containers unpickle, never code. Everything written here is therefore a
tensor, a number, a string, None, or a list/dict of those (the config is a plain dict; RNG states
are tensors). Format (``FORMAT``)::

    format       "jsigr_fast.train/1"
    versions     {"jsigr_fast": str, "torch": str}
    config       the resolved TrainConfig as a dict
    arch         {"model": name, "kwargs": {...}}: rebuilds the classifier (teachers, --init-from)
    epoch, batch where to continue: epoch ``epoch`` after ``batch`` finished batches (0: its start)
    global_step  training steps taken (skipped non-finite steps included)
    model        the classifier's state_dict (unwrapped from DDP)
    optimizer, scheduler, scaler   their state_dicts (scaler None without fp16)
    method       the method's state (JSIGR/JARN adaptor + discriminator + their optimizers; teacher)
    counters     non-finite / overflow / image counts
    rng          {"world_size": R, "ranks": [per-rank {"torch", "cuda", "numpy", "python", "generators"}]}
    metrics      the last epoch's logged values
    best         with keep_best (else None; optional): {"metric": "eval_clean" | "eval_adv", "value": float,
                 "epoch": int}, the epoch whose checkpoint best.pt holds
    epoch_partial  written mid-epoch (else None; optional): the epoch's steps so far, summed over the
                 ranks, {"sums": {term: float}, "counts": {term: int}, "seconds": float, "images": int},
                 so that the resumed epoch's row in epochs.csv covers all of its steps

Writes go to a temporary file in the same folder, are flushed and fsync'ed, then ``os.replace``'d
over the target, and the folder is fsync'ed: a crash (even SIGKILL) leaves either the old or the
new checkpoint, never a torn one.
"""
from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch

from .._atomic import write_atomic
from .errors import CheckpointError

__all__ = ["FORMAT", "save_atomic", "load_checkpoint", "load_weights", "load_model_weights", "capture_rng",
           "restore_rng", "check_finite_state"]

FORMAT = "jsigr_fast.train/1"


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` via a temporary file in the same folder, fsync and ``os.replace``."""
    write_atomic(path, lambda f: torch.save(obj, f))


def copy_atomic(src: str, dst: str) -> None:
    """Copy the file ``src`` to ``dst`` the same way (``dst`` is never a torn copy)."""
    import shutil

    with open(src, "rb") as fin:
        write_atomic(dst, lambda f: shutil.copyfileobj(fin, f, 1 << 22))


def _torch_load(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes about foreign pickles: the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure of an untrusted file becomes one clear error
        text = str(exc)
        if "Weights only load failed" in text or "weights_only" in text:
            detail = next((ln.split("error:", 1)[1].strip().split(" was not")[0] for ln in text.splitlines()
                           if "WeightsUnpickler error:" in ln), "")
            raise CheckpointError(
                f"checkpoint {path} contains Python objects other than tensors and plain containers"
                f"{f' ({detail})' if detail else ''}; it was not written by jsigr-fast train, and is refused rather "
                f"than unpickled (untrusted code could run)") from None
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch file (truncated or corrupted?): "
                              f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}") from None


def load_checkpoint(path: str) -> dict:
    """A training checkpoint written by :func:`save_atomic` from a run; CheckpointError otherwise."""
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path} is not a jsigr-fast training checkpoint (no 'format' entry); a plain "
                              f"state_dict can start a run with --init-from, but cannot be resumed")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format']!r}; this version reads {FORMAT!r}")
    missing = [k for k in ("config", "arch", "epoch", "batch", "global_step", "model", "optimizer", "scheduler",
                           "method", "rng", "counters") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    arch = ckpt["arch"]
    if not (isinstance(arch, dict) and isinstance(arch.get("model"), str) and isinstance(arch.get("kwargs"), dict)):
        raise CheckpointError(f"checkpoint {path} has a malformed 'arch' entry: {arch!r}")
    _check_fields(ckpt, path)
    return ckpt


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_fields(ckpt: dict, path: str) -> None:
    """The types the trainer relies on, so a damaged or hand-edited checkpoint fails here with
    the file and the field, not later with a traceback. (Whether the states fit the run is
    checked when they are loaded.)"""
    def bad(key, expected):
        return CheckpointError(f"checkpoint {path}: {key!r} must be {expected}, got {_shown(ckpt[key])}")

    for key in ("epoch", "batch", "global_step"):
        if not _is_count(ckpt[key]):
            raise bad(key, "an integer >= 0")
    for key in ("config", "model", "optimizer", "scheduler", "method"):
        if not isinstance(ckpt[key], dict):
            raise bad(key, "a mapping")
    for key in ("scaler", "metrics"):  # optional
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise bad(key, "a mapping or None")
    best = ckpt.get("best")
    if best is not None and not (isinstance(best, dict) and best.get("metric") in ("eval_clean", "eval_adv")
                                 and isinstance(best.get("value"), float) and _is_count(best.get("epoch"))):
        raise bad("best", "None or {'metric': 'eval_clean' | 'eval_adv', 'value': float, 'epoch': int}")
    partial = ckpt.get("epoch_partial")
    if partial is not None and not (
            isinstance(partial, dict) and all(isinstance(partial.get(k), dict) for k in ("sums", "counts"))
            and partial["sums"].keys() == partial["counts"].keys()
            and all(isinstance(k, str) and isinstance(v, float) for k, v in partial["sums"].items())
            and all(_is_count(v) for v in partial["counts"].values())
            and isinstance(partial.get("seconds"), float) and partial["seconds"] >= 0
            and _is_count(partial.get("images"))):
        raise bad("epoch_partial", "None or {'sums': {term: float}, 'counts': {term: int}, 'seconds': float, "
                                   "'images': int}")
    counters = ckpt["counters"]
    if not (isinstance(counters, dict) and all(isinstance(k, str) and _is_count(v) for k, v in counters.items())):
        raise bad("counters", "a mapping of names to integers >= 0")
    rng = ckpt["rng"]
    if not (isinstance(rng, dict) and isinstance(rng.get("world_size"), int) and rng["world_size"] >= 1
            and isinstance(rng.get("ranks"), list) and len(rng["ranks"]) == rng["world_size"]
            and all(isinstance(r, dict) for r in rng["ranks"])):
        raise bad("rng", "{'world_size': N, 'ranks': [N per-rank states]}")


def load_weights(path: str) -> tuple[dict, dict | None, dict | None]:
    """``(state_dict, arch, config)`` from a training checkpoint, or ``(state_dict, None, None)`` from
    a plain ``model.state_dict()`` file (e.g. ``jsigr-fast demo``'s ``standard.pt``)."""
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["model"], obj.get("arch"), obj.get("config")
    if isinstance(obj, dict) and "format" in obj:
        raise CheckpointError(f"{path} has checkpoint format {obj['format']!r}; this version reads {FORMAT!r}")
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in obj.items()):
        if all(k.startswith("module.") for k in obj):  # saved from a DDP / DataParallel wrapper
            obj = {k[len("module."):]: v for k, v in obj.items()}
        return obj, None, None
    raise CheckpointError(f"{path} holds neither a jsigr-fast training checkpoint nor a model state_dict "
                          f"(a mapping of parameter names to tensors)")


def load_model_weights(model: torch.nn.Module, state_dict: dict, source: str) -> list[str]:
    """Load ``state_dict`` into ``model``: every parameter must be there with the right shape; only
    the fixed ``normalize.mean/std`` buffers may be missing (a torchvision ResNet-18 state_dict has
    none), in which case the model keeps its own. Returns the keys that were missing."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches, one line each
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
        raise CheckpointError(f"{source} does not fit the model: {' '.join(lines[:3])}{more}") from None
    bad = [k for k in missing if not k.startswith("normalize.")]
    if bad or unexpected:
        what = (f"missing {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}" if bad else "") + \
               ("; " if bad and unexpected else "") + \
               (f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "")
        raise CheckpointError(f"{source} does not fit the model ({what})")
    return list(missing)


# ------------------------------------------------------------------------------------------------
# RNG states as tensors and plain values
# ------------------------------------------------------------------------------------------------
def capture_rng(generators: dict[str, torch.Generator], device: torch.device) -> dict:
    """This process's RNG states: torch CPU, the current CUDA device, numpy, python, named generators."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def restore_rng(state: dict, generators: dict[str, torch.Generator], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    for k, g in generators.items():
        if k not in state["generators"]:
            raise CheckpointError(f"checkpoint has no state for generator {k!r}")
        g.set_state(state["generators"][k])


def check_finite_state(state_dict: dict, what: str) -> None:
    """Refuse to write non-finite floating-point weights."""
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"refusing to checkpoint {what}: {k} has non-finite values")
