"""Graceful stop on SIGTERM (preemption, ``kill``, torchrun shutting down) and SIGINT (Ctrl-C).

The handler only records the signal; the trainer finishes the step in flight, writes a
checkpoint, and exits with ``128 + signum`` (143 for SIGTERM). A second Ctrl-C interrupts at once.
"""
from __future__ import annotations

import signal
import sys
import threading

__all__ = ["StopSignal"]


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing the current step, then writing a checkpoint",
              file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)
