"""The ``backend="fused"`` implementations: same signatures and results as :mod:`jsigr_fast.reference`.

Each function here returns what its namesake in :mod:`jsigr_fast.reference` returns (values and
parameter gradients; float64 to ~1e-10), only faster. Inside the call, an unmodified model's layers
are rerouted (a ``TorchFunctionMode``, like :func:`jsigr_fast.batchnorm.decomposed_normalization`);
any layer without a rule below keeps its ordinary autograd formula:

* **Train-mode BatchNorm** (every ``F.batch_norm`` with ``training=True``, so every ``nn.BatchNorm1d/2d/3d``
  in training mode) runs ``jsigr_fast::batch_norm_train``, whose backward and double backward are
  single fused kernels (csrc/batch_norm*.cpp) instead of ATen's chain of ~40 small kernels for
  ``NativeBatchNormBackwardBackward0`` (pytorch#3076). Eval-mode BatchNorm is affine and stays native.
  Where :data:`jsigr_fast.ops.BN_REBUILD_GRAD_Y` says so, the backward op keeps its output grad_x for the
  double backward, which the conv before it keeps anyway, and rebuilds its input grad_y from it: one
  activation-sized tensor per batch norm less in every input-gradient graph (ResNet-20 J-SIGR step: peak
  3.04x -> 2.14x the standard step's; bench/bench_memory.py). The step's final backward never forms the
  rebuilt grad_y (:data:`jsigr_fast.ops.BN_DOUBLE_BACKWARD_FROM_GRAD_X`).
* **Conv2d** (``F.conv2d`` with numeric padding) gets an explicit double-backward rule: the weight
  gradient of the input-gradient's graph is ``convolution_backward(grad_out, gg_input)`` — the same
  fast kernel as an ordinary weight gradient — where ATen's ``ConvolutionBackwardBackward0`` runs a
  convolution over transposed copies of both tensors (pytorch#22577). The input-gradient VJPs also
  skip the weight gradient that ATen's create-graph path cannot tell is unused. The rules (and ReLU's)
  run as C++ autograd Functions (csrc/layer_rules.cpp, :data:`CPP_RULES`) except in forward mode, inside
  torch.func transforms and under torch.compile, where the Python Functions below do.
* **A conv after relu(batch_norm(h))** keeps neither that input nor the ReLU its output: the conv's weight
  gradient recomputes it from h (which the batch norm keeps) and the ReLU keeps a one-byte mask
  (:data:`RECOMPUTE_CONV_INPUT`; ResNet-20 J-SIGR step: peak 2.14x -> 1.95x the standard step's).
* **ReLU** (``F.relu``, not in-place): its backward's dependence on the input is zero almost
  everywhere; the rule says so, where ATen materialises ``zeros_like`` and adds it in every double backward.
  (So a parameter that reaches the bare Jacobian norm only through the ReLU's on/off pattern gets no gradient,
  None, where the reference's is zeros; see the README.)
* **Forward mode through BatchNorm** (Hutchinson estimator): the JVP of train-mode batch norm is
  its own backward applied to the tangent (the normalisation's Jacobian is symmetric), so the
  tangent is computed with the fused backward op, and differentiating ``||J z||^2`` in reverse runs
  the fused double backward: exact, unlike ATen's native forward-mode rule (see
  :mod:`jsigr_fast.batchnorm`), and without decomposing the norm into elementary ops.
* **Several Hutchinson probes in one forward pass** (``n_proj > 1``): ``torch.func.vmap`` over the
  tangent of ``torch.func.jvp``, with the rules above, so the primal forward and its backward run once
  for all the probes (:func:`_hutchinson_batched`, :data:`BATCH_PROBES`). A batched forward-mode rule
  for train-mode BatchNorm is what ``torch.func`` lacks on its own (pytorch#85533); ours is the fused
  backward op's, run per probe by its vmap rule.
* **Channels-last activations** where they pay (:data:`CHANNELS_LAST`): the first convolution's
  NCHW input is made channels-last, so every later activation is (convolutions, the fused batch
  norm, ReLU, adds and pooling keep the layout); in forward mode too, the tangent following its
  activation's layout (group norm, whose forward-mode rule needs NCHW, gets a contiguous input).
  On the 2-core CPU oneDNN's convolutions run ~1.8x faster that way, and ATen's batch-norm double
  backward, which the rules above replace, is what makes channels-last *slower* for the reference path. The caller's tensors, parameters and their
  ``.grad`` layouts are untouched; ``Tensor.view`` calls that only fail because of the layout fall
  back to ``reshape`` (same values), so a model that flattens with ``view`` still works.
* **Batched VJPs** where they pay: see :data:`BATCH_VJPS` and bench/bench_vjp.py.
* **Layers PyTorch cannot differentiate twice** (hardsigmoid, SDPA, cdist; softmax-family tangents)
  run the composites of :mod:`jsigr_fast.higher_order`, as in the reference: the mode below is also
  a :class:`~jsigr_fast.higher_order.SafeOps`, so that costs no second mode.
* **The selective mask** (:func:`make_mask`): J-SIGR's default saliency ``|g| / max|g|`` and its
  threshold (or quantile) in one kernel that writes a one-byte mask (``ops.gradient_saliency_mask``,
  bit-identical to the reference's float mask); a trained :class:`~jsigr_fast.SaliencyAdaptor`'s
  map without a graph (``ops.adaptor_saliency_mask``); any other map through ``ops.threshold_mask``.
  The penalty then reads the byte mask (``ops.masked_sq_norm`` -> ``masked_sq_norm_bool``).
* **The projection estimator's per-sample norms** ``K ||J^T v||^2`` run the compiled squared-norm
  kernel (one pass, no ``u**2`` temporary and no ``PowBackward``), and, where :data:`LOSS_HEAD` says
  so for the device, the CE and its input-gradient cotangent come from one
  ``ops.cross_entropy_cotangent`` call instead of log_softmax / nll_loss and their backward nodes.
  The random projections are drawn exactly as the reference draws them (same generator, same order).

Running statistics: updated exactly as ``F.batch_norm`` does (and not at all inside
:func:`jsigr_fast.batchnorm.frozen_running_stats`).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from . import _checks, ops, reference
from ._function import LeanFunction
from .batchnorm import decomposed_normalization, frozen_running_stats
from .higher_order import ForwardADUnsupported, SafeOps, in_transform

__all__ = ["jsigr", "input_gradient_penalty", "jacobian_norm", "fused_layers", "fused_batch_norm", "make_mask",
           "BATCH_VJPS", "BATCH_PROBES", "LOSS_HEAD"]

# Stack the CE cotangent and the Jacobian projections into one is_grads_batched backward pass?
# Measured on the 2-core CPU (bench/results/vjp_cpu_*.md): it does not pay there, so it is off;
# on the H200 (bench/results/vjp_cuda_*.md, fused rules) one batched VJP took 1.60x / 1.73x the time of
# separate ones for 1 / 2 projections: off there too.
BATCH_VJPS = {"cpu": False, "cuda": False}

# Run conv activations channels-last inside the loss call? Measured on the 2-core CPU (ResNet-20,
# batch 128, fp32; bench/results/fused_cpu_*): the fused J-SIGR step 1.24 s -> 0.97 s with the model's
# weights left NCHW (the standard step: 0.41 s -> 0.22 s). Not measured on a GPU yet (the H200 session ran
# the ResNet-18 bf16 benches on a channels-last model and ResNet-20 fp32 NCHW): cuDNN's fp32 NCHW kernels are fine.
CHANNELS_LAST = {"cpu": True, "cuda": False}

# Carry several Hutchinson probes through one forward-mode pass (jacobian="hutchinson", n_proj > 1; see
# _hutchinson_batched)? The value is the fewest probes one pass carries batched, None for never; the
# primal forward and its backward then run once instead of once per probe. Measured on the 2-core CPU
# (ResNet-20, batch 128, fp32; bench/results/probes_cpu_*.md): a J-SIGR step with 3 / 4 probes (the
# first rides on the training forward, one batched pass carries the rest) 1.19x / 1.39x faster than
# one pass per probe; a single probe under vmap was ~10 % slower than plain forward AD, hence 2.
# On the H200 (bench/results/probes_cuda_*.md) the batched pass was slower: per-probe / batched 0.80x [0.67-0.98]
# with 3 probes, 0.91x [0.79-1.15] with 4; never there.
BATCH_PROBES = {"cpu": 2, "cuda": None}

# Per-sample CE and its input-gradient cotangent from one ops.cross_entropy_cotangent call? K is 10..1000,
# so this saves kernel launches and autograd nodes (~6 per step), not FLOPs. Measured on the 2-core CPU
# (bench/results/loss_head_cpu_*.md, 9 rounds): the op's forward is 1.2-1.7x faster than ATen's CE +
# softmax, but the head's whole forward + create_graph VJP + backward is within noise at K = 10 and 100
# and ~7 % faster at K = 1000 (2.0 vs 2.2 ms): under 0.02 % of a ~1 s fused step, so it stays off there.
# On the GPU it has CUDA and Triton kernels (a row per warp / program). On the H200
# (bench/results/loss_head_cuda_*.md) the CUDA op's forward is 2x faster than ATen's (25 vs 54 us), but the
# whole head ties (1212 vs 1239 us at K = 100, 1394 vs 1371 us at K = 1000): off there too.
LOSS_HEAD = {"cpu": False, "cuda": False}

# First-order blocks (fused_layers(first_order=True): the perturbed saliency pass and mode="fd") need no
# double backward, so the fused rules only pay where their first-order kernels are faster than ATen's:
# * FIRST_ORDER_NATIVE: conv and ReLU stay ATen's ops there (only the layout switch of CHANNELS_LAST
#   remains). Their rules compute the same first derivatives through a Python autograd node per call.
# * FIRST_ORDER_ATEN_BN[device]: the layouts of 4-D activations ("channels_last", "contiguous") whose batch
#   norm runs ATen's kernels there. On the 2-core CPU ATen's channels-last forward is faster than ours
#   (bench/results/bn_cpu_float32.md: ours 0.71-0.95x; the backward ties), unlike NCHW, where ours is
#   3.5-4x faster. On the H200 (bench/results/bn_cuda_float32.md, ResNet-20's shapes) ATen's forward and
#   backward beat ours in both layouts but one shape (ours 0.16-0.83x; NCHW 16x32x32: 1.5x / 3.0x), while
#   our double backward is 12-15x faster than ATen's: so first-order blocks take ATen's there.
# Measured together on the 2-core CPU (ResNet-20, batch 128, fp32, the fd J-SIGR step, 8 interleaved rounds;
# bench/results/fused_cpu_*_jsigr_fd_fd_rules.md, --ablation fd_rules turns both off): the fused rules
# everywhere took 1.09x [0.98-1.27] the time (NCHW model) and 1.02x [1.01-1.20] (channels-last model).
FIRST_ORDER_NATIVE = True
FIRST_ORDER_ATEN_BN = {"cpu": ("channels_last",), "cuda": ("channels_last", "contiguous")}

# The layers whose double-backward rules (conv2d, relu below) run in blocks differentiated twice, per device.
# The rules save ATen's slow conv double backward (pytorch#22577) and the weight gradients the create-graph
# VJPs do not need, for ~4 autograd nodes per conv per step (C++ ones, see CPP_RULES, or Python ones: host
# work, which is what a launch-bound GPU waits on; bench/bench_overhead.py). Without a rule the
# layer is ATen's (batch norm keeps the fused ops either way). On the 2-core CPU (ResNet-20, batch 128,
# fp32; bench/results/fused_cpu_resnet20_b128_float32_t2_jsigr_aten_rules.md) the rules pay: ATen's conv and
# ReLU made the fused J-SIGR step 1.21x [1.08-1.38] slower. Not measured on a GPU yet (bench_fused.py
# --ablation aten_rules; bench/gpu_session.sh runs it), so CUDA keeps them too.
LAYER_RULES = {"cpu": ("conv", "relu"), "cuda": ("conv", "relu")}

# The rules above as C++ autograd Functions (csrc/layer_rules.cpp: jsigr_fast::conv2d_rule / relu_rule), per
# device: the same formulas, and the same ATen kernels, as the Python Functions _Conv2d / _ReLU below, without
# a Python autograd node per call, its apply and its backward. Host work of the fused J-SIGR step (ResNet-20,
# the CUDA settings, tiny shapes; bench/bench_overhead.py, interleaved in one process): Python calls 10172 ->
# 8293, time 1.14x less. On the 2-core CPU at batch 128 (bench/results/fused_cpu_resnet20_b128_float32_t2_jsigr_
# python_rules.md) the Python ones took 1.02x [1.01-1.04] the time. The kernels a GPU runs are the same, so
# CUDA takes them too (``bench_fused.py --ablation python_rules`` times both there; gpu_session.sh runs it).
# The Python Functions stay the path for forward mode (the Hutchinson tangent: C++ Functions have no jvp),
# inside torch.func transforms and under torch.compile, and without the extension.
CPP_RULES = {"cpu": True, "cuda": True}
_CPP_RULES_BUILT = ops._op_defined("conv2d_rule") and ops._op_defined("relu_rule")
_conv2d_rule_op = torch.ops.jsigr_fast.conv2d_rule.default if _CPP_RULES_BUILT else None
_relu_rule_op = torch.ops.jsigr_fast.relu_rule.default if _CPP_RULES_BUILT else None

# Recompute a convolution's input a = relu(batch_norm(h)) in its backward instead of keeping it, per device? In a
# ResNet block the first conv's output h is kept by the batch norm after it, and the ReLU's output a by the ReLU
# (for its mask) and by the next conv (for its weight gradient): two activation-sized tensors where one carries
# the information. Inside the blocks differentiated twice, a conv applied to relu(fused batch norm's output)
# keeps nothing of its input (_RecomputedInputConv2d): its weight gradient recomputes a from (h, the batch
# statistics, the affine parameters, the ReLU's mask) once, in the step's final backward, and its create-graph
# input-gradient VJPs only need a's shape, which h has; the ReLU (_RecipeReLU) then trades its saved output for a
# one-byte mask (_ReluOutput). a is freed after the forward unless something else keeps it (a max-pool).
# On the 2-core CPU (ResNet-20, batch 128, fp32; bench/results/memory_cpu_resnet20_b128_float32.md,
# fused_cpu_resnet20_b128_float32_t2_jsigr_recompute.md): the fused J-SIGR step's peak 420.5 -> 383.0 MiB (2.14x
# -> 1.95x the standard step), double backprop's 1.63x -> 1.44x, for 1.06x [0.93-1.27] the step's time (8
# rounds: the mask's conversions, the recompute, four Python autograd nodes per block). With the CUDA settings
# (counted on the CPU, bench_memory.py --policies cuda), where batch norm keeps grad_y: 3.03x -> 2.84x alone,
# 2.18x (the rebuild alone) -> 1.99x with the rebuild. Not measured on a GPU yet: off there (bench/gpu_session.sh
# times --ablation recompute; its memory stage has both settings together).
RECOMPUTE_CONV_INPUT = {"cpu": True, "cuda": False}


def _rule(layer: str, t) -> bool:
    return isinstance(t, torch.Tensor) and layer in LAYER_RULES.get(t.device.type, ())


def _sq_norm(g, mask):
    return ops.masked_sq_norm(g, mask, compiled=True)


# ----------------------------------------------------------------------------------------------
# layer rules: batch norm (reverse and forward mode), the mode that reroutes F.* calls
# ----------------------------------------------------------------------------------------------
class _BatchNormJVP(LeanFunction):
    """Train-mode batch norm with a forward-mode rule, for the Hutchinson estimator.

    Reverse mode is the op's own (fused backward / double backward). Forward mode: with
    ``xhat = (x - mean) * invstd``, the Jacobian ``d xhat / d x`` is symmetric per channel, so
    ``t_y = batch_norm_backward(t_x, x, w, mean, invstd).grad_x + xhat * t_w + t_b`` — computed with
    the differentiable backward op, so ``d/dtheta ||t_y||^2`` is exact and uses the fused double backward.
    """

    generate_vmap_rule = True  # torch.func.vmap (the op has a vmap rule)

    @staticmethod
    def forward(x, weight, bias, eps):
        if torch._C._are_functorch_transforms_active():  # the batched probes (vmap): the op's vmap rule
            return torch.ops.jsigr_fast.batch_norm_train(x, weight, bias, eps)
        return ops.BatchNormTrain._kernel(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _y, mean, invstd = output
        ctx.set_materialize_grads(False)
        # the same tensors for both: under torch.func.vmap the generated rule keeps one list of batch
        # dims for the saved tensors, so two different lists would break the vmapped backward
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.save_for_forward(x, weight, bias, mean, invstd)
        ctx.bn_plan = ops._forward_plan(x, weight, invstd)

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_invstd):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if grad_y is None and grad_mean is None and grad_invstd is None:
            return None, None, None, None
        gx, gw, gb = ops._batch_norm_backward(ctx.bn_plan, grad_y, x, weight, mean, invstd, grad_mean, grad_invstd)
        gw = None if weight is None else gw.to(weight.dtype)
        gb = None if bias is None else gb.to(bias.dtype)
        return gx, gw, gb, None

    @staticmethod
    def jvp(ctx, t_x, t_w, t_b, _t_eps):
        x, weight, _bias, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        m = x.numel() // x.shape[1]
        if t_x is None:
            t_x = torch.zeros_like(x)
        # grad_x of the backward op is w * (d xhat/dx) t_x; its grad_weight / grad_bias are
        # sum(t_x * xhat) and sum(t_x), which give the tangents of mean and invstd.
        t_y, s_xhat, s_one = ops._batch_norm_backward(ctx.bn_plan, t_x, x, weight, mean, invstd, None, None)
        t_mean = s_one / m
        t_invstd = -invstd * invstd * s_xhat / m
        if t_w is not None or t_b is not None:
            xhat = (x.to(mean.dtype) - mean.reshape(shape)) * invstd.reshape(shape)
            extra = 0
            if t_w is not None:
                extra = xhat * t_w.to(mean.dtype).reshape(shape)
            if t_b is not None:
                extra = extra + t_b.to(mean.dtype).reshape(shape)
            t_y = t_y + extra.to(t_y.dtype)
        return t_y, t_mean, t_invstd


class _FusedMode(SafeOps):
    """The layer rules below, and (as a :class:`~jsigr_fast.higher_order.SafeOps`) the composites of
    the layers PyTorch cannot differentiate twice, in one mode: one Python dispatch per op, not two."""

    def __init__(self, *, forward_ad: bool = False, conv: bool = True, relu: bool = True, first_order: bool = False):
        super().__init__(forward_ad=forward_ad)  # forward_ad: batch norm through _BatchNormJVP (conv / ReLU have jvps)
        self.conv = conv
        self.relu = relu
        # first_order: no double backward will run, so conv / ReLU keep ATen's autograd (their
        # rules here only pay off twice differentiated: per call they cost a Python autograd.Function)
        self.first_order = first_order and FIRST_ORDER_NATIVE
        # copies standing in for views of channels-last activations (see torch.Tensor.view below):
        # storage address -> (weakref to the copy, weakref to the activation it stands for)
        self._view_copies: dict[int, tuple] = {}
        # Whether this block turned NCHW activations channels-last (CHANNELS_LAST; set by the first conv
        # that does, or by a caller that converts beforehand). Only then do activations have a layout the
        # caller's plain forward would not give them, and only then is the dropout mask redrawn in NCHW
        # order and a failing view replaced: with the caller's own channels-last input, the plain
        # forward's activations are channels-last too (masks drawn in memory order, views failing alike).
        self.relaid = False
        # activations a conv may recompute instead of keeping (RECOMPUTE_CONV_INPUT): id(tensor) ->
        # (weakref to it, recipe); a fused batch norm's output y -> (h, mean, invstd, weight, bias), a ReLU's
        # output relu(y) -> the same and what the ReLU keeps (_ReluOutput). Dropped with the block; h and
        # the rest are kept by the graph anyway.
        self._recipes: dict[int, tuple] = {}

    def _recipe(self, t):
        entry = self._recipes.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _remember(self, t, recipe) -> None:
        self._recipes[id(t)] = (weakref.ref(t), recipe)

    def _recomputes(self, t) -> bool:
        """Whether this block keeps recipes for ``t``'s layers: differentiated twice, both rules on for its
        device, the setting on, and no forward-mode level, transform or trace (the Functions have no jvp)."""
        return (not self.first_order and not self.forward_ad and self.conv and self.relu
                and isinstance(t, torch.Tensor) and RECOMPUTE_CONV_INPUT.get(t.device.type, False)
                and _rule("conv", t) and _rule("relu", t) and fwAD._current_level < 0
                and not torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling())

    def _batch_norm(self, args, kwargs):
        if not self._recomputes(args[0] if args else kwargs.get("input")):
            return ops.batch_norm(*args, **kwargs)
        y, mean, invstd = ops.batch_norm_with_stats(*args, **kwargs)
        if mean is not None:
            names = ("input", "running_mean", "running_var", "weight", "bias")
            bound = dict(zip(names, args), **kwargs)
            self._remember(y, (bound["input"], mean, invstd, bound.get("weight"), bound.get("bias")))
        return y

    def _relu(self, args, kwargs):
        t = args[0] if args else kwargs.get("input")
        inplace = args[1] if len(args) > 1 else kwargs.get("inplace", False)
        recipe = None if inplace or not isinstance(t, torch.Tensor) else self._recipe(t)
        if (recipe is None or len(recipe) != 5 or not (t.requires_grad and torch.is_grad_enabled())
                or not torch._C._autograd._saved_tensors_hooks_is_enabled()):  # (the ReLU keeps its output by one)
            return relu(*args, **kwargs)
        kept = _ReluOutput()
        with torch.autograd.graph.saved_tensors_hooks(kept.pack, _ReluOutput.unpack):
            out = _RecipeReLU.apply(t)
        self._remember(out, (*recipe, kept))
        return out

    def other(self, func, args, kwargs):  # after SafeOps' composites
        if self._view_copies and args and isinstance(args[0], torch.Tensor) and _writes_in_place(func):
            entry = self._view_copies.get(args[0].untyped_storage().data_ptr())
            copy, source = (entry[0](), entry[1]()) if entry is not None else (None, None)
            if copy is not None and source is not None:
                # a write through the stand-in (or a view of it): what a write through the real view
                # would do, the stand-in's values written back into the activation, in place
                out = func(*args, **kwargs)
                source.copy_(copy.view(source.shape))
                return out
        if func is F.batch_norm:
            if self.forward_ad:
                return _batch_norm_jvp(*args, **kwargs)
            if self.first_order and _aten_bn_first_order(args[0] if args else kwargs["input"]):
                return func(*args, **kwargs)
            return self._batch_norm(args, kwargs)
        if func is F.conv2d and self.conv:
            return conv2d(*args, **kwargs, _mode=self)
        if func is F.relu and self.relu and not self.first_order:
            if _rule("relu", args[0] if args else kwargs.get("input")):
                return self._relu(args, kwargs) if self._recipes else relu(*args, **kwargs)
        if func is F.adaptive_avg_pool2d and self.forward_ad and _global_pool(args, kwargs):
            # a global average pool inside the batched Hutchinson probes (vmap): ATen's forward-mode
            # rule for it has no batching rule there (a per-probe loop and a warning); the same mean
            t = args[0] if args else kwargs["input"]
            return t.mean(dim=(-2, -1), keepdim=True)
        if func is F.dropout and self.conv and self.relaid:
            t = args[0] if args else kwargs["input"]
            if not t.is_contiguous() and t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
                # a channels-last activation (see CHANNELS_LAST): ATen would draw the mask in memory
                # order, a different mask for the same seed; draw it in NCHW order, as for the user's layout
                rest = args[1:] if args else ()
                kw = {k: v for k, v in kwargs.items() if k != "input"}
                return func(t.contiguous(), *rest, **kw).contiguous(memory_format=torch.channels_last)
        if func is torch.Tensor.view and self.conv and self.relaid:
            try:
                return func(*args, **kwargs)
            except RuntimeError as e:
                # x.view(n, -1) on a channels-last activation (see CHANNELS_LAST): reshape gives the
                # same values in a contiguous copy instead of an alias; a write through it (or a view
                # of it) is written back into x above, as a write through the view would change x
                t = args[0]
                if "view size is not compatible" not in str(e) or t.is_contiguous():
                    raise
                out = t.reshape(*args[1:], **kwargs).contiguous()
                self._view_copies[out.untyped_storage().data_ptr()] = (weakref.ref(out), weakref.ref(t))
                return out
        return func(*args, **kwargs)


_IN_PLACE_DUNDERS = frozenset(f"__{op}__" for op in (
    "setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
    "ilshift", "irshift", "imatmul"))


def _writes_in_place(func) -> bool:
    """An in-place tensor method (``mul_``, ``copy_``, ``x[i] = v``, ``x += v``)."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("_")) or name in _IN_PLACE_DUNDERS


