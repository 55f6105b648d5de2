"""Bad user input and how every command reports it: one line, exit status 2, never a traceback.

``InputError`` is the one error type our code raises for bad input (a config field, an input file, a manifest or a
checkpoint); its message names the field or file and what would be valid. Every command (``train.py`` and its
``generate`` / ``export`` / ``strip``, ``prepare``, ``prepare_jobs``, ``evaluate.py``, ``speedup.py``, ``sweep.py``,
``report.py``, the lm-eval CLI) runs its ``main`` through ``exit_on_user_error`` (console scripts through
``entry_point(main)``): the errors raised for bad input (``InputError``, ``FileNotFoundError``, ``ValueError`` and
their kin, each message naming the file or option and what would be valid) end the process with ``error: <message>``
and exit status 2. Anything else is a bug and keeps its traceback; ``LIT_OVERTOK_TRACEBACK=1`` shows the traceback
of user errors too. (argparse's own usage errors keep argparse's form: usage, one error line, status 2.)
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional


class InputError(ValueError):
    """Bad input that the user can fix; the message alone says what and where."""


USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without the quotes ``str`` adds)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split()) or type(error).__name__


def exit_on_user_error(main: Callable[..., Any], argv: Optional[list[str]] = None) -> Any:
    """``main(argv)``; a user error ends the process in one line (see the module docstring)."""
    try:
        return main(argv)
    except USER_ERRORS as error:
        if os.environ.get("LIT_OVERTOK_TRACEBACK"):
            raise
        sys.stderr.write(f"error: {one_line(error)}\n")
        raise SystemExit(2) from None


def entry_point(main: Callable[..., Any]) -> Callable[[], Any]:
    """``main`` as a console script: ``exit_on_user_error(main)`` on the process's own arguments."""
    def run() -> Any:
        return exit_on_user_error(main)

    run.__doc__ = main.__doc__
    return run
