"""Preemption: SIGTERM / SIGUSR1 stop a training run at the next step boundary, with a checkpoint.

Schedulers announce the end of a job with a signal: Slurm sends SIGTERM on ``scancel`` and at
preemption (then SIGKILL after ``KillWait``, 30 s by default), and the signal chosen with
``--signal=[B:]USR1@<seconds>`` that long before the time limit; torchrun forwards the SIGTERM it
receives to its workers and kills them 30 s later. The first SIGTERM or SIGUSR1 only sets a flag
(:class:`StopSignals`); the training loop reads it once per step, all ranks agree through the
step's one all-reduce, and every rank saves ``checkpoints/last.pt`` at the step reached and
raises :class:`~predet.errors.Preempted` (exit status 128 + the signal's number: 143 for SIGTERM,
138 for SIGUSR1, as a shell reports a process the signal ended). A second signal ends the process
at once, as if no handler were installed; one that comes within :data:`REPEAT_WINDOW_S` of the
first is the same request delivered twice and is ignored (Slurm signals every process of a job
step, and torchrun forwards the SIGTERM it got to its workers: each worker receives both copies).

DataLoader workers ignore both signals (:func:`ignore_stop_signals`, their ``worker_init_fn``): a
scheduler signals every process of the job, and a worker that died of it would fail the very
batch the main process needs to reach its checkpoint. The workers end with the main process.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any, Optional

__all__ = ["STOP_SIGNALS", "REPEAT_WINDOW_S", "StopSignals", "ignore_stop_signals", "exit_status"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_WINDOW_S = 1.0  # a stop signal this soon after the first is a copy of it, not a second one


def exit_status(signum: int) -> int:
    """The process's exit status after a stop on ``signum``: 128 + its number (143 for SIGTERM)."""
    return 128 + int(signum)


def ignore_stop_signals(*_: Any) -> None:
    """Ignore SIGTERM / SIGUSR1 in this process (a DataLoader worker: the main process stops the
    run and then the workers). Accepts and ignores a worker id, to serve as ``worker_init_fn``."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """A context in which the first SIGTERM / SIGUSR1 is recorded in :attr:`signum` instead of
    ending the process; a second one ends it at once. The previous handlers come back on exit.

    Outside the main thread (where Python cannot install handlers) it records nothing and the
    signals keep their previous behaviour.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if now - self._first_at < REPEAT_WINDOW_S:  # the launcher's copy of the first one
            return
        # the second signal: the default action (the process ends by it), now
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(signum)