def _global_pool(args, kwargs) -> bool:
    t = args[0] if args else kwargs.get("input")
    size = args[1] if len(args) > 1 else kwargs.get("output_size")
    return (isinstance(t, torch.Tensor) and t.dim() in (3, 4) and size in (1, (1, 1), [1, 1])
            and in_transform(t))


def _batch_norm_jvp(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if not training or not ops.batch_norm_supported(input, weight):
        # eval mode is affine: ATen's forward-mode rule is exact there
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    F._verify_batch_size(input.size())
    y, _mean, _invstd = _BatchNormJVP.apply(input, weight, bias, eps)
    ops._update_running_stats(input, running_mean, running_var, momentum)
    return y


def _first_order_is_plain(device) -> bool:
    """Whether a first-order block on ``device`` changes nothing for 4-D activations: no relayout
    (:data:`CHANNELS_LAST`), ATen's conv and ReLU (:data:`FIRST_ORDER_NATIVE`) and ATen's batch norm in both
    layouts (:data:`FIRST_ORDER_ATEN_BN`) -- the H200's settings. Such a block needs no rerouting mode,
    whose Python dispatch of every torch call was all the fused fd step added to the reference's host
    work there (bench/bench_overhead.py); a batch norm on other shapes (BatchNorm1d) then runs ATen's
    first-order kernels too, exact either way."""
    dev = torch.device(device).type
    return (FIRST_ORDER_NATIVE and not CHANNELS_LAST.get(dev, False)
            and {"contiguous", "channels_last"} <= set(FIRST_ORDER_ATEN_BN.get(dev, ())))


@contextlib.contextmanager
def fused_layers(*, forward_ad: bool = False, conv: bool = True, relu: bool = True, first_order: bool = False,
                 device=None):
    """Inside the block, train-mode ``F.batch_norm`` runs the fused op (:func:`jsigr_fast.ops.batch_norm`),
    ``F.conv2d`` and ``F.relu`` get the explicit double-backward rules of :func:`conv2d` / :func:`relu`.
    With ``forward_ad=True`` batch norm goes through a wrapper that also has an exact forward-mode rule.
    With ``first_order=True`` (a block whose graph is differentiated at most once: the perturbed
    saliency pass, ``mode="fd"``) conv and ReLU stay ATen's own ops, only the activations' layout
    follows :data:`CHANNELS_LAST`: their rules would cost a Python autograd node per call and buy
    nothing there; so does batch norm where ATen's first-order kernels are the faster ones (see
    FIRST_ORDER_NATIVE). A graph built so is still exact when differentiated twice, through ATen's
    double backward. Batch norm's grad_y-rebuild checks are read together, once per block
    (:func:`jsigr_fast.ops.rebuild_checks_together`). A first-order block given the inputs' ``device``
    where that device's settings leave every layer ATen's (:func:`_first_order_is_plain`) pushes no mode
    and yields None."""
    if first_order and not forward_ad and device is not None and _first_order_is_plain(device):
        yield None
        return
    with ops.rebuild_checks_together(), _FusedMode(forward_ad=forward_ad, conv=conv, relu=relu,
                                                   first_order=first_order) as mode:
        yield mode


@contextlib.contextmanager
def fused_batch_norm(*, forward_ad: bool = False):
    """:func:`fused_layers` for batch norm only."""
    with ops.rebuild_checks_together(), _FusedMode(forward_ad=forward_ad, conv=False, relu=False):
        yield


# ----------------------------------------------------------------------------------------------
# conv2d and relu with explicit double-backward rules
# ----------------------------------------------------------------------------------------------
def _needed(ctx) -> list[bool]:
    """Which inputs of a custom Function the *running* backward pass needs.

    ``ctx.needs_input_grad`` only says whether an input requires grad, so a Function's backward inside
    ``autograd.grad(outputs, x)`` would also compute the weight gradient; the engine knows better
    (``_will_engine_execute_node``, the check torch.utils.checkpoint uses). Falls back to
    ``needs_input_grad`` if that private API is unavailable."""
    fns = iter(ctx.next_functions)
    out = []
    for is_tensor, need in zip(ctx.is_tensor, ctx.needs_input_grad):
        fn = next(fns)[0] if is_tensor else None
        if not need or fn is None:
            out.append(bool(need) and fn is not None)
            continue
        try:
            out.append(bool(torch._C._will_engine_execute_node(fn)))
        except (AttributeError, RuntimeError):
            out.append(True)
    return out


def _mark_inputs(ctx, inputs):
    ctx.is_tensor = [isinstance(t, torch.Tensor) for t in inputs]


def _batched(t) -> bool:
    """True for a tensor seen inside a vmapped backward (``is_grads_batched`` uses the legacy vmap). A
    custom Function applied there would save batch-wrapped tensors into the graph, so the backward
    of such calls records ATen's own differentiable ``convolution_backward`` instead."""
    f = torch._C._functorch
    return f.is_legacy_batchedtensor(t) or f.is_batchedtensor(t)


_conv_backward = torch.ops.aten.convolution_backward.default


def _conv_bw(grad_out, x, w, p, mask, bias=False):
    stride, padding, dilation, groups = p
    return _conv_backward(grad_out, x, w, [w.shape[0]] if bias else None, stride, padding, dilation, False,
                          [0] * len(stride), groups, mask)


class _ConvInputGrad(LeanFunction):
    """``grad_x = conv_transpose(grad_out, w)`` (x only gives the shape), with its own backward:
    ``d grad_out = conv2d(gg, w)``, ``d w = weight gradient of conv2d at input gg``."""

    generate_vmap_rule = True  # torch.func.vmap

    @staticmethod
    def forward(grad_out, w, x, p):
        return _conv_bw(grad_out, x, w, p, [True, False, False])[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, w, x, p = inputs
        ctx.save_for_backward(grad_out, w, x)
        ctx.p = p
        _mark_inputs(ctx, inputs)

    @staticmethod
    def backward(ctx, gg):
        grad_out, w, x = ctx.saved_tensors
        p = ctx.p
        need_go, need_w = _needed(ctx)[:2]
        d_go = F.conv2d(gg, w, None, *p) if need_go else None
        d_w = None
        if need_w:
            d_w = (_ConvWeightGrad.apply(grad_out, gg, w, p) if torch.is_grad_enabled() and not _batched(gg)
                   else _conv_bw(grad_out, gg, w, p, [False, True, False])[1])
        return d_go, d_w, None, None


class _ConvWeightGrad(LeanFunction):
    """``grad_w`` of conv2d(x, w) for ``grad_out`` (w only gives the shape), with its own backward:
    ``d grad_out = conv2d(x, gg)``, ``d x = conv_transpose(grad_out, gg)``."""

    generate_vmap_rule = True  # torch.func.vmap

    @staticmethod
    def forward(grad_out, x, w, p):
        return _conv_bw(grad_out, x, w, p, [False, True, False])[1]

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, w, p = inputs
        ctx.save_for_backward(grad_out, x, w)
        ctx.p = p
        _mark_inputs(ctx, inputs)

    @staticmethod
    def backward(ctx, gg):
        grad_out, x, w = ctx.saved_tensors
        p = ctx.p
        need_go, need_x = _needed(ctx)[:2]
        d_go = F.conv2d(x, gg, None, *p) if need_go else None
        d_x = None
        if need_x:
            d_x = (_ConvInputGrad.apply(grad_out, gg, x, p) if torch.is_grad_enabled() and not _batched(gg)
                   else _conv_bw(grad_out, x, gg, p, [True, False, False])[0])
        return d_go, d_x, None, None


class _Conv2d(LeanFunction):
    @staticmethod
    def forward(x, w, b, p):
        return F.conv2d(x, w, b, *p)

    generate_vmap_rule = True  # torch.func.vmap

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, p = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.p = p
        ctx.has_bias = b is not None
        _mark_inputs(ctx, inputs)

    @staticmethod
    def jvp(ctx, t_x, t_w, t_b, _t_p):
        x, w = ctx.saved_tensors
        out = None
        if t_x is not None:
            if x.is_contiguous(memory_format=torch.channels_last) and not t_x.is_contiguous(
                    memory_format=torch.channels_last) and not in_transform(t_x):
                # the tangent follows the activation's layout (see CHANNELS_LAST): for a caller's
                # channels-last input, make_dual keeps the NCHW probe, and a mixed-layout conv runs at
                # NCHW speed (~4x slower on the CPU)
                t_x = t_x.contiguous(memory_format=torch.channels_last)
            out = F.conv2d(t_x, w, None, *ctx.p)
        if t_w is not None:
            tw = F.conv2d(x, t_w, None, *ctx.p)
            out = tw if out is None else out + tw
        if t_b is not None:
            tb = t_b.reshape(1, -1, 1, 1)
            out = tb.expand(x.shape[0], -1, *out.shape[2:]) if out is None else out + tb
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        p = ctx.p
        need_x, need_w, need_b = _needed(ctx)[:3]
        if torch.is_grad_enabled() and not _batched(grad_out):  # create_graph: pieces with their own rules
            gx = _ConvInputGrad.apply(grad_out, w, x, p) if need_x else None
            gw = _ConvWeightGrad.apply(grad_out, x, w, p) if need_w else None
            gb = grad_out.sum(dim=(0, 2, 3)) if need_b else None
            return gx, gw, gb, None
        gx, gw, gb = _conv_bw(grad_out, x, w, p, [need_x, need_w, need_b], bias=ctx.has_bias)
        return gx, gw, gb, None


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _aten_bn_first_order(t) -> bool:
    """Whether batch norm on ``t`` in a first-order block runs ATen's kernels (:data:`FIRST_ORDER_ATEN_BN`)."""
    if not (isinstance(t, torch.Tensor) and t.dim() == 4):
        return False
    layouts = FIRST_ORDER_ATEN_BN.get(t.device.type, ())
    if t.is_contiguous():  # checked first: a tensor with 1x1 spatial dims is contiguous in both senses
        return "contiguous" in layouts
    return t.is_contiguous(memory_format=torch.channels_last) and "channels_last" in layouts


def _relayout(input) -> bool:
    """Whether a conv inside :func:`fused_layers` makes its 4-D input channels-last (:data:`CHANNELS_LAST`):
    once, at the first conv of an NCHW network. Not inside torch.func transforms (the batched
    Hutchinson probes), whose clone has no channels-last rule: that caller converts its inputs beforehand."""
    return (isinstance(input, torch.Tensor) and input.dim() == 4 and CHANNELS_LAST.get(input.device.type, False)
            and input.is_contiguous() and not input.is_contiguous(memory_format=torch.channels_last)
            and not in_transform(input))


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, _mode=None):
    """``F.conv2d`` whose double backward uses ordinary convolution kernels (see the module docstring).
    String padding ("same"/"valid") and non-4-D inputs fall back to ``F.conv2d``. Called by the mode of
    :func:`fused_layers` (``_mode``), the activation becomes channels-last where :data:`CHANNELS_LAST`
    says so (recorded in ``_mode.relaid``); in a first-order block, or where :data:`LAYER_RULES` has no conv
    rule for the device, that is all: the conv itself is ``F.conv2d``."""
    if isinstance(padding, str) or input.dim() != 4:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    p = (_pair(stride), _pair(padding), _pair(dilation), groups)
    dev = input.device.type
    if _mode is not None and _relayout(input):
        input = input.contiguous(memory_format=torch.channels_last)
        _mode.relaid = True
    if _mode is not None and (_mode.first_order or not _rule("conv", input)):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    autocast = torch.is_autocast_enabled(dev) and input.is_floating_point()
    recipe = _mode._recipe(input) if _mode is not None and _mode._recipes and not autocast else None
    if recipe is not None and len(recipe) == 6 and torch.is_grad_enabled() and _mode._recomputes(input):
        return _RecomputedInputConv2d.apply(input, weight, bias, p, (*recipe[:5], recipe[5].to_mask()))
    if autocast:
        # cast as autocast would (conv runs in the low-precision dtype), so the rule saves and
        # differentiates the cast tensors, whatever autocast state the backward later runs under
        dt = torch.get_autocast_dtype(dev)
        args = [t.to(dt) if t is not None else None for t in (input, weight, bias)]
        with torch.autocast(dev, enabled=False):
            return _conv_rule(*args, p)
    return _conv_rule(input, weight, bias, p)


def _cpp_rules(t) -> bool:
    """Whether the rules for ``t`` run as the C++ Functions (:data:`CPP_RULES`): built, wanted on its device,
    and no forward-mode level, torch.func transform or torch.compile trace active."""
    return (_CPP_RULES_BUILT and CPP_RULES.get(t.device.type, False) and fwAD._current_level < 0
            and not torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling())


def _conv_rule(input, weight, bias, p):
    """The conv rule applied: ``jsigr_fast::conv2d_rule`` or :class:`_Conv2d` (see :data:`CPP_RULES`)."""
    if _cpp_rules(input):
        return _conv2d_rule_op(input, weight, bias, *p)
    return _Conv2d.apply(input, weight, bias, p)


def _relu_rule(input):
    """The ReLU rule applied: ``jsigr_fast::relu_rule`` or :class:`_ReLU` (see :data:`CPP_RULES`)."""
    if _cpp_rules(input):
        return _relu_rule_op(input)
    return _ReLU.apply(input)


class _ReLU(LeanFunction):
    @staticmethod
    def forward(x):
        return torch.relu(x)

    generate_vmap_rule = True  # torch.func.vmap

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        # out detached: d(grad_in)/dx = 0 almost everywhere, so the double backward only flows to grad_out
        return torch.ops.aten.threshold_backward(grad_out, out.detach(), 0)

    @staticmethod
    def jvp(ctx, t_x):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(t_x, out.detach(), 0)


def relu(input, inplace=False):
    """``F.relu`` whose backward has no (identically zero) dependence on the input; in-place calls stay native."""
    if inplace:
        return F.relu(input, inplace=True)
    return _relu_rule(input)


class _ReluOutput:
    """What a :class:`_RecipeReLU` keeps for its backward (its saved tensor, packed by a saved-tensor hook, so the
    engine releases it with the node's other saved tensors): its output, until a conv that recomputes that
    output (RECOMPUTE_CONV_INPUT) trades it for the one-byte mask ``output > 0`` (:meth:`to_mask`). A ReLU whose
    output no such conv reads (a max-pool's input, which the pool keeps anyway) keeps its output: no mask."""

    __slots__ = ("out", "version", "mask")

    def pack(self, t):
        self.out, self.version, self.mask = t.detach(), t._version, None
        return self

    @staticmethod
    def unpack(kept):
        if kept.out is None:
            return kept.mask
        kept._check()
        return kept.out

    def _check(self):
        if self.out._version != self.version:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               f"inplace operation: the output of a ReLU is at version {self.out._version}; "
                               f"expected version {self.version} instead")

    def to_mask(self):
        """The mask (where the ReLU passes its gradient: threshold_backward's ``not output <= 0``), the output
        dropped."""
        if self.out is not None:
            self._check()
            self.mask = self.out.le(0).logical_not_()
            self.out = None
        return self.mask


