"""How the command lines report a user's mistake: one message naming the problem and the fix, no traceback.

    def main(argv=None):
        with dist.abort_on_error(), errors.reported("pid-sample"):
            ...

A user's mistake is an exception of `USER_ERRORS` (a missing or unreadable file, a file of the wrong
format or architecture, a refused pickle, an option value the library rejects): it is printed as
`<prog>: error: <message>` and the process exits with status 2, argparse's status for a bad command line.
Under mpirun or torchrun only rank 0 prints it (every rank reads the same files and options, so every rank
usually fails alike); another rank prints its own message only if rank 0 has not ended the job within
`SOLO_RANK_GRACE_S`, i.e. when the mistake is that rank's alone. The process then ends with `os._exit`, as
`dist.abort_on_error` does, so no rank waits in a collective.

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

from pid_diffusion.utils import dist
from pid_diffusion.checkpoint import TrainingStateWriteError, DamagedCheckpointError
from pid_diffusion.config import ConfigError
from pid_diffusion.edm_pickle import EDMPickleError
from pid_diffusion.utils.hub import MissingWeightsError
from pid_diffusion.teacher import TeacherFileError

__all__ = ["DEBUG_VARIABLE", "USAGE_STATUS", "USER_ERRORS", "UserError", "reported"]

DEBUG_VARIABLE = "PID_DEBUG"  # Set to 1: tracebacks for users' mistakes too.
USAGE_STATUS = 2  # argparse's exit status for a bad command line; used for every user's mistake.
_BARE_MESSAGE_LENGTH = 120  # Library messages that explain their fix are longer than "No such file: <path>".
SOLO_RANK_GRACE_S = 5.0  # A rank ≠ 0 waits this long for rank 0 to end the job with the same message.


class UserError(Exception):
    """A mistake in what the user asked for, raised by command-line code; its message names the fix."""


# OSError covers missing, unreadable and unwritable files (its message names the file); ValueError the
# library's checks of files and option values (TeacherFileError, ConfigError and the sampler, seed and
# class checks all derive from it). A bug that raises one of these loses its traceback unless PID_DEBUG=1.
# DamagedCheckpointError (a snapshot or training state that does not load) and TrainingStateWriteError (a write
# of the run failed, e.g. a full disk; the newest complete training state is intact) are reported alike: their
# messages name the file, the reason and what to do.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, OSError, ValueError, TeacherFileError, ConfigError, EDMPickleError, MissingWeightsError,
    DamagedCheckpointError, TrainingStateWriteError)


def _debug() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _message(error: BaseException) -> str:
    """The error's own message; a bare "file not found" gets the fix (most are relative-path slips)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = str(error) or type(error).__name__
    if isinstance(error, FileNotFoundError) and len(message) < _BARE_MESSAGE_LENGTH:
        message += f"; check the path (relative paths start at {os.getcwd()})"
    return message


def _exit(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.world_size() > 1:
        os._exit(status)  # As dist.abort_on_error: no exit handler may wait for the other ranks.
    raise SystemExit(status)


@contextlib.contextmanager
def _argparse_quiet_off_rank_0() -> Iterator[None]:
    """Usage errors and --help printed by rank 0 only (argparse prints before raising SystemExit)."""
    if dist.rank() == 0:
        yield
        return
    original = argparse.ArgumentParser._print_message
    argparse.ArgumentParser._print_message = lambda self, message, file=None: None
    try:
        yield
    finally:
        argparse.ArgumentParser._print_message = original


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
        with _argparse_quiet_off_rank_0():
            yield
    except dist.JobExit:  # every rank stops at the same point (preemption): no message, its own status
        raise
    except SystemExit as error:
        if error.code in (None, 0) or dist.world_size() == 1:
            raise
        _wait_for_rank_0()
        _exit(error.code if isinstance(error.code, int) else USAGE_STATUS)  # argparse has printed (rank 0)
    except USER_ERRORS as error:
        if _debug():
            raise
        _wait_for_rank_0()
        prefix = "" if dist.rank() == 0 else f"[rank {dist.rank()}] "
        print(f"{prefix}{prog}: error: {_message(error)}", file=sys.stderr)
        _exit(USAGE_STATUS)
