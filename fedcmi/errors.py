"""The one base of every error fedcmi raises on purpose, and the exit codes the command line gives them.

A :class:`FedcmiError` is a condition fedcmi recognised (a bad setting, damaged data, a diverged run, a
busy folder): the command line prints its message after ``fedcmi: error:`` and exits with the class's
:attr:`~FedcmiError.exit_code`, never with a traceback. Anything else reaching the command line is a bug.
Each module keeps its own subclasses (the reference page of exit codes lists them all); several also
derive from the built-in exception they refine (``ValueError``, ``RuntimeError``), so code that catches
those keeps working.
"""

from __future__ import annotations

from typing import ClassVar

#: Exit codes of the command line.
EXIT_FAILURE = 1  # a run or a step that could not complete (data, files, a failed round, tracking)
EXIT_USAGE = 2  # a bad setting or flag: nothing was written
EXIT_DIVERGED = 3  # training diverged; the last good round stays checkpointed
EXIT_INTERRUPTED = 130


class FedcmiError(Exception):
    """An error fedcmi reports in one line, with :attr:`exit_code`."""

    exit_code: ClassVar[int] = EXIT_FAILURE
    #: False where the same input meets the same error again, so that retrying (a resubmitted pipeline
    #: run, a restarted step) cannot help: a bad setting, a foreign store, a diverged federation.
    retry_helps: ClassVar[bool] = True


class CommandError(FedcmiError, RuntimeError):
    """An error a command reports in one line (the command-line extensions' errors derive from it)."""


class UsageError(FedcmiError, ValueError):
    """A flag or argument a command cannot take: nothing was written."""

    exit_code = EXIT_USAGE
    retry_helps = False


#: The line a step prints before it fails on an error that retrying cannot help; whoever runs the step
#: (the pipeline driver reading its log) stops resubmitting and names the cause instead.
REFUSED = "[fedcmi] refused: "


def refusal(exc: BaseException) -> str | None:
    """The line announcing ``exc`` as a refusal that will repeat, or None when a retry may succeed."""
    if isinstance(exc, FedcmiError) and not exc.retry_helps:
        return REFUSED + (str(exc).splitlines() or [exc.__class__.__name__])[0]
    return None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line: its class and the first line of its message."""
    text = str(exc).splitlines()[0][:limit] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}"