class _RecipeReLU(LeanFunction):
    """:class:`_ReLU` whose saved output may become a mask (:class:`_ReluOutput`; applied under its hooks)."""

    @staticmethod
    def forward(x):
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_out):
        (kept,) = ctx.saved_tensors
        if kept.dtype == torch.bool:
            return _masked(grad_out, kept)
        return torch.ops.aten.threshold_backward(grad_out, kept, 0)


def _apply_mask(t, mask):
    """``t`` where the bool ``mask`` is set, else exact zeros (threshold_backward's rule, whatever t holds there).
    Through a float copy of the mask: on the CPU ``torch.where(mask, t, 0)`` and a bool mask's conversion are
    not vectorised (4.9 / 0.7 ms against 0.13 ms for the mask viewed as uint8 and 0.4 ms for threshold_backward,
    128x16x32x32 float32 channels-last, 2 cores)."""
    return torch.ops.aten.threshold_backward(t, mask.view(torch.uint8).to(t.dtype), 0)


class _Masked(LeanFunction):
    """:func:`_apply_mask` with a graph: linear in ``t``, its backward is itself; it keeps only the bool mask
    (ATen's threshold_backward would keep the float copy)."""

    @staticmethod
    def forward(t, mask):
        return _apply_mask(t, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _masked(grad, mask), None


def _masked(t, mask):
    """:func:`_apply_mask`, differentiable in ``t`` where grad mode records a graph (a legacy-batched ``t``, inside
    an ``is_grads_batched`` backward, takes ATen's differentiable op: a Function would save the batch wrappers)."""
    if torch.is_grad_enabled() and t.requires_grad and not _batched(t):
        return _Masked.apply(t, mask)
    return _apply_mask(t, mask)


def _recompute_input(h, mean, invstd, weight, bias, mask):
    """``relu(batch_norm(h))`` from the batch norm's input, its batch statistics and affine parameters, and the
    ReLU's mask: the values to rounding (the mask exactly, so the same units are on). Differentiable in all of
    them where grad mode is on (a create-graph weight gradient, e.g. a penalty on parameter gradients)."""
    shape = [1, -1] + [1] * (h.dim() - 2)
    scale = invstd if weight is None else invstd * weight  # promotes to the statistics' (accumulation) dtype
    shift = -mean * scale if bias is None else bias - mean * scale
    y = torch.addcmul(shift.reshape(shape), h, scale.reshape(shape)).to(h.dtype)
    return _masked(y, mask)


class _RecomputedInputConv2d(LeanFunction):
    """:class:`_Conv2d` for an input ``a = relu(batch_norm(h))`` that it does not keep: it saves the recipe
    ``(h, mean, invstd, weight, bias, mask)``, which the batch norm and the ReLU keep anyway. The input-gradient
    VJPs take a's shape and layout from h (the same); the weight gradient recomputes a (:func:`_recompute_input`)."""

    @staticmethod
    def forward(x, w, b, p, recipe):
        return F.conv2d(x, w, b, *p)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _x, w, b, p, recipe = inputs
        ctx.save_for_backward(w, *recipe)
        ctx.p = p
        ctx.has_bias = b is not None
        _mark_inputs(ctx, inputs)

    @staticmethod
    def backward(ctx, grad_out):
        w, h, *recipe = ctx.saved_tensors
        p = ctx.p
        need_x, need_w, need_b = _needed(ctx)[:3]
        if torch.is_grad_enabled() and not _batched(grad_out):  # create_graph: pieces with their own rules
            gx = _ConvInputGrad.apply(grad_out, w, h, p) if need_x else None
            gw = _ConvWeightGrad.apply(grad_out, _recompute_input(h, *recipe), w, p) if need_w else None
            gb = grad_out.sum(dim=(0, 2, 3)) if need_b else None
            return gx, gw, gb, None, None
        x = _recompute_input(h, *recipe) if need_w else h  # grad_input only needs the shape
        gx, gw, gb = _conv_bw(grad_out, x, w, p, [need_x, need_w, need_b], bias=ctx.has_bias)
        return gx, gw, gb, None, None


# ----------------------------------------------------------------------------------------------
# estimators
# ----------------------------------------------------------------------------------------------
def jacobian_hutchinson_sq(model, x, *, n_proj: int = 1, generator=None):
    """:func:`jsigr_fast.reference.jacobian_hutchinson_sq` with train-mode BatchNorm's tangent from the
    fused ops instead of a decomposed norm. InstanceNorm / LayerNorm (whose native forward-mode rule is
    also wrong under reverse mode) are still decomposed. Several probes ride on one forward pass where
    :data:`BATCH_PROBES` says so (see :func:`_hutchinson_batched`); same draws as the reference."""
    model = _checks.unwrap_parallel(model)
    x0 = x.detach()
    if _use_batched_probes(model, x0, n_proj):
        start = generator.get_state() if generator is not None else _checks.rng_state(x0.device)
        zs = [_checks.randn(x0.shape, like=x0, generator=generator) for _ in range(n_proj)]
        sq = _hutchinson_batched(model, x, zs)
        if sq is not None:
            return sq / n_proj
        # one pass per probe, each drawn just before its pass as the reference draws them (a random
        # forward draws from the same global state in between)
        if generator is not None:
            generator.set_state(start)
        else:
            _checks.set_rng_state(x0.device, start)
    return _hutchinson_loop(model, x, [None] * n_proj, generator=generator) / n_proj


def _hutchinson_loop(model, x, zs, *, generator=None):
    """Sum over the probes of ``||J z||^2`` per sample, one forward-mode pass per probe; a probe given
    as None is drawn just before its pass (the reference's order of draws). The primal is a copy of x
    (:func:`jsigr_fast.reference._jvp_forward_mode`), so the result is differentiable in x when x
    requires grad and x is never written."""
    n = x.shape[0]
    total = None
    with torch.enable_grad(), frozen_running_stats(model), decomposed_normalization():
        for z in zs:
            if z is None:
                z = _checks.randn(x.shape, like=x.detach(), generator=generator)
            try:
                with fused_layers(forward_ad=True):
                    jz = reference._jvp_forward_mode(model, x, z)
            except NotImplementedError as exc:
                # a layer without a usable jvp rule: the reference's fallback, with the reference's layers
                # (its J z is differentiated a third time, which the fused batch-norm ops do not support)
                warnings.warn(f"hutchinson: forward-mode AD unsupported by a layer ({exc}); using the double-VJP JVP",
                              RuntimeWarning)
                jz = reference._jvp_double_vjp(model, x, z)
            sq = reference.tangent_sq_norm(jz.reshape(n, -1), x)
            total = sq if total is None else total + sq
    return total


def _use_batched_probes(model, x, n_proj) -> bool:
    least = BATCH_PROBES.get(x.device.type)
    return least is not None and n_proj >= least and _deterministic_forward(model) and not _seen(_NO_VMAP, model)


def _hutchinson_batched(model, x, zs):
    """Sum over the probes ``zs`` of ``||J z||^2`` per sample from **one** forward pass carrying all the
    tangents: ``torch.func.vmap`` over the tangent of ``torch.func.jvp``. The primal forward (and, in
    the reverse pass, its backward) runs once instead of once per probe; the tangent path runs batched
    (convolutions see a k-times bigger batch; the batch-norm ops run once per probe on their vmap rule).
    The layer rules are the ones of the per-probe passes, so values and parameter gradients are the
    same to rounding. Returns None when the probes need passes of their own: after a warning when a
    layer cannot run under vmap (a custom autograd.Function without a vmap rule, an op without a
    batching rule), silently when the forward draws random numbers or writes buffers (the reference's
    passes draw and write once per probe; :class:`_ForwardEffects`, whose buffers are then restored).
    The model is remembered either way, so later calls go straight to the per-probe passes, which
    the caller runs with the same draws. The primal is a copy of x (differentiable in x when x requires grad)."""
    n = x.shape[0]
    effects = _ForwardEffects(model, x.device, snapshot=True)
    # conv2d cannot switch layouts inside vmap (no channels-last clone rule there), so an NCHW input
    # and every probe come in channels-last already (CHANNELS_LAST); an input of another layout keeps
    # it, as the first conv of the per-probe passes would (a transposed x made channels-last would
    # fail a view the model's plain forward takes). Either way the primal is a copy of x (the
    # relayout of an NCHW x is one): jvp's primal aliases it, and a model that writes into its input
    # in place would otherwise write into x.
    relaid = _relayout(x)
    xp = x.contiguous(memory_format=torch.channels_last) if relaid else _checks.private_input(x)
    # each probe laid out as the primal (a channels-last input: channels-last probes), as make_dual
    # lays out a tangent; stacked here so vmap slices them so
    z = _checks.stacked_in_layout(zs, xp)

    def tangent(t):
        out, jz = torch.func.jvp(model, (xp,), (t,))
        _checks.check_logits(out, None, n)
        return jz

    try:
        with torch.enable_grad(), frozen_running_stats(model), decomposed_normalization(), \
                fused_layers(forward_ad=True) as mode:
            mode.relaid = relaid
            jz = torch.func.vmap(tangent)(z)
    except torch.OutOfMemoryError:
        effects.undo()
        raise  # not a missing rule: one pass per probe would hold as many activations
    except ForwardADUnsupported:
        effects.undo()
        _remember(_NO_VMAP, model)
        return None  # the per-probe passes take their double-VJP fallback (and say so)
    except (RuntimeError, NotImplementedError) as exc:
        effects.undo()
        if "random operation" in str(exc):  # vmap refuses to draw: a random forward, not a missing rule
            _remember(_IMPURE, model)
            return None
        _remember(_NO_VMAP, model)
        warnings.warn(f"hutchinson: the {len(zs)} probes cannot share one forward pass ({exc}); "
                      "running one forward-mode pass per probe", RuntimeWarning)
        return None
    if effects.seen():
        effects.undo()
        _remember(_IMPURE, model)
        return None
    return reference.tangent_sq_norm(jz.reshape(len(zs), n, -1), x).sum(dim=0)


def _batched_vjps(logits, xg, cotangents, grad_scale):
    """``[J^T c for c in cotangents]`` in one vmapped backward pass (graphs kept)."""
    cot = torch.stack(cotangents)
    g = reference.vjp(logits, xg, cot, grad_scale=grad_scale, is_grads_batched=True)
    return list(g.unbind(0))


def _use_batched(x) -> bool:
    return BATCH_VJPS.get(x.device.type, False)


def _use_loss_head(logits) -> bool:
    # under autocast, F.cross_entropy runs in float32 whatever the logits' dtype: keep ATen's there
    dev = logits.device.type
    return (LOSS_HEAD.get(dev, False) and not torch.is_autocast_enabled(dev)
            and ops._has_kernel("cross_entropy_cotangent", logits.device))


# ----------------------------------------------------------------------------------------------
# the selective mask
# ----------------------------------------------------------------------------------------------
def _plain_adaptor(saliency, g_hat) -> bool:
    """A SaliencyAdaptor whose forward is the stock one (no subclass override, no hooks), in g_hat's
    dtype and device and channel count: its map is exactly what ops.adaptor_saliency_mask computes.
    Anything else (including a wrong channel count, whose error message the module owns) runs the module."""
    from .saliency import SaliencyAdaptor

    if not isinstance(saliency, SaliencyAdaptor) or type(saliency).forward is not SaliencyAdaptor.forward:
        return False
    conv = saliency.conv
    if (saliency._forward_hooks or saliency._forward_pre_hooks or conv._forward_hooks or conv._forward_pre_hooks
            or type(conv) is not nn.Conv2d or conv.groups != 1 or tuple(conv.kernel_size) != (1, 1)
            or tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1)):
        return False
    channels = 1 if g_hat.dim() == 2 else g_hat.shape[1]
    return (g_hat.dim() >= 2 and channels == saliency.channels and conv.weight.dtype == g_hat.dtype
            and conv.weight.device == g_hat.device and not torch.is_autocast_enabled(g_hat.device.type))


def make_mask(saliency, g_hat, x, *, beta, quantile):
    """:func:`jsigr_fast.reference.make_mask` with the fused mask ops; returns a **bool** mask with the
    same features (bit-identical for the default saliency and for precomputed or callable maps; for a
    stock :class:`~jsigr_fast.SaliencyAdaptor`, up to features whose map lies within rounding of the
    threshold, see ``ops.adaptor_saliency_mask``)."""
    from .saliency import compute_saliency

    if saliency is None or (isinstance(saliency, str) and saliency == "gradient"):
        return ops.gradient_saliency_mask(g_hat, beta, quantile)
    if g_hat is not None and _plain_adaptor(saliency, g_hat):
        conv = saliency.conv
        return ops.adaptor_saliency_mask(g_hat, conv.weight, conv.bias, beta, quantile, normalize=saliency.normalize)
    M = compute_saliency(saliency, g_hat, x)
    if not M.is_floating_point():  # e.g. an integer map: the reference's rule (it converts), as bool
        return reference.make_mask(M, None, x, beta=beta, quantile=quantile) != 0
    return ops.threshold_mask(M, beta, quantile)


def _jsigr_reverse(model, x, y, *, lambda_m, lambda_j, mask, n_proj, generator, sq_norm, grad_scale):
    """:func:`jsigr_fast.reference.jsigr` with the projection estimator (or ``lambda_j = 0``), step for
    step, with the per-sample norms of the projections from the compiled kernel and, where
    :data:`LOSS_HEAD` is on, the fused CE + cotangent. Same random draws in the same order."""
    xg, logits = reference.forward(model, x, y)
    head = lambda_m > 0 and _use_loss_head(logits)
    if head:
        per_sample, r = ops.cross_entropy_cotangent(logits, y)
    else:
        per_sample = F.cross_entropy(logits, y, reduction="none")
    ce = per_sample.mean()
    out = {"ce": ce, "logits": logits}
    loss = ce
    if lambda_m > 0:
        g = (reference.vjp(logits, xg, r, grad_scale=grad_scale) if head
             else reference.vjp(per_sample.sum(), xg, grad_scale=grad_scale))
        out["sig"] = sq_norm(g, mask).mean()
        loss = loss + lambda_m * out["sig"]
    if lambda_j > 0:
        n, k = logits.shape
        total = logits.new_zeros(n)
        for _ in range(n_proj):
            v = reference.unit_sphere(n, k, like=logits, generator=generator)
            u = reference.vjp(logits, xg, v, grad_scale=grad_scale)
            total = total + k * ops.masked_sq_norm(u, None)
        out["jac"] = (total / n_proj).mean()
        loss = loss + lambda_j * out["jac"]
    out["loss"] = loss
    return out


