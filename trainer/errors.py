"""The exceptions the command-line entry points turn into one clear message and an exit code."""

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

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


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C inside the block is held until the block ends, then raised as ``KeyboardInterrupt``; if the block
    failed meanwhile (a compiler the same Ctrl-C stopped), the interrupt is raised instead of its error.

    For a start-up's imports: an interrupt inside an import can leave a module half-initialised, and the
    next use of it fails with an error of its own (numpy recurses until ``RecursionError``) and a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    except BaseException:
        if held:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


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
