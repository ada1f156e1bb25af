"""Per-device settings (the ``{"cpu": ..., "cuda": ...}`` tables of :mod:`jsigr_fast.fused` and
:mod:`jsigr_fast.ops`) overridden for a block: what the install check, the benchmarks' ablations and
the host-work benchmark all do with them."""
from __future__ import annotations

from contextlib import contextmanager

__all__ = ["device_setting"]

_MISSING = object()


@contextmanager
def device_setting(table: dict, device_type: str, value):
    """``table[device_type] = value`` inside the block; the entry (or its absence) restored afterwards."""
    before = table.get(device_type, _MISSING)
    table[device_type] = value
    try:
        yield
    finally:
        if before is _MISSING:
            del table[device_type]
        else:
            table[device_type] = before