# ----------------------------------------------------------------------------------------------
# the regularizers
# ----------------------------------------------------------------------------------------------
def jsigr(model, x, y, *, lambda_m, lambda_j, eps, mask, jacobian, n_proj, generator, sq_norm=_sq_norm,
          grad_scale=None):
    """:func:`jsigr_fast.reference.jsigr`, fused (see the module docstring)."""
    if jacobian == "hutchinson" and lambda_j > 0 and _can_share_forward(model):
        try:
            return _jsigr_hutchinson_shared(model, x, y, lambda_m=lambda_m, lambda_j=lambda_j, mask=mask,
                                            n_proj=n_proj, generator=generator, sq_norm=sq_norm, grad_scale=grad_scale)
        except ForwardADUnsupported as exc:
            # a layer found only during the forward (a functional F.multi_head_attention_forward call):
            # the batch-norm layers before it have already updated their running statistics once
            # (the random state and the probe's generator are back where the call found them)
            warnings.warn(f"hutchinson: {exc}; this step runs the JVP separately (double-VJP), and the "
                          "BatchNorm layers before that layer update their running statistics twice", RuntimeWarning)
    if jacobian == "hutchinson" and lambda_j > 0:  # and the training forward cannot carry the tangent
        with torch.enable_grad(), fused_layers():
            out = reference.jsigr(model, x, y, lambda_m=lambda_m, lambda_j=0.0, eps=eps, mask=mask,
                                  jacobian=jacobian, n_proj=n_proj, generator=generator, sq_norm=sq_norm,
                                  grad_scale=grad_scale)
        # its own forward-mode pass, outside the reverse-mode rules above
        out["jac"] = jacobian_hutchinson_sq(model, x, n_proj=n_proj, generator=generator).mean()
        out["loss"] = out["loss"] + lambda_j * out["jac"]
        return out
    with torch.enable_grad(), fused_layers():
        if not (_use_batched(x) and lambda_m > 0 and lambda_j > 0 and jacobian == "projection"):
            if jacobian == "projection" or lambda_j == 0:
                return _jsigr_reverse(model, x, y, lambda_m=lambda_m, lambda_j=lambda_j, mask=mask, n_proj=n_proj,
                                      generator=generator, sq_norm=sq_norm, grad_scale=grad_scale)
            return reference.jsigr(model, x, y, lambda_m=lambda_m, lambda_j=lambda_j, eps=eps, mask=mask,
                                   jacobian=jacobian, n_proj=n_proj, generator=generator, sq_norm=sq_norm,
                                   grad_scale=grad_scale)
        # one backward pass for the CE input gradient and the n_proj projections
        xg, logits = reference.forward(model, x, y)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        ce = per_sample.mean()
        n, k = logits.shape
        r = torch.softmax(logits, dim=1) - F.one_hot(y, k).to(logits.dtype)  # d sum_n l_n / d logits
        vs = [reference.unit_sphere(n, k, like=logits, generator=generator) for _ in range(n_proj)]
        grads = _batched_vjps(logits, xg, [r] + vs, grad_scale)
        sig = sq_norm(grads[0], mask).mean()
        jac = sum(k * u.reshape(n, -1).pow(2).sum(dim=1) for u in grads[1:]) / n_proj
        jac = jac.mean()
        return {"ce": ce, "logits": logits, "sig": sig, "jac": jac, "loss": ce + lambda_m * sig + lambda_j * jac}


