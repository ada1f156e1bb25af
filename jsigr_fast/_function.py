"""``LeanFunction``: ``torch.autograd.Function`` without the per-call signature binding.

``Function.apply`` of a Function with a separate ``setup_context`` binds its arguments to
``inspect.signature(forward)`` on every call, to fill in default arguments: ~25 Python calls each time.
The fused path applies such Functions (conv and ReLU rules, batch norm, the double backward's
pieces) ~150 times per ResNet-20 J-SIGR step, and on a GPU at CIFAR sizes the step's time is
largely the host's: measured on the 2-core CPU at tiny shapes (bench/bench_overhead.py), the binding
was a third of the fused step's Python calls. Our forwards take positional arguments without defaults,
so the binding is the identity: ``LeanFunction.apply`` skips it. Inside ``torch.func`` transforms and
``torch.compile`` tracing it is ``Function.apply`` unchanged (those paths need the full protocol).
"""
from __future__ import annotations

import torch
from torch._C._functorch import unwrap_if_dead

__all__ = ["LeanFunction"]


class LeanFunction(torch.autograd.Function):
    """A ``torch.autograd.Function`` whose ``apply`` skips the default-argument binding (see the module
    docstring). Subclasses must not give ``forward`` default arguments or call ``apply`` with keywords."""

    @classmethod
    def apply(cls, *args, **kwargs):
        if kwargs or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            return super().apply(*args, **kwargs)
        # what Function.apply does outside transforms, after its binding: the C++ apply (on the arguments
        # unwrap_dead_wrappers gives, by a list comprehension: its generator costs a Python frame per argument)
        return super(torch.autograd.Function, cls).apply(*[unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a
                                                            for a in args])
