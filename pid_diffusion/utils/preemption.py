"""Preemption: a signal asks the job to stop after the step in flight, with a checkpoint of that step.

Schedulers end a job with a signal some time before they kill it: SLURM sends SIGTERM at preemption and
at the time limit (or, with `--signal=USR1@120`, SIGUSR1 120 s before it), Kubernetes SIGTERM before its
grace period ends, Ctrl-C sends SIGINT. `SignalFlag` catches the signals of `run.preempt_signals` on every
rank; the training loop sums the flags of all ranks in the all-reduce it runs each step anyway, so every
rank stops after the same step, rank 0 writes the checkpoint of that step and every rank exits with
`PREEMPTED_EXIT_CODE`. A requeue script tells it from a failure (any other non-zero status) and re-runs the
same command, which resumes exactly. A second signal exits at once with 128 + its number (the shell's
status for a death by signal), writing nothing; the earlier checkpoints stay intact.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from pid_diffusion.utils import dist

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "SignalFlag", "check_signal_names"]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL of sysexits.h: "a temporary failure; try again later".
_UNCATCHABLE = ("SIGKILL", "SIGSTOP")


class Preempted(dist.JobExit):
    """Every rank stopped after the same step on a signal; the checkpoint of that step is complete."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


def check_signal_names(names: tuple[str, ...]) -> list[str]:
    """The names among `names` that are not catchable signals of this platform (for the config check)."""
    return [name for name in names if name not in signal.Signals.__members__ or name in _UNCATCHABLE]


class SignalFlag:
    """While entered, the first of `names` received sets `received`; a second signal ends the process.

    Handlers can only be installed in the main thread; elsewhere (a notebook's worker thread) the flag
    stays unset and signals keep their previous effect.
    """

    def __init__(self, names: tuple[str, ...]):
        self.signals = [signal.Signals[name] for name in names]
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> SignalFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        # os.write, not print: a handler that interrupts a print to the same stream must not re-enter it.
        if self.received is not None:
            os.write(2, f"[rank {dist.rank()}] second signal ({name}): exiting now without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received = name
        os.write(2, f"[rank {dist.rank()}] {name}: finishing the step in flight, writing its checkpoint, then "
                    f"exiting with status {PREEMPTED_EXIT_CODE} (a second signal exits at once)\n".encode())
