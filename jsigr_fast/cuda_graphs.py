"""A whole training step captured once as a CUDA graph and replayed: one launch per step.

At CIFAR sizes a GPU like the H200 runs a regularised step's kernels faster than the host issues
them: Python, autograd bookkeeping and one dispatch per kernel set the step's time
(bench/results/gpu_session_h200_2026-11-23.md; bench/bench_overhead.py counts that work). A CUDA
graph records the step's kernels at capture and replays them with one launch, so the host work is
paid once. The library's losses are capturable: they read nothing back to the host while a stream is
being captured (their input checks move to :class:`GraphedStep`, before each replay)::

    loss_fn = functools.partial(jsigr_fast.loss, backend="fused")
    step = jsigr_fast.graphed_step(model, optimizer, loss_fn, x0, y0)   # x0, y0: one batch
    for x, y in loader:                                                   # batches of x0's shape
        loss = step(x, y)        # copies x, y into the graph's inputs and replays the step

A replay runs exactly the kernels captured, so everything decided on the host is fixed at capture:
shapes, dtypes and device of x and y; the model's structure and train/eval modes; the loss's
arguments; the optimizer's hyperparameters (a learning-rate schedule must change a tensor ``lr``
in place, as ``torch.optim``'s ``capturable`` optimizers allow; a changed Python value raises here
instead of being silently ignored). Random draws (noise, projections) are fresh at every replay
(PyTorch's graph-safe generator), from the default CUDA generator: a loss given its own
``generator`` cannot be captured. A step that reads a value on the host (``.item()``, ``bool(t)``,
a GradScaler's inf check) cannot be captured either: the capture fails with PyTorch's error; nor a
loss that winds the random state back (``mode="fd"``, the fused Hutchinson estimator), refused with
one that says what to use instead. ``simulate=True`` (:func:`simulated_capture`) tries all of this on
any device.

Without an optimizer (``graphed_step(model, None, ...)``) the graph is the loss and its backward
only, and each call leaves fresh gradients in ``.grad`` for the caller's clipping, finiteness check
and optimizer step, which then run eagerly: a training loop that skips non-finite steps keeps doing so.

The warm-up steps before the capture (cuDNN's algorithm choice, lazily created optimizer state) run
on the example batch and are then undone: parameters, buffers and optimizer state are restored,
optimizer state the warm-up created is zeroed (as a first step finds it; for SGD with dampening the
first step differs by the dampening factor). Untested on a GPU so far: bench/gpu_session.sh `graphs`
runs the GPU tests (tests/test_cuda_graphs.py -m gpu) and times eager against graphed steps.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import _checks

__all__ = ["GraphedStep", "graphed_step", "simulated_capture", "SimulatedGraph", "CaptureError"]


class CaptureError(RuntimeError):
    """The step could not be captured; ``reason`` is the underlying error, in one line."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(
            f"{reason}. A capturable step reads nothing back to the host while it runs: no .item(), bool(tensor) "
            "or printing of tensors, no GradScaler, Adam/AdamW with capturable=True, the default CUDA generator; "
            "jsigr_fast's losses skip their host-side checks while capturing")


def graphed_step(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, *, warmup: int = 3, check_inputs: bool = True,
                 simulate: bool = False) -> "GraphedStep":
    """Capture ``zero_grad; loss_fn(model, x, y).backward(); optimizer.step()`` as a CUDA graph.

    Args:
        model: the module ``loss_fn`` trains, on a CUDA device.
        optimizer: its optimizer (Adam/AdamW need ``capturable=True``; SGD works as is), or None to
            capture the loss and its backward only: each call then leaves fresh gradients in the
            parameters' ``.grad`` (not accumulated across calls) for the caller's own clipping,
            finiteness check and optimizer step, which run eagerly (a few kernels).
        loss_fn: ``(model, x, y) -> scalar loss``, e.g. ``functools.partial(jsigr_fast.loss, backend="fused")``.
        x, y: an example batch (CUDA tensors) with the shapes and dtypes of every later batch.
        warmup: eager steps before the capture (undone afterwards; see the module's docstring).
        check_inputs: before each replay, check that x is finite and every label lies in [0, K) (one
            device sync per step, as the eager loss's checks cost); the losses cannot check inside a graph.
        simulate: no graph: every call runs the step eagerly as a capture would see it
            (:class:`SimulatedGraph`), on any device. For trying a training loop on the CPU before a
            GPU run: a step that reads the host fails here as its capture would. No faster than eager.

    Returns:
        A :class:`GraphedStep`; ``step(x, y)`` trains one step on a new batch (or, without an optimizer,
        computes its gradients) and returns its loss.
    """
    return GraphedStep(model, optimizer, loss_fn, x, y, warmup=warmup, check_inputs=check_inputs,
                       _graph_factory=SimulatedGraph if _checks.check_bool("simulate", simulate) else None)


