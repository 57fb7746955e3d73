"""One error boundary for every command-line entry point, and the error classes it maps to exit codes.

A user-caused failure (a bad flag, a missing or damaged file, an output that would clobber
something, a diverged run) ends in ONE line on stderr that names the file, line or field and
the fix, and an exit code that says which class of failure it was. A traceback appears only
for what is a bug in this program (exit code 1), or with ``--debug`` (or ``PMLM_DEBUG=1``).

Exit codes (also in the README):

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     success
1     internal error (a bug: the traceback is printed)
2     invalid usage or configuration (a flag, a config field, a value out of range)
3     an input is missing or unreadable (file not found, a folder where a file is expected, ...)
4     an input is damaged (checksum mismatch, truncated weights, corrupt tokenizer, bad JSON)
5     an output is refused or in use (would overwrite an input or a foreign folder; locked)
6     training diverged (non-finite loss or gradients for too many steps)
7     the environment lacks something (a package, a device, a backend)
8     the operating system refused a write (disk full, quota, read-only file system)
130   interrupted (a second Ctrl-C)
====  ==========================================================================================
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INPUT_MISSING = 3
EXIT_INPUT_DAMAGED = 4
EXIT_OUTPUT_REFUSED = 5
EXIT_DIVERGED = 6
EXIT_ENVIRONMENT = 7
EXIT_OS_WRITE = 8
EXIT_INTERRUPTED = 130


class PMLMError(Exception):
    """Base of this project's user-facing errors; ``exit_code`` is the CLI's exit status."""

    exit_code = EXIT_USAGE


class DamagedInputError(PMLMError, ValueError):
    """A file exists but its content is wrong: checksum or size mismatch, truncated weights,
    an unparsable tokenizer or JSON file. A ``ValueError`` so that callers catching bad input
    keep working."""

    exit_code = EXIT_INPUT_DAMAGED


class OutputRefusedError(PMLMError, ValueError):
    """Writing would destroy something the program did not write (an input, a foreign folder),
    or another run holds the output folder."""

    exit_code = EXIT_OUTPUT_REFUSED


class NonFiniteError(PMLMError, FloatingPointError):
    """Training or a model produced NaN/inf where a finite value is required."""

    exit_code = EXIT_DIVERGED


class EnvironmentUnavailableError(PMLMError, RuntimeError):
    """A requested device, backend or package is not available here."""

    exit_code = EXIT_ENVIRONMENT


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def exit_code_for(exc: BaseException) -> int:
    """The exit status of ``exc`` (:data:`EXIT_BUG` for anything not known to be the user's)."""
    if isinstance(exc, PMLMError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return EXIT_INPUT_MISSING
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return EXIT_OS_WRITE
    if type(exc).__name__ == "SafetensorError":  # safetensors' Rust error type (not importable by name)
        return EXIT_INPUT_DAMAGED
    if isinstance(exc, FloatingPointError):
        return EXIT_DIVERGED
    if isinstance(exc, ImportError):
        return EXIT_ENVIRONMENT
    if isinstance(exc, ValueError):
        return EXIT_USAGE
    return EXIT_BUG


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"  # e.g. IsADirectoryError: "out: Is a directory"
        if exc.errno in _DISK_ERRNOS:
            text += ": free space (or choose another output folder) and run the same command again"
        elif isinstance(exc, IsADirectoryError):
            text += ": a file path is expected here"
    else:
        text = str(exc) or type(exc).__name__
    if type(exc).__name__ == "SafetensorError":
        text = f"a .safetensors file is damaged or truncated ({text}): re-export or re-download it"
    return " ".join(text.split())  # one line, whatever the message held


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("PMLM_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[list[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` inside the shared error boundary and return the exit status.

    ``--debug`` is taken out of ``argv`` before ``main`` sees it; with it (or ``PMLM_DEBUG=1``)
    every error prints its traceback. Without it a user-caused error is one line
    ``error: ...`` on stderr; an unexpected exception (a bug) prints its traceback and a line
    asking for a report.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != "--debug"]
    try:
        return int(main(args) or 0)
    except SystemExit as exc:  # argparse's usage errors (2) and explicit exits
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except BaseException as exc:  # noqa: BLE001 -- the boundary: every class gets its exit code below
        code = exit_code_for(exc)
        if debug or code == EXIT_BUG:
            traceback.print_exc()
        if code == EXIT_BUG:
            print(f"internal error: {type(exc).__name__}: {_one_line(exc)} (a bug in pmlm_engine; please report it "
                  f"with the traceback above)", file=sys.stderr)
        elif code == EXIT_INTERRUPTED:
            print("interrupted", file=sys.stderr)
        else:
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        return code
