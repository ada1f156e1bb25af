"""Triton kernels of jsigr_fast, installed as ``jsigr_fast.kernels`` (never as a top-level ``kernels``).

Each module holds ``@triton.jit`` kernels (leading underscore, a comment giving the shape of every
pointer argument) and a host launcher. Nothing here is imported unless Triton is installed:
use :func:`available` to ask.
"""
from importlib.util import find_spec


def available() -> bool:
    """True when Triton can be imported (kernels then run on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    return find_spec("triton") is not None
