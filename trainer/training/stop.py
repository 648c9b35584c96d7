"""Stop signals: SIGTERM, SIGINT or SIGUSR1 on any rank ask training to stop at the next step boundary.

The handler only sets a flag (and says so on stderr, on global rank 0); the checkpoint manager's step-end
collective makes every rank agree on it, a checkpoint of that moment is committed, and the run ends as
``interrupted`` with exit code 0. A second signal only repeats the notice.

A worker started by a launcher (torch elastic, under ``accelerate launch``) also watches it: when the
launcher dies (kill -9, a crash), the worker is re-parented, and within ``WATCH_SECONDS`` it treats that like
a stop signal, so that no worker trains on, unseen, after its launcher is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
LAUNCHER_GONE = 1000
"""The stop reason of a worker whose launcher died (not a signal number)."""
WATCH_SECONDS = 1.0


class StopSignals:
    """Catches the stop signals while in use as a context manager (main thread only, as Python requires)."""

    def __init__(self, watch_launcher: bool | None = None, *, announce: bool = True) -> None:
        self.signal: int | None = None
        """The signal received (or agreed with the other ranks), or ``LAUNCHER_GONE``, if any."""
        self._previous: dict[int, Any] = {}
        if watch_launcher is None:  # a torch elastic worker: its parent is the launcher's agent
            watch_launcher = "TORCHELASTIC_RESTART_COUNT" in os.environ
        self._launcher = os.getppid() if watch_launcher else None
        self._done = threading.Event()
        self._announce = announce
        """Whether this process says on stderr that a signal came (one rank of a launch does: Ctrl-C reaches
        every worker, and the run's last line names the signal whichever rank got it)."""

    @property
    def name(self) -> str:
        if self.signal == LAUNCHER_GONE:
            return "the launcher's death"
        return signal.Signals(self.signal).name if self.signal is not None else "a stop signal"

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        if self._launcher is not None:
            self._done.clear()
            threading.Thread(target=self._watch, name="launcher-watch", daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:  # fmt: skip
        self._done.set()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _watch(self) -> None:
        while not self._done.wait(WATCH_SECONDS):
            if os.getppid() != self._launcher:
                if self.signal is None:
                    self.signal = LAUNCHER_GONE
                    note = (f"\nThe launcher (process {self._launcher}) is gone: saving a resumable checkpoint "
                            "after this step, then stopping\n")  # fmt: skip
                    with contextlib.suppress(OSError):
                        os.write(2, note.encode())
                return

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            note = f"\nReceived {name}: saving a resumable checkpoint after this step, then stopping\n"
        else:
            note = (
                f"\nReceived {name} again: still stopping; the checkpoint being written is completed first\n"
            )
        if self._announce:
            os.write(2, note.encode())  # not print(): a handler may interrupt a print in progress
