"""One line, not a traceback, when a command-line script meets a user's mistake (a missing file, a bad value).

Scripts run their ``main`` through ``exit_on_user_error`` (console scripts through ``entry_point(main)``): the errors our code raises for bad input
(``FileNotFoundError``, ``ValueError`` and their kin, each message naming the file or option and what would be
valid) end the process with ``error: <message>`` and exit status 2. Anything else is a bug and keeps its
traceback; ``LIT_OVERTOK_TRACEBACK=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without the quotes ``str`` adds)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split()) or type(error).__name__


def exit_on_user_error(main: Callable[..., Any], argv: Optional[list[str]] = None) -> Any:
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
