"""The run folder's `log.txt`: everything a training command prints, also written to a file, as EDM's
`dnnlib.util.Logger` keeps one.

Rank 0 replaces `sys.stdout` and `sys.stderr` by streams that write to the terminal (or the batch job's log)
and append to `<run>/log.txt`, flushed line by line, so the file is complete up to the last line printed when a
job is killed. A resumed run appends to the same file. Blob stores cannot append: a run folder on gs:// or
az:// keeps no log.txt (the batch system's log and metrics.jsonl remain).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from typing import TextIO

from pid_diffusion.utils import dist, fileio

__all__ = ["LOG_FILE", "tee_output"]

LOG_FILE = "log.txt"


class _Tee:
    """A text stream writing to `stream` and to `file`."""

    def __init__(self, stream: TextIO, file: TextIO):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.file.write(text)
        if "\n" in text:
            self.file.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def isatty(self) -> bool:  # Progress bars ask the terminal, not the file.
        return self.stream.isatty()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_output(folder: str) -> Iterator[None]:
    """On rank 0 and a local `folder`, copy stdout and stderr to `folder/log.txt` for the duration."""
    if dist.rank() != 0 or not fileio.is_local(folder):
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOG_FILE), "a", encoding="utf-8") as file:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, file), _Tee(sys.stderr, file)
        try:
            yield
        except BaseException as error:
            if not (isinstance(error, SystemExit) and not error.code):
                traceback.print_exc(file=file)  # The terminal gets it from Python once the stream is restored.
            raise
        finally:
            sys.stdout, sys.stderr = saved
