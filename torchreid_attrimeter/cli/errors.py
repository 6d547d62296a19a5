"""The one way the command-line tools end: an exit status and, on failure, one ``error: ...`` line.

    0  done
    2  input the tool cannot use: an ``AttriMeterError`` (a config key, a data, checkpoint or weights
       file, an image, an output folder, ...), a missing input (FileNotFoundError), an output that
       would replace something (FileExistsError), or a tool's own ``raise SystemExit("message")``
    1  any other OSError, package errors included (``ReportWriteError``): the system failed the
       tool, e.g. a full disk or a failed rename, and the same command may work once that is fixed

Anything else is a bug and keeps its traceback. argparse's own exits (``--help``, a usage error)
pass through: argparse has printed its message and chosen the status (2 for a usage error).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from torchreid_attrimeter.errors import AttriMeterError

BAD_INPUT = 2
SYSTEM_FAILURE = 1


def exit_status(error: BaseException) -> int | None:
    """The exit status for ``error``, or None when it is not one the tools report in one line.

    A write failure is an OSError whatever else it is, so the OSError test comes before the
    AttriMeterError one: a full disk is status 1 in every tool, whichever module raised it.
    """
    if isinstance(error, (FileNotFoundError, FileExistsError)):
        return BAD_INPUT
    if isinstance(error, OSError):
        return SYSTEM_FAILURE
    if isinstance(error, AttriMeterError):
        return BAD_INPUT
    return None


def error_line(error: BaseException) -> str:
    """One line for the user. An error raised in a DataLoader worker reaches here re-raised with the
    worker's traceback as its message; its last line is the original message."""
    text = str(error).strip()
    if isinstance(error, OSError) and error.errno and error.strerror and error.filename is None:
        text = error.strerror  # our own messages carry an errno for callers, not for the user
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return f"error: {text}"


def run_tool(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a tool's ``main(argv)`` and return its exit status (see the module docstring)."""
    try:
        main(argv)
    except SystemExit as refusal:
        if not isinstance(refusal.code, str):
            raise
        print(f"error: {refusal.code}", file=sys.stderr)
        return BAD_INPUT
    except Exception as error:
        status = exit_status(error)
        if status is None:
            raise
        print(error_line(error), file=sys.stderr)
        return status
    return 0
