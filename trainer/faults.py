"""Fault injection for the crash tests: pause, signal or fail writes at named points of a run.

Used only by tests (``tests/test_faults.py``, ``tests/test_preemption.py``, ``tests/test_power_cuts.py`` with
its soak test, ``tests/test_continuation.py``). The command line builds one ``Faults`` from ``DIFFIT_FAULTS``
when a launch starts and hands it to the code that has fault points; everything else gets ``NO_FAULTS``, which
does nothing. A spec is a ``;``-separated list of ``ACTION@POINT[:KEY=VALUE...]``:

  ``pause@save.merge:step=6``      at that point, write ``$DIFFIT_FAULT_MARKER`` (where, and this process's
                                   pid) and sleep until killed (the test then cuts the power: SIGKILL of
                                   every process of the launch, or of this one)
  ``signal@step:step=5:rank=1``    rank 1 sends itself SIGTERM after optimizer step 5 (a preemption)
  ``enospc@write:tag=epoch_002``   checkpoint writes of that checkpoint fail with ENOSPC (a full disk)
  ``exit@save.rendezvous:rank=1``  the process exits at once with code 9 (a machine that dies)
  ``delay@step:seconds=2``         sleep that long at every matching point (a slow run, to act on while
                                   it trains)

Points: ``step`` (after an optimizer step), ``save.shards`` (state written, not yet renamed),
``save.merge`` (state renamed, merged file not yet written), ``save.manifest`` (files written, manifest not
yet), ``save.retention`` (committed, retention not yet run), ``save.rendezvous`` (a rank's files written,
before it meets the others), ``validation`` (before each validation batch: filters ``epoch``, ``batch``
from 1), ``fid`` (before each round of an FID in training: filters ``epoch``, ``round`` from 0), ``metadata`` (before metadata.json is written after an epoch), ``write`` (a
checkpoint file about to be written, or written but not yet renamed into place; ``enospc`` applies to every
write). Filters: ``step`` (global step), ``tag``, ``rank``, ``restart`` (torch elastic's restart count of
the workers). Each fault fires once per process, except ``enospc`` and ``delay``, which fire every time.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

ENV = "DIFFIT_FAULTS"
MARKER_ENV = "DIFFIT_FAULT_MARKER"
ACTIONS = ("pause", "signal", "enospc", "exit", "delay")
REPEATING = ("enospc", "delay")
"""Actions that fire at every matching point (a full disk stays full; a slow run stays slow)."""


class Faults:
    """The faults of one process, matched against the points it passes."""

    def __init__(
        self, spec: str = "", *, rank: int = 0, marker: Path | None = None, restart: int = 0
    ) -> None:
        self.rank, self.marker, self.restart = rank, marker, restart
        self._faults = [_parse(item) for item in filter(None, (part.strip() for part in spec.split(";")))]
        self._fired: set[int] = set()
        self._lock = threading.Lock()  # the points of a background save fire on its own thread

    @classmethod
    def from_environment(cls, rank: int) -> Faults:
        marker = os.environ.get(MARKER_ENV)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        return cls(
            os.environ.get(ENV, ""), rank=rank, marker=Path(marker) if marker else None, restart=restart
        )

    @property
    def enabled(self) -> bool:
        return bool(self._faults)

    def point(self, name: str, **where: object) -> None:
        """Called at each named point with what identifies it (``step``, ``tag``); does nothing unless a
        configured fault matches here."""
        if not self._faults:
            return
        here = {**{k: str(v) for k, v in where.items() if v is not None}, "rank": str(self.rank),
                "restart": str(self.restart)}  # fmt: skip
        for index, (action, point, filters, settings) in enumerate(self._faults):
            if point != name or any(here.get(k) != v for k, v in filters.items()):
                continue
            with self._lock:
                if index in self._fired:
                    continue
                if action not in REPEATING:
                    self._fired.add(index)
            self._act(action, name, here, settings)

    def _act(self, action: str, name: str, here: dict[str, str], settings: dict[str, str]) -> None:
        if action == "pause":
            if self.marker is not None:
                self.marker.write_text(f"{name} {here} pid={os.getpid()}\n")
            while True:
                time.sleep(1)
        elif action == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "exit":
            os._exit(9)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected by a test)")
        elif action == "delay":
            time.sleep(float(settings.get("seconds", "1")))


SETTINGS = ("seconds",)
"""``KEY=VALUE`` parts that set how an action acts rather than where it fires."""


def _parse(item: str) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """(action, point, filters, settings) of one ``ACTION@POINT[:KEY=VALUE...]``."""
    head, *parts = item.split(":")
    action, _, point = head.partition("@")
    if action not in ACTIONS or not point:
        raise ValueError(f"bad fault {item!r}: expected ACTION@POINT with ACTION one of {', '.join(ACTIONS)}")
    pairs = dict(part.split("=", 1) for part in parts)
    filters = {k: v for k, v in pairs.items() if k not in SETTINGS}
    return action, point, filters, {k: v for k, v in pairs.items() if k in SETTINGS}


NO_FAULTS = Faults()
"""The hook of every run that injects nothing."""
