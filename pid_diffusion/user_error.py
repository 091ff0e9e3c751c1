"""A user's mistake, told apart from a bug by its type.

`UserError` is raised where a mistake in what the user asked for is detected (a file that is missing or of
the wrong format or architecture, an option value out of range, options that do not go together), with a
message that names the problem and the fix. The command lines print it as one line and exit with status 2
(`pid_diffusion/cli/errors.py`); every other exception is a bug and keeps its traceback. The library's
specific errors derive from it (`ConfigError`, `TeacherFileError`, `EDMPickleError`,
`MissingWeightsError`), each also from the built-in type it refines, so `except ValueError` still catches them.
"""

from __future__ import annotations

__all__ = ["FileFormatError", "MissingFileError", "OptionError", "UserError"]


class UserError(Exception):
    """A mistake in what the user asked for; the message names the problem and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named does not exist."""



class FileFormatError(UserError, ValueError):
    """A file that is not what the command needs: cut short, of another format, task or architecture."""


class OptionError(UserError, ValueError):
    """An option value that is out of range or does not apply to the input (e.g. classes for an
    unconditional model)."""
