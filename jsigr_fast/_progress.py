"""A progress bar for long library work (attack tables, DeepFool, per-layer Jacobians): tqdm on
stderr when asked for, else a stand-in that does nothing, so callers update it unconditionally."""
from __future__ import annotations

import sys

from . import _checks


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, *, desc: str, unit: str):
    """``tqdm(total=total)`` on stderr (cleared when done) if ``enabled``; a no-op bar otherwise."""
    if not _checks.check_bool("progress", enabled):
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