class GraphedStep:
    """One training step as a CUDA graph (see :func:`graphed_step`)."""

    def __init__(self, model, optimizer, loss_fn, x, y, *, warmup: int = 3, check_inputs: bool = True,
                 _graph_factory=None):
        _checks.check_model(model)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, x, y), got {type(loss_fn).__name__}")
        _checks.check_input(x, model)
        _checks.check_labels(y, x.shape[0], x.device)
        self.warmup = _checks.check_int("warmup", warmup, low=1)
        self.check_inputs = _checks.check_bool("check_inputs", check_inputs)
        # _graph_factory: tests run the plumbing on the CPU with a stand-in for torch.cuda.CUDAGraph
        if _graph_factory is None and not x.is_cuda:
            raise ValueError(f"x is on {x.device}: CUDA graphs need the model and the batch on a CUDA device "
                             "(call the loss directly elsewhere)")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self._modules = list(model.modules())  # walked once: each call compares their modes
        self._modes = [m.training for m in self._modules]
        self._hyper = _hyperparameters(optimizer) if optimizer is not None else []
        self._static_x = x.detach().clone()
        self._static_y = y.detach().clone()
        self._num_classes = None
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._graph = self._capture(_graph_factory)

    # ---- capture ----
    def _zero_grad(self):
        (self.optimizer or self.model).zero_grad(set_to_none=True)

    def _run(self) -> tuple:
        """The step; returns the graph's outputs: the loss and the gradients."""
        self._zero_grad()
        loss = self.loss_fn(self.model, self._static_x, self._static_y)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
            raise ValueError("loss_fn must return a scalar loss tensor with a graph to the parameters, got "
                             f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        loss.backward()
        grads = [p.grad for p in self._params]
        if self.optimizer is not None:
            self.optimizer.step()
        return (loss.detach(), *grads)

    def _capture(self, graph_factory):
        saved = _snapshot(self.model, self.optimizer)
        hook = self.model.register_forward_hook(self._record_classes)
        cuda = graph_factory is None
        try:
            if cuda:
                # warm up on a side stream, as torch.cuda.graph's own capture stream is one
                current = torch.cuda.current_stream(self._static_x.device)
                side = torch.cuda.Stream(device=self._static_x.device)
                side.wait_stream(current)
                try:
                    with torch.cuda.stream(side):
                        for _ in range(self.warmup):
                            self._run()
                finally:
                    current.wait_stream(side)
            else:
                for _ in range(self.warmup):
                    self._run()
            hook.remove()
            self._zero_grad()
            graph = self._capture_step(graph_factory)
        except BaseException:  # the caller's model and optimizer as they were
            hook.remove()
            _restore(self.model, self.optimizer, saved, captured=False)
            self._zero_grad()
            raise
        _restore(self.model, self.optimizer, saved, captured=True)
        for p in self._params:  # the captured gradients hold nothing until the first replay
            p.grad = None
        return graph

    def _capture_step(self, graph_factory):
        try:
            if graph_factory is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._outputs = self._run()
            else:  # the stand-in runs the step now and again at each replay, into the same output tensors
                graph = graph_factory()
                self._outputs = graph.capture(self._run)
        except Exception as e:
            raise CaptureError(f"capturing the training step as a CUDA graph failed ({type(e).__name__}: {e})") from e
        return graph

    def _record_classes(self, module, args, out):
        if self._num_classes is None and isinstance(out, torch.Tensor) and out.dim() == 2:
            self._num_classes = out.shape[1]

    # ---- replay ----
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Train one step on ``(x, y)``; returns the step's loss (a fresh 0-d tensor, detached)."""
        self._check_batch(x, "x", self._static_x)
        self._check_batch(y, "y", self._static_y)
        self._check_unchanged()
        if self.check_inputs:
            self._check_values(x, y)
        with torch.no_grad():
            self._static_x.copy_(x)
            self._static_y.copy_(y)
        self._graph.replay()
        # the graph writes its gradients into the tensors captured as .grad: hand them back (after a
        # zero_grad(set_to_none=True), .grad would stay None, and a caller's optimizer step do nothing)
        for p, g in zip(self._params, self._outputs[1:]):
            p.grad = g
        return self._outputs[0].clone()  # the static output is overwritten by the next replay

    @staticmethod
    def _check_batch(t, name, static):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != static.shape or t.dtype != static.dtype or t.device != static.device:
            raise ValueError(f"{name} must match the captured batch: shape {tuple(static.shape)}, {static.dtype} on "
                             f"{static.device}; got shape {tuple(t.shape)}, {t.dtype} on {t.device} (a graph replays "
                             "fixed shapes: capture another step for another batch size, or drop the last batch)")

    def _check_unchanged(self):
        modes = [m.training for m in self._modules]
        if modes != self._modes:
            raise RuntimeError("the model's train/eval modes changed since the capture; the graph replays the "
                               "captured ones: call model.train() / model.eval() back, or capture a new step")
        now = _hyperparameters(self.optimizer) if self.optimizer is not None else []
        if now != self._hyper:
            changed = sorted({k for a, b in zip(now, self._hyper) for k in a if a.get(k) != b.get(k)})
            raise RuntimeError(f"the optimizer's {', '.join(changed) or 'param groups'} changed since the capture; "
                               "the graph replays the captured values: change a tensor lr in place (capturable "
                               "optimizers take lr=torch.tensor(...)), capture a new step, or graph the loss and "
                               "backward only (optimizer=None) and step the optimizer eagerly")

    def _check_values(self, x, y):
        k = self._num_classes  # None where the model's output was not (N, K) logits: the lower bound only
        bad = (y < 0) if k is None else (y < 0) | (y >= k)
        flags = torch.stack([~torch.isfinite(x).all(), bad.any()]).tolist()  # the one host read
        if flags[0]:
            raise ValueError("x contains NaN or infinite values")
        if flags[1]:
            raise ValueError(f"labels must lie in [0, {'K' if k is None else k}) for the captured model; got values "
                             f"{sorted(set(y[bad].tolist()))[:8]}")


def _hyperparameters(optimizer) -> list[dict]:
    """The param groups' settings as the graph sees them: Python values by value, tensors by identity."""
    return [{k: (("tensor", id(v)) if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups]


def _snapshot(model, optimizer):
    tensors = list(model.parameters()) + list(model.buffers())
    state = {} if optimizer is None else {
        p: {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
        for p, s in optimizer.state.items()}
    return tensors, [t.detach().clone() for t in tensors], state


@torch.no_grad()
def _restore(model, optimizer, saved, *, captured: bool):
    """Undo the warm-up in place (a captured graph keeps pointers to these tensors). Optimizer state the
    warm-up created is zeroed for a captured graph (which reads and writes it), dropped otherwise."""
    tensors, values, state = saved
    for t, v in zip(tensors, values):
        t.copy_(v)
    if optimizer is None:
        return
    for p in list(optimizer.state):
        if p not in state and not captured:
            del optimizer.state[p]
    for p, s in optimizer.state.items():
        before = state.get(p, {})
        for k, v in s.items():
            if k in before:
                if isinstance(v, torch.Tensor):
                    v.copy_(before[k])
                else:
                    s[k] = before[k]
            elif isinstance(v, torch.Tensor):
                v.zero_()  # created by the warm-up: what a first step finds (SGD's momentum, Adam's moments, step)


# ---- a capture simulated on any device ----
_aten = torch.ops.aten
# ops whose CUDA kernels read a value back to the host (a scalar, or the size of their output)
_HOST_READS = frozenset(op for op in (
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default, _aten.equal.default,
    _aten._unique.default, _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
    _aten.repeat_interleave.Tensor, _aten.argwhere.default))


class _RefuseHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is _aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if func in _HOST_READS or bool_index:
            what = "indexing with a boolean mask" if bool_index else str(func)
            raise RuntimeError(f"{what} reads a value back to the host, which a CUDA graph capture does not permit "
                               "(operation not permitted when stream is capturing; simulated capture)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def simulated_capture():
    """Run a block as a CUDA graph capture sees it, on any device: the library's losses take their
    capture path (their host-side checks skipped, as under a real capture), and an op that reads a value
    back to the host (``.item()``, ``bool(t)``, ``nonzero``, boolean-mask indexing, ``unique``...) raises
    capture's error, as does a random draw from a generator of the loss's own or a wind-back of the
    random state (the library's helpers check). What it cannot see: copies between host and device (all
    tensors are on one device here), other CUDA streams, ops whose CUDA kernel alone syncs."""
    _checks.SIMULATED_CAPTURE.depth += 1
    try:
        with _RefuseHostReads():
            yield
    finally:
        _checks.SIMULATED_CAPTURE.depth -= 1


class SimulatedGraph:
    """A stand-in for ``torch.cuda.CUDAGraph`` on any device (:func:`graphed_step` with ``simulate=True``):
    ``capture(fn)`` runs ``fn`` once under :func:`simulated_capture` and keeps its outputs; each ``replay()``
    runs it again the same way and writes the new outputs into the kept tensors, as a replay rewrites a
    graph's static tensors."""

    def capture(self, fn):
        self._fn = fn
        with simulated_capture():
            self._out = fn()
        return self._out

    def replay(self):
        with simulated_capture():
            new = self._fn()
        for old, value in zip(self._out, new):
            if old is not None:  # (a parameter the loss does not reach has no gradient)
                old.copy_(value)
