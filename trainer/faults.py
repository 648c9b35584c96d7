"""Fault injection for the crash tests: pause, signal or fail writes at named points of a run.

Used only by tests (``tests/test_faults.py``); inert unless ``DIFFIT_FAULTS`` is set. A spec is a
``;``-separated list of ``ACTION@POINT[:KEY=VALUE...]``:

  ``pause@save.merge:step=6``      at that point, write ``$DIFFIT_FAULT_MARKER`` and sleep until killed
                                   (the test then cuts the power: SIGKILL of every process of the launch)
  ``signal@step:step=5:rank=1``    rank 1 sends itself SIGTERM after optimizer step 5 (a preemption)
  ``enospc@write:tag=epoch_002``   checkpoint writes of that checkpoint fail with ENOSPC (a full disk)

Points: ``step`` (after an optimizer step), ``save.shards`` (state written, not yet renamed),
``save.merge`` (state renamed, merged file not yet written), ``save.manifest`` (files written, manifest not
yet), ``save.retention`` (committed, retention not yet run), ``metadata`` (before metadata.json is written),
``write`` (a checkpoint file written but not yet renamed into place; ``enospc`` applies to every write).
Filters: ``step`` (global step), ``tag``, ``rank``. Each fault fires once per process.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from functools import cache
from pathlib import Path

ENV = "DIFFIT_FAULTS"
MARKER_ENV = "DIFFIT_FAULT_MARKER"

_fired: set[int] = set()
_local = threading.local()
"""``_local.context``: this thread's current ``tag`` and ``step``, set by the checkpoint code so that a
``write`` point can be filtered (a save's writes run in their own thread)."""


@cache
def _faults() -> list[tuple[str, str, dict[str, str]]]:
    spec = os.environ.get(ENV, "")
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        head, *filters = item.split(":")
        action, _, point = head.partition("@")
        faults.append((action, point, dict(f.split("=", 1) for f in filters)))
    return faults


def set_context(**values: object) -> None:
    if _faults():
        _local.context = {**getattr(_local, "context", {}), **{k: str(v) for k, v in values.items()}}


def point(name: str, **values: object) -> None:
    """Called at each named point; does nothing unless a configured fault matches here."""
    if not _faults():
        return
    context = getattr(_local, "context", {})
    here = {**context, **{k: str(v) for k, v in values.items()}, "rank": os.environ.get("RANK", "0")}
    for index, (action, where, filters) in enumerate(_faults()):
        if where != name or index in _fired or any(here.get(k) != v for k, v in filters.items()):
            continue
        _fired.add(index)
        if action == "pause":
            marker = os.environ.get(MARKER_ENV)
            if marker:
                Path(marker).write_text(f"{name} {here}\n")
            while True:
                time.sleep(1)
        elif action == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "enospc":
            _fired.discard(index)  # a full disk stays full for every write of that checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected by a test)")