# Models whose forward was seen (by _ForwardEffects) to draw from the global random state or to write a
# buffer other than a norm layer's running statistics, keyed weakly by the module, with the training
# flags they were seen under: their Hutchinson probes need forwards of their own, as in the reference.
_IMPURE: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()
# Models (and training flags) whose batched-probe pass failed for want of a vmap rule: not retried.
_NO_VMAP: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _seen(cache, model) -> bool:
    return model.training in cache.get(model, ())


def _remember(cache, model) -> None:
    cache.setdefault(model, set()).add(model.training)


class _ForwardEffects:
    """What a forward did besides computing: drew from the global random state (CPU, and x's CUDA
    device), or wrote a buffer other than a norm layer's running statistics. The reference runs the
    Hutchinson tangent in a forward of its own (running statistics frozen), so for a model that does
    either (``F.dropout`` without a module, ``nn.RReLU``, ``torch.rand`` in ``forward``; spectral norm's
    power iteration, any buffer a forward updates) that forward's effects are part of the result and a
    shared or batched forward would give other values, buffers and random stream. Norm running
    statistics are left out: a training forward writes them once in either path. ``undo`` restores the
    random state and (with ``snapshot=True``) the watched buffers."""

    _RUNNING = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, model, device, *, snapshot: bool = False):
        self.buffers = [(b, b._version) for m in _modules(model) for name, b in m._buffers.items()
                        if b is not None and not (name in self._RUNNING and isinstance(m, nn.modules.batchnorm._NormBase))]
        self.saved = [b.clone() for b, _ in self.buffers] if snapshot else None
        self.device = device
        self.rng = _checks.rng_state(device)

    def seen(self) -> bool:
        return (any(b._version != v for b, v in self.buffers)
                or not _checks.same_rng_state(self.rng, _checks.rng_state(self.device)))

    def undo(self) -> None:
        _checks.set_rng_state(self.device, self.rng)
        with torch.no_grad():
            for (b, version), old in zip(self.buffers, self.saved or ()):
                if b._version != version:
                    b.copy_(old)


