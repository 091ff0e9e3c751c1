"""How the command lines report a user's mistake: one message naming the problem and the fix, no traceback.

    def main(argv=None):
        with dist.abort_on_error(), errors.reported("pid-sample"):
            parser = errors.ArgumentParser(prog="pid-sample", ...)
            ...

A user's mistake is a `UserError` (`pid_diffusion/user_error.py`), raised where the mistake is detected:
a missing file, a file of the wrong format or architecture, an option value the library rejects. It is
printed as `<prog>: error: <message>` and the process exits with status 2, argparse's status for a bad
command line; argparse's own errors take the same route (`ArgumentParser`). Under mpirun or torchrun only
rank 0 prints (every rank reads the same files and options, so every rank usually fails alike); another rank
prints its own message only if rank 0 has not ended the job within `SOLO_RANK_GRACE_S`, i.e. when the
mistake is that rank's alone. The process then ends with `os._exit`, as `dist.abort_on_error` does, so no
rank waits in a collective.

Anything else is a bug and keeps its traceback (`dist.abort_on_error` ends the job). Setting the
environment variable `PID_DEBUG=1` shows the traceback of a user's mistake too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, NoReturn

from pid_diffusion.training.checkpoint import TrainingStateWriteError
from pid_diffusion.user_error import UserError
from pid_diffusion.utils import dist

__all__ = ["DEBUG_VARIABLE", "USAGE_STATUS", "ArgumentParser", "UserError", "reported"]

DEBUG_VARIABLE = "PID_DEBUG"  # Set to 1: tracebacks for users' mistakes too.
USAGE_STATUS = 2  # argparse's exit status for a bad command line; used for every user's mistake.
SOLO_RANK_GRACE_S = 5.0  # A rank ≠ 0 waits this long for rank 0 to end the job with the same message.


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, printing usage, help and errors on rank 0 only (every rank parses the same line)."""

    def print_usage(self, file: IO[str] | None = None) -> None:
        if dist.rank() == 0:
            super().print_usage(file)

    def print_help(self, file: IO[str] | None = None) -> None:
        if dist.rank() == 0:
            super().print_help(file)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message and dist.rank() == 0:
            sys.stderr.write(message)
        raise SystemExit(status)


def _debug() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _exit(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.world_size() > 1:
        os._exit(status)  # As dist.abort_on_error: no exit handler may wait for the other ranks.
    raise SystemExit(status)


def _wait_for_rank_0() -> None:
    """On a rank ≠ 0: give rank 0 the time to report the same mistake and end the job."""
    if dist.rank() == 0:
        return
    try:
        time.sleep(SOLO_RANK_GRACE_S)
    except BaseException:  # the launcher ends this rank (rank 0 has reported): leave quietly
        os._exit(USAGE_STATUS)


@contextlib.contextmanager
def reported(prog: str) -> Iterator[None]:
    """Report a user's mistake inside the block as `<prog>: error: <message>` (see the module docstring)."""
    try:
        yield
    except dist.JobExit:  # every rank stops at the same point (preemption): no message, its own status
        raise
    except SystemExit as error:
        if error.code in (None, 0) or dist.world_size() == 1:
            raise
        _wait_for_rank_0()
        _exit(error.code if isinstance(error.code, int) else USAGE_STATUS)  # argparse has printed (rank 0)
    except (UserError, TrainingStateWriteError) as error:  # the latter: a failed write, the last state intact
        if _debug():
            raise
        _wait_for_rank_0()
        prefix = "" if dist.rank() == 0 else f"[rank {dist.rank()}] "
        print(f"{prefix}{prog}: error: {error}", file=sys.stderr)
        _exit(USAGE_STATUS)
