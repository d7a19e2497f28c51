"""Stopping a run cleanly on a signal: SIGTERM (what Slurm, Kubernetes and `timeout` send),
SIGUSR1 (what schedulers send ahead of a time limit) and SIGUSR2 (submitit's preemption
signal, or the one named by SUBMITIT_PREEMPT_SIGNAL).

The handler only records the signal. The loop finishes the optimizer step it is in, the
processes of a job agree to stop after the same step, and the trainer writes a mid-epoch
checkpoint and raises `Stopped`, which the CLI reports with a resume hint and exit status
128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1, 140 for SIGUSR2). Then
`hand_on` gives the signal to the handler that was there before the run: in a submitit job,
submitit's own, which requeues the job now that the checkpoint is on disk.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGUSR1, SIGUSR2, and the preemption signal a submitit job was told to use."""
    named = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    submitit_signal = getattr(signal, named, signal.SIGUSR2)
    return tuple(dict.fromkeys((signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, submitit_signal)))


class Stopped(Exception):
    """The run stopped on `signum` after optimizer step `step`, and wrote `checkpoint`."""

    def __init__(self, signum: int, checkpoint: Path, step: int) -> None:
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name} after step {step}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The first stop signal received, if any (a signal handler)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Record the stop signals in the returned request while the block runs, instead of dying
    at once; the previous handlers come back afterwards."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be set from the main thread
        return
    previous = {signum: signal.signal(signum, request) for signum in stop_signals()}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def hand_on(signum: int) -> None:
    """Call the handler of `signum` that the run replaced, if it is a Python function.

    Under submitit that handler requeues the job (and exits); elsewhere the signal's
    handler is the default one, and the caller exits with 128 + the signal's number.
    """
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)
