"""Stop signals: SIGTERM, SIGINT or SIGUSR1 on any rank ask training to stop at the next step boundary.

The handler only sets a flag (and says so on stderr); the checkpoint manager's step-end collective makes
every rank agree on it, a checkpoint of that moment is committed, and the run ends as ``interrupted`` with
exit code 0. A second signal only repeats the notice.
"""

from __future__ import annotations

import os
import signal
import threading
from types import TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """Catches the stop signals while in use as a context manager (main thread only, as Python requires)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        """The signal received (or agreed with the other ranks), if any."""
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "a stop signal"

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:  # fmt: skip
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            note = f"\nReceived {name}: saving a resumable checkpoint after this step, then stopping\n"
        else:
            note = (
                f"\nReceived {name} again: still stopping; the checkpoint being written is completed first\n"
            )
        os.write(2, note.encode())  # not print(): a handler may interrupt a print in progress
