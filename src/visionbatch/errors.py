"""The errors a user is meant to see: one family, each kind with its exit status.

The command line maps an error to its one line and its status by type
(``VisionbatchError.exit_status``); anything outside the family is a failure no
message foresaw: one line naming it, the traceback in the log, never a usage error
(pyarrow's ``ArrowInvalid`` is a ``ValueError``, and is no mistake of the user's).
A leaf module: every other module may raise these.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class VisionbatchError(Exception):
    """An error whose message is the one line the user sees."""

    exit_status = EXIT_FAILED


class UsageError(VisionbatchError, ValueError):
    """An option, argument or input file the user can correct (also a ValueError, as
    Python's API has always raised for a bad argument)."""

    exit_status = EXIT_USAGE


class JobError(VisionbatchError):
    """A job cannot run, or cannot go on. Raised in a committed run's work, the driver
    adds what was kept and how to go on, unless there is nothing to resume
    (``resumable=False``: an input that changed, an empty one)."""

    def __init__(self, message: str = "", resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable


class JobInterrupted(JobError):
    """Ctrl-C, SIGTERM or SIGHUP stopped the job; the message says what was kept."""

    exit_status = EXIT_INTERRUPTED


class SourceError(VisionbatchError):
    """An input that cannot be read (missing, unreachable, not what it claims to be)."""


class ModelLoadError(VisionbatchError):
    """A model that cannot be loaded (or may not be: pickled weights, remote code)."""


class DestinationError(VisionbatchError):
    """DEST (or OUT) cannot be written or read as a visionbatch output."""


class Superseded(DestinationError):
    """A newer job holds DEST: this one may no longer write there (fencing)."""