def _modules(model) -> list:
    """``model.modules()`` without ``named_modules``' bookkeeping (a shared submodule comes twice):
    this runs on every step, where the generator costs ~4x as much (ResNet-20: ~40 us)."""
    out, stack = [], [model]
    while stack:
        m = stack.pop()
        out.append(m)
        stack.extend(c for c in m._modules.values() if c is not None)
    return out


def _deterministic_forward(model, modules=None) -> bool:
    """No active dropout module (whose masks the reference draws afresh in each forward), and not
    seen drawing random numbers or writing buffers in an earlier call (:class:`_ForwardEffects`)."""
    if _seen(_IMPURE, model):
        return False
    return not any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
                   for m in (modules if modules is not None else _modules(model)))


def _can_share_forward(model) -> bool:
    """The Hutchinson tangent can ride on the training forward unless the model is DDP/DP-wrapped (the
    reference runs its JVP on the unwrapped module), draws random numbers or writes buffers in its
    forward (dropout: the reference's separate JVP forward draws its own masks; a model that does so
    without a dropout module is found out by the first shared forward, see
    :func:`_jsigr_hutchinson_shared`), or has a layer whose tangent cannot be differentiated again
    (nn.MultiheadAttention: the JVP then takes the double-VJP fallback, which needs a forward of its
    own; see jsigr_fast.higher_order)."""
    if _checks.unwrap_parallel(model) is not model:
        return False
    modules = _modules(model)
    if any(isinstance(m, nn.MultiheadAttention) for m in modules):
        return False
    return _deterministic_forward(model, modules)


