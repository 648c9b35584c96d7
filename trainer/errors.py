"""The one exception type the command-line entry points turn into a clear message and exit code 2."""

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (config, flags, run folders). ``str(e)`` says what is wrong and how to fix it."""


class Interrupted(Exception):
    """A stop signal ended training after a resumable checkpoint was saved (exit code 0)."""


class SaveFailed(Exception):
    """A checkpoint could not be written and the config says to stop (``checkpoint.on_save_error: fail``)."""


def exit_code(command: Callable[[], int | None]) -> int:
    """Run a command-line entry point: its exit code, or 2 after one ``error: ...`` line for a ``UserError``.

    Under a multi-process launch every rank meets the same bad input; only global rank 0 prints it.
    """
    try:
        return command() or 0
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
