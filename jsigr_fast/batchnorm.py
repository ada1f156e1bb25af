"""BatchNorm-aware helpers: which layers couple samples, auxiliary passes that leave running
statistics alone, and an exactly-differentiable batch norm for forward-mode AD.

Why each exists:

* Train-mode BatchNorm normalises with batch statistics, so a sample's logits depend on every
  other sample in the batch and the batch Jacobian dZ/dX is not block-diagonal. Estimators that
  put a cotangent (or tangent) on every sample at once then measure all blocks, not only the
  per-sample ones; :func:`batch_coupled` tells the exact estimator which case it is in.
* J-SIGR runs auxiliary forwards (the perturbed input for the saliency map, the forward-mode
  pass of the Hutchinson estimator). They must use batch statistics, as the training forward
  does, but must not move the running statistics: one J-SIGR call should change them exactly as
  one ordinary training forward on x does. :func:`frozen_running_stats` does that.
* PyTorch's native normalization kernels treat their saved mean / inverse std as constants when a
  forward-mode tangent is differentiated again in reverse mode (and in their triple backward), so
  ``d/dtheta ||J z||^2`` comes out wrong through train-mode BatchNorm, InstanceNorm and LayerNorm
  (measured here in float64 against finite differences: 10-70 % off; GroupNorm, RMSNorm, eval-mode
  BatchNorm, pooling and the usual activations are right; see pytorch#196699 and the caveat in
  pytorch#81293). Plain double backprop (``d/dtheta ||J^T u||^2``) is correct.
  :func:`decomposed_normalization` reroutes ``F.batch_norm``, ``F.instance_norm`` and
  ``F.layer_norm`` to elementary ops whose every derivative order is exact.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.overrides import TorchFunctionMode

__all__ = ["uses_batch_statistics", "batch_coupled", "frozen_running_stats", "decomposed_normalization",
           "batch_norm_composite", "instance_norm_composite", "layer_norm_composite"]


def uses_batch_statistics(module: nn.Module) -> bool:
    """True for a BatchNorm-family layer that normalises with the current batch's statistics."""
    if not isinstance(module, _BatchNorm):
        return False
    return module.training or module.running_mean is None


def batch_coupled(model: nn.Module) -> bool:
    """True when some layer of ``model`` mixes samples of a batch (BatchNorm using batch statistics).

    Only BatchNorm-family layers are detected; a custom layer that mixes samples is not.
    """
    return any(uses_batch_statistics(m) for m in model.modules())


def _walk(model: nn.Module) -> list:
    """``list(model.modules())`` in one Python frame: this runs in every J-SIGR step and every attack
    iteration, and ``modules()``'s nested generators cost a frame per module per level (ResNet-20: 449
    Python calls per walk; bench/bench_overhead.py). Same modules, same order, each once."""
    out, seen, stack = [], set(), [model]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:  # (None: a submodule slot registered empty)
            continue
        seen.add(id(m))
        out.append(m)
        children = list(m._modules.values())  # no generator: each resumption is a Python call
        children.reverse()
        stack += children
    return out


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module):
    """Inside the block, train-mode BatchNorm layers normalise with batch statistics as usual but do
    not update ``running_mean``, ``running_var`` or ``num_batches_tracked``.

    Implemented by switching ``track_running_stats`` off for the duration (BatchNorm then passes no
    running buffers to ``F.batch_norm``), so no buffer is written and no autograd version counter
    moves. Train-mode InstanceNorm with ``track_running_stats=True`` passes its buffers whatever
    that flag says, so its buffers are set to None for the duration instead. Restored on exit, also
    on error.
    """
    switched, hidden = [], []
    for m in _walk(model):
        if isinstance(m, (_BatchNorm, _InstanceNorm)) and m.training and m.track_running_stats:
            if isinstance(m, _BatchNorm):
                switched.append(m)
            else:
                hidden.append((m, m.running_mean, m.running_var))
    for m in switched:
        m.track_running_stats = False
    for m, _, _ in hidden:
        m.running_mean = m.running_var = None
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True
        for m, mean, var in hidden:
            m.running_mean, m.running_var = mean, var


def batch_norm_composite(input, running_mean, running_var, weight=None, bias=None, training=False,
                         momentum=0.1, eps=1e-5):
    """``F.batch_norm`` written with elementary differentiable ops (exact at every derivative order)."""
    dims = [0] + list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training:
        F._verify_batch_size(input.size())  # one value per channel: no batch statistics (as F.batch_norm raises)
        mean = input.mean(dim=dims)
        var = input.var(dim=dims, unbiased=False)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                n = input.numel() // input.shape[1]
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / max(n - 1, 1))
    else:
        mean, var = running_mean, running_var
    out = (input - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def instance_norm_composite(input, running_mean=None, running_var=None, weight=None, bias=None,
                            use_input_stats=True, momentum=0.1, eps=1e-5):
    """``F.instance_norm`` with elementary differentiable ops (statistics per sample and channel)."""
    dims = list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    if use_input_stats:
        mean = input.mean(dim=dims, keepdim=True)
        var = input.var(dim=dims, unbiased=False, keepdim=True)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                n = max(input[0, 0].numel(), 1)
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach().mean(0).reshape(-1))
                running_var.mul_(1 - momentum).add_(momentum * var.detach().mean(0).reshape(-1) * n / max(n - 1, 1))
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def layer_norm_composite(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm`` with elementary differentiable ops."""
    dims = list(range(input.dim() - len(normalized_shape), input.dim()))
    mean = input.mean(dim=dims, keepdim=True)
    var = input.var(dim=dims, unbiased=False, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


_COMPOSITES = {F.batch_norm: batch_norm_composite, F.instance_norm: instance_norm_composite,
               F.layer_norm: layer_norm_composite}


class _DecomposedNormalization(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        composite = _COMPOSITES.get(func)
        if composite is not None:
            return composite(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def decomposed_normalization():
    """Inside the block every ``F.batch_norm``, ``F.instance_norm`` and ``F.layer_norm`` call (so every
    BatchNorm / InstanceNorm / LayerNorm module) runs its elementary-op composite instead of the
    native kernel, so forward-mode tangents can be differentiated again exactly."""
    with _DecomposedNormalization():
        yield
