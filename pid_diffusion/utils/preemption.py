"""Preemption: a signal asks the job to stop after the step in flight, with a checkpoint of that step.

Schedulers end a job with a signal some time before they kill it: SLURM sends SIGTERM at preemption and
at the time limit (or, with `--signal=USR1@120`, SIGUSR1 120 s before it), Kubernetes SIGTERM before its
grace period ends, Ctrl-C sends SIGINT. `SignalFlag` catches the signals of `run.preempt_signals` on every
rank; the training loop sums the flags of all ranks in the all-reduce it runs each step anyway, so every
rank stops after the same step, rank 0 writes the checkpoint of that step and every rank exits with
`PREEMPTED_EXIT_CODE`. A requeue script tells it from a failure (any other non-zero status) and re-runs the
same command, which resumes exactly. A second signal exits at once with 128 + its number (the shell's
status for a death by signal), writing nothing; the earlier checkpoints stay intact. One request often
arrives along several routes at nearly the same time (a SLURM cancellation signals every process of the job,
and srun forwards the signal it gets to the tasks as well; the launch scripts forward theirs), so signals
within `SAME_REQUEST_S` of the first count as that request, not as a second one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

from pid_diffusion.utils import dist

__all__ = ["PREEMPTED_EXIT_CODE", "SAME_REQUEST_S", "STOP_SIGNALS", "Preempted", "SignalFlag", "StopAtOnce",
           "check_signal_names"]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL of sysexits.h: "a temporary failure; try again later".
# Signals this soon after the first are copies of it delivered along other routes (srun's forward, slurmd's
# own, a launch script's), which arrive within milliseconds (more on a loaded machine); a person's second
# Ctrl-C comes later, and a launch script ends the job at once on its own second signal.
SAME_REQUEST_S = 1.0
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")  # A scheduler's preemption, Ctrl-C, and what launchers forward.
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
        self._first_at = 0.0
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
        if self.received is not None and time.monotonic() - self._first_at < SAME_REQUEST_S:
            return
        if self.received is not None:
            os.write(2, f"[rank {dist.rank()}] second signal ({name}): exiting now without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received, self._first_at = name, time.monotonic()
        self._announce(name)

    def _announce(self, name: str) -> None:
        os.write(2, f"[rank {dist.rank()}] {name}: finishing the step in flight, writing its checkpoint, then "
                    f"exiting with status {PREEMPTED_EXIT_CODE} (a second signal exits at once)\n".encode())


class StopAtOnce(SignalFlag):
    """For commands with no step to finish (sampling, FID): the first signal stops the command at once by
    raising `Preempted` in the main thread; what it wrote before is complete (files are written atomically,
    and a re-run of `pid-fid` evaluates only what its table lacks)."""

    def __init__(self, names: tuple[str, ...], prog: str):
        super().__init__(names)
        self.prog = prog

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        super()._handle(signum, frame)  # A second signal exits here; a copy of the first returns.
        if first:
            raise Preempted()

    def _announce(self, name: str) -> None:
        if dist.rank() == 0:
            os.write(2, f"{self.prog}: stopped by {name}; the files it completed are kept, re-run the same command "
                        f"to continue (exit status {PREEMPTED_EXIT_CODE})\n".encode())
