"""Argument checks shared by every public entry point.

Each check raises TypeError (wrong kind of thing) or ValueError (right kind, bad value) with a
message that names the argument and says what was expected. None of them modifies its input.
Also the pieces every entry point shares: random draws, and the private copy of its input a model
gets (:func:`private_input`).
"""
from __future__ import annotations

import math
import numbers
import threading
import warnings
import weakref
from typing import Iterable

import torch
import torch.nn as nn

BACKENDS = ("auto", "reference", "fused")
JACOBIAN_ESTIMATORS = ("exact", "projection", "hutchinson")
MODES = ("autograd", "fd")


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numbers.Real: numpy scalars too
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_int(name: str, value, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_input_shape(name: str, shape) -> tuple[int, ...]:
    """A per-sample input shape: (C, H, W) for images or (D,) for vectors, positive ints."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__"):
        raise TypeError(f"{name} must be a per-sample shape such as (3, 32, 32) or (784,), got {type(shape).__name__}")
    shape = tuple(shape)
    if len(shape) not in (1, 3) or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1
                                       for s in shape):
        raise ValueError(f"{name} must be (C, H, W) or (D,) with positive ints, got {shape}")
    return tuple(int(s) for s in shape)


def check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "model has no trainable parameters (none with requires_grad=True): a regularized loss "
            "would have nothing to train"
        )
    return model


def model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def capturing(t: torch.Tensor) -> bool:
    """Is ``t``'s stream being captured into a CUDA graph (:mod:`jsigr_fast.cuda_graphs`), or a capture
    simulated (:func:`jsigr_fast.cuda_graphs.simulated_capture`)? The checks that read a tensor's values
    back to the host (a device sync, which capture refuses) are skipped then: a graphed step checks its
    inputs before each replay instead."""
    return SIMULATED_CAPTURE.depth > 0 or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _capturing_on(device: torch.device) -> bool:
    return SIMULATED_CAPTURE.depth > 0 or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


class _SimulatedCapture(threading.local):
    depth = 0  # open simulated_capture() blocks on this thread


SIMULATED_CAPTURE = _SimulatedCapture()


def check_input(x, model: nn.Module, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (images scaled to [0, 1], say), got dtype {x.dtype}; "
            f"convert it first, e.g. {name}.float() / 255"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError("called under torch.inference_mode(), which disables the autograd these gradients need; "
                           "call it outside that block (torch.no_grad() is fine for values only)")
    if x.is_inference():
        raise ValueError(f"{name} is an inference tensor (made under torch.inference_mode()), which autograd cannot "
                         f"record; pass {name}.clone() made outside inference mode")
    if x.dim() < 2:
        raise ValueError(f"{name} must be batched, shape (N, C, H, W) or (N, D); got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); need at least one sample")
    if x[0].numel() == 0:
        raise ValueError(f"{name} has no features per sample (shape {tuple(x.shape)})")
    dev = model_device(model)
    if dev is not None and dev != x.device:
        raise ValueError(f"{name} is on {x.device} but the model is on {dev}; move one of them (e.g. {name}.to({str(dev)!r}))")
    if not capturing(x) and not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_labels(y, n: int, device: torch.device, name: str = "y") -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices (torch.long), got dtype {y.dtype}")
    if y.dtype not in (torch.long, torch.uint8):  # what F.cross_entropy takes
        raise TypeError(f"{name} must hold class indices as torch.long (int64), got dtype {y.dtype}; "
                        f"convert it first: {name}.long()")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the batch, got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but x is on {device}")
    return y


def check_logits(logits, y: torch.Tensor | None, n: int) -> torch.Tensor:
    """Check a model's output is (N, K) logits and, when y is given, that every label is in [0, K)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model must return a tensor of logits, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"model must return (N, K) = ({n}, K) logits, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"model must return floating-point logits, got dtype {logits.dtype}")
    if y is not None and not capturing(y) and not _labels_known_in_range(y, logits.shape[1]):
        k = logits.shape[1]
        bad = (y < 0) | (y >= k)
        if bool(bad.any()):
            raise ValueError(
                f"labels must lie in [0, {k}) for a model with {k} outputs; got values "
                f"{sorted(set(y[bad].tolist()))[:8]}"
            )
        if not y.is_inference():  # (an inference tensor has no version counter to tell a write by)
            _LABELS_IN_RANGE.last = (weakref.ref(y), y._version, y.data_ptr(), k)
    return logits


# The labels last found in range, (weakref, version, data pointer, K): a loss call runs the model two or
# three times on the same y (the saliency pass, the main pass, PGD's iterations), and each check is a
# device sync on a GPU. An in-place write to y bumps its version and is checked again.
_LABELS_IN_RANGE = threading.local()


def _labels_known_in_range(y: torch.Tensor, k: int) -> bool:
    last = getattr(_LABELS_IN_RANGE, "last", None)
    return (last is not None and not y.is_inference() and last[0]() is y and last[1] == y._version
            and last[2] == y.data_ptr() and last[3] == k)


def check_bool(name: str, value) -> bool:
    """``value`` itself if it is a bool (a truthy string or number is a mistake, not a yes)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r:.40}")
    return value


def as_generator(generator, device: torch.device):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _no_generator_under_capture(generator, like: torch.Tensor) -> None:
    if _capturing_on(like.device):
        raise RuntimeError(f"a loss given its own generator ({generator.device} torch.Generator) cannot be captured "
                           "in a CUDA graph, which draws from the default CUDA generator only: pass generator=None "
                           "(seed with torch.manual_seed instead)")


def randn(shape, *, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise on like's device and dtype, drawn from generator's device if one is given."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    _no_generator_under_capture(generator, like)
    z = torch.randn(shape, device=generator.device, dtype=like.dtype, generator=generator)
    return z.to(like.device)


def rand(shape, *, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) noise on like's device and dtype (see :func:`randn`)."""
    if generator is None:
        return torch.rand(shape, device=like.device, dtype=like.dtype)
    _no_generator_under_capture(generator, like)
    return torch.rand(shape, device=generator.device, dtype=like.dtype, generator=generator).to(like.device)


def private_input(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` to hand to the model, where the tensor it would get is the caller's ``x``, an
    alias of it, or a leaf that requires grad (what the input gradients are taken with respect to).

    A model may write into its input in place (``nn.ReLU(inplace=True)`` or ``x.clamp_()`` as its
    first op): on the caller's x or an alias that would modify x (and, on a non-leaf x, rewrite its
    autograd history), and on a leaf that requires grad autograd refuses it. On a copy it is an
    ordinary in-place op: the copy keeps the graph to ``t`` (gradients w.r.t. ``t`` are those of the
    model applied to a copy of its input) and ``t``'s strides (a channels-last input stays so). One
    input-sized copy per forward, small next to the activations; no random numbers are drawn.
    """
    return t.clone()


def stacked_in_layout(zs: list, like: torch.Tensor) -> torch.Tensor:
    """``torch.stack(zs)`` with every slice laid out like ``like`` (a dense tensor, e.g. a clone): the
    tangents of a vmapped forward-mode pass, each probe with the primal's strides (as ``make_dual``
    lays out a single tangent), so a view the model takes of its input works on the tangent exactly
    when it works on the primal. Same values: the random numbers are unchanged."""
    out = torch.empty_strided((len(zs), *like.shape), (like.numel(), *like.stride()), dtype=zs[0].dtype,
                              device=zs[0].device)
    for slot, z in zip(out, zs):
        slot.copy_(z)
    return out


def rng_state(device: torch.device) -> list:
    """The global random-number state a forward on ``device`` draws from: the CPU generator's, and
    the CUDA generator of that device if it is one. Refused inside a CUDA graph capture, which cannot
    read or wind back the CUDA generator's state (the callers: ``mode="fd"``'s perturbed forwards, the
    fused Hutchinson estimator's shared forward)."""
    if _capturing_on(device):
        raise RuntimeError(
            "this loss winds the random-number state back (mode='fd' replays the forward's random numbers in "
            "its perturbed forwards; the fused Hutchinson estimator shares the training forward), which a CUDA "
            "graph capture cannot do: in a graphed step use mode='autograd' and jacobian='projection' (or the "
            "reference backend's Hutchinson estimator)")
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def set_rng_state(device: torch.device, states: list) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def same_rng_state(a: list, b: list) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b))


def check_grad_scale(grad_scale):
    """``None`` or a positive finite number / 0-d tensor (e.g. ``GradScaler.get_scale()``)."""
    if grad_scale is None:
        return None
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1:
            raise ValueError(f"grad_scale must be a scalar, got a tensor of shape {tuple(grad_scale.shape)}")
        if grad_scale.dtype == torch.bool or grad_scale.is_complex():
            raise TypeError(f"grad_scale must be a real number, got a {grad_scale.dtype} tensor")
        value = float(grad_scale)
    else:
        value = check_number("grad_scale", grad_scale)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"grad_scale must be positive and finite, got {value}")
    return grad_scale


_TOLD_COMPILED: weakref.WeakSet = weakref.WeakSet()  # compiled models already warned about


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a loss runs for ``model``: ``model._orig_mod`` of a ``torch.compile``'d model (with a
    warning, once per model), else the model itself.

    PyTorch cannot differentiate a compiled graph twice (pytorch#91469: "torch.compile with
    aot_autograd does not currently support double backward"), and even mode="fd", which needs no
    double backward, fails on it: its input gradient keeps the graph for the loss's own backward,
    which a compiled backward with donated buffers refuses. The original module has the same
    parameters and buffers, so the loss and its gradients are those of the compiled model (same
    function), at eager speed. A DistributedDataParallel around a compiled module cannot be unwrapped
    that way (its forward is the one whose backward all-reduces), so it is refused with the fix.
    """
    import sys

    from torch.nn.parallel import DataParallel, DistributedDataParallel

    # only if dynamo was imported (torch.compile imports it): torch._dynamo would import it, ~2-6 s
    dynamo = sys.modules.get("torch._dynamo")
    compiled = getattr(dynamo, "OptimizedModule", None)
    if compiled is None:  # no torch.compile in this process (or a torch without dynamo): nothing compiled
        return model
    if isinstance(model, compiled):
        if model not in _TOLD_COMPILED:
            _TOLD_COMPILED.add(model)
            warnings.warn("model is torch.compile'd, and PyTorch cannot differentiate a compiled graph twice "
                          "(pytorch#91469): the loss runs its original module (model._orig_mod), uncompiled, with "
                          "the same parameters; backend='fused' is this library's fast path for these losses",
                          UserWarning, stacklevel=5)  # the caller of a public loss
        return model._orig_mod
    if isinstance(model, (DistributedDataParallel, DataParallel)) and isinstance(unwrap_parallel(model), compiled):
        raise ValueError(f"model is a {type(model).__name__} around a torch.compile'd module, and PyTorch cannot "
                         "differentiate a compiled graph twice (pytorch#91469): wrap the uncompiled module in "
                         f"{type(model).__name__} for these losses")
    return model


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel. Auxiliary passes (saliency,
    forward-mode JVP) run on it: they need no gradient all-reduce, and a DDP forward that is not
    followed by a backward through it would confuse DDP's reducer."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model
