"""Integer seed mixing shared by the loader and :class:`Synthetic`."""
from __future__ import annotations

__all__ = ["mix_seed"]

_MASK = 0xFFFFFFFFFFFFFFFF


def mix_seed(*parts: int) -> int:
    """Hash integers into a seed in ``[0, 2**63)`` (splitmix64 finaliser applied per part).

    Deterministic across processes and Python versions (no ``hash()``); nearby inputs such as
    ``(seed, epoch, i)`` and ``(seed, epoch, i + 1)`` give unrelated seeds, and ``(0, 1)`` differs
    from ``(1, 0)``.
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & _MASK)) * 0xBF58476D1CE4E5B9) & _MASK
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK
        h ^= h >> 29
        h = (h + 0x9E3779B97F4A7C15) & _MASK
    return h & 0x7FFFFFFFFFFFFFFF
