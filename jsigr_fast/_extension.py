"""Load the compiled extension ``jsigr_fast._C`` if it was built; never fail the import.

Importing ``_C`` runs its ``TORCH_LIBRARY`` initializers, which define the ``torch.ops.jsigr_fast``
namespace and register the CPU (and, where built, CUDA) kernels. When the extension is missing
or cannot be loaded (built against another torch, a CPU-only wheel, ...), the library warns once
and every op falls back to its pure-PyTorch reference.
"""
from __future__ import annotations

import warnings

import torch

_ERROR: str | None = None

try:
    from . import _C  # noqa: F401
except Exception as exc:  # ImportError, OSError (undefined symbol), ...
    _ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    """True when the compiled ops (``torch.ops.jsigr_fast.*``) are registered."""
    return _ERROR is None


def extension_error() -> str | None:
    """Why the extension could not be loaded, or None when it was."""
    return _ERROR


def has_kernel(op: str, device: torch.device | str) -> bool:
    """True when the compiled op ``torch.ops.jsigr_fast.<op>`` has a kernel for ``device``'s type."""
    if _ERROR is not None:
        return False
    device_type = torch.device(device).type
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"jsigr_fast::{op}", key)


if _ERROR is not None:
    warnings.warn(
        "jsigr_fast: the compiled extension could not be loaded, so every op uses its pure-PyTorch "
        f"reference (correct, but slower). Reason: {_ERROR}. Rebuild with "
        "`pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )
