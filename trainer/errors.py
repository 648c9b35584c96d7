"""The exceptions the command-line entry points turn into one clear message and an exit code."""

import json
import os
import sys
import time
from collections.abc import Callable

from launch.errors import LaunchError, launched_rank


class UserError(Exception):
    """Bad input from the user (config, flags, run folders). ``str(e)`` says what is wrong and how to fix it."""


class Interrupted(Exception):
    """A stop signal ended training after a resumable checkpoint was saved (exit code 0)."""


class SaveFailed(Exception):
    """A checkpoint could not be written and the config says to stop (``checkpoint.on_save_error: fail``)."""


INTERRUPTED = 130
"""The exit code of a launch that Ctrl-C ended (128 + SIGINT, as a shell reports it)."""


def exit_code(command: Callable[[], int | None], *, is_main: bool | None = None) -> int:
    """Run a command-line entry point: its exit code, or 2 after one ``error: ...`` line for bad input.

    Under a multi-process launch every rank meets the same bad input; only the main process prints it
    (``is_main``; by default the process the launcher started as global rank 0).
    """
    main = launched_rank() == 0 if is_main is None else is_main
    try:
        return command() or 0
    except (UserError, LaunchError) as e:
        if main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        tell_the_launcher(f"error: {e}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training began (once it has, the run says how it ended)
        if main:
            print(
                "Interrupted (Ctrl-C) before training began: nothing to continue", file=sys.stderr, flush=True
            )
        return INTERRUPTED


def tell_the_launcher(message: str) -> None:
    """Under torch elastic (``accelerate launch``, ``torchrun``), give the launcher's failure summary this
    process's one line instead of ``error_file: <N/A>``: it reads the JSON file its ``TORCHELASTIC_ERROR_FILE``
    names (a message and a timestamp: the plainer of the two forms it accepts; ``@record`` writes the other)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as out:
            json.dump({"message": message, "timestamp": int(time.time())}, out)
    except OSError:
        pass  # the summary then says <N/A>, as without this
