"""SIGTERM / SIGINT during training: finish the step, save, tell how to resume.

    with StopSignals() as stop:
        while ...:
            step()
            if stop.requested():      # the signal number, agreed by every process, or None
                save(); break

Cloud TPU and most schedulers preempt a job with SIGTERM and kill it a while later; Ctrl-C
sends SIGINT. Inside the context the first of either only sets a flag, which the loop reads
after each step; a second SIGINT stops at once (KeyboardInterrupt). In a multi-process run
every process must stop after the same step (the save is collective), so `requested()` takes
the maximum of the flags of all processes, one tiny all-gather per step. The handlers are
installed only in the main thread and restored on exit.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM / SIGINT -> a request to stop after the current step (a context manager)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def requested(self) -> int | None:
        """The signal to stop on (the same on every process), or None."""
        local = int(self.signum or 0)
        if jax.process_count() > 1:
            local = int(np.max(multihost_utils.process_allgather(np.int32(local))))
        return local or None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15, ..."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