def _jsigr_hutchinson_shared(model, x, y, *, lambda_m, lambda_j, mask, n_proj, generator, sq_norm, grad_scale):
    """J-SIGR with the Hutchinson estimator, its first JVP carried by the training forward itself.

    The reference runs a separate forward (primal + tangent) for ``J z`` and differentiates both; here
    the tangent ``z`` rides on the forward that also gives the CE and the input gradient, so the primal
    forward and its backward are shared: 11 conv units instead of 14 (SPEC.md cost model). Same values
    and gradients as the reference: the batch statistics, the random draws (``z`` is the first draw from
    ``generator`` after the mask, as in the reference) and the running-statistics update are the same.
    Extra draws (``n_proj > 1``) run their own forward-mode pass (one per draw as in the reference, or
    one for all of them where :data:`BATCH_PROBES` says so).

    A forward that draws random numbers or writes buffers (:class:`_ForwardEffects`) is the reference's
    training forward only: it draws from the random state the call found (``z`` is drawn first but the
    state is wound back), and its tangent is dropped; the probes then run their own passes, as in the
    reference, and the model is remembered so that later calls do not carry a tangent for nothing.
    """
    n = x.shape[0]
    dev = x.device
    xg = reference.input_leaf(x)
    start = _checks.rng_state(dev) if generator is None else generator.get_state()
    z = _checks.randn(x.shape, like=x.detach(), generator=generator)
    if generator is None:
        # the reference draws z after its training forward, from the state that forward left; this
        # forward draws (if at all) from the state z was drawn from, as the reference's does
        after_z = _checks.rng_state(dev)
        _checks.set_rng_state(dev, start)
    effects = _ForwardEffects(model, dev)
    with torch.enable_grad():
        try:
            with decomposed_normalization(), fused_layers(forward_ad=True), fwAD.dual_level():
                # the dual's primal is a copy of the leaf (make_dual aliases its primal, on which an
                # in-place first op would be refused); make_dual lays the tangent out as that copy
                xp = _checks.private_input(xg)
                out = _checks.check_logits(model(fwAD.make_dual(xp, z)), y, n)
                unpacked = fwAD.unpack_dual(out)
                logits = unpacked.primal
                jz = unpacked.tangent if unpacked.tangent is not None else torch.zeros_like(logits)
        except ForwardADUnsupported:
            # the caller's fallback draws the probe (and any dropout masks) as the reference does
            if generator is None:
                _checks.set_rng_state(dev, start)
            else:
                generator.set_state(start)
            raise
        if effects.seen():
            _remember(_IMPURE, model)
            jz = None
            if generator is not None:
                generator.set_state(start)  # the probes are drawn again, after this forward
        elif generator is None:
            _checks.set_rng_state(dev, after_z)  # as if z had been drawn after the forward
        with fused_layers():
            per_sample = F.cross_entropy(logits, y, reduction="none")
            ce = per_sample.mean()
            res = {"ce": ce, "logits": logits}
            loss = ce
            if lambda_m > 0:
                g = reference.vjp(per_sample.sum(), xg, grad_scale=grad_scale)
                res["sig"] = sq_norm(g, mask).mean()
                loss = loss + lambda_m * res["sig"]
        if jz is None:  # every probe in a forward of its own
            sq = jacobian_hutchinson_sq(model, x, n_proj=n_proj, generator=generator) * n_proj
        else:
            sq = reference.tangent_sq_norm(jz.reshape(n, -1), x)
            if n_proj > 1:
                sq = sq + jacobian_hutchinson_sq(model, x, n_proj=n_proj - 1, generator=generator) * (n_proj - 1)
        res["jac"] = (sq / n_proj).mean()
        res["loss"] = loss + lambda_j * res["jac"]
    return res


def input_gradient_penalty(model, x, y, *, mask=None, sq_norm=_sq_norm, grad_scale=None):
    """:func:`jsigr_fast.reference.input_gradient_penalty`, fused."""
    with torch.enable_grad(), fused_layers():
        return reference.input_gradient_penalty(model, x, y, mask=mask, sq_norm=sq_norm, grad_scale=grad_scale)


def jacobian_norm(model, x, *, estimator="exact", n_proj=1, generator=None, coupled=None, grad_scale=None):
    """:func:`jsigr_fast.reference.jacobian_norm`, fused."""
    if estimator == "hutchinson":
        per = jacobian_hutchinson_sq(model, x, n_proj=n_proj, generator=generator)
        return {"jac": per.mean(), "per_sample": per}
    with torch.enable_grad(), fused_layers():
        return reference.jacobian_norm(model, x, estimator=estimator, n_proj=n_proj, generator=generator,
                                       coupled=coupled, grad_scale=grad_scale)
