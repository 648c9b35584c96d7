"""What the figures read of a finished trainer run: when its epochs ended (its stdout, stamped by the
launcher: only the parent can stamp lines on a process's running clock), its saves
(``logs/events.jsonl``, one JSON line per finished save, written by rank 0) and its epoch history
(``metadata.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchError
from benchmarks.launching import Launch, epoch_stamps
from trainer.runs.layout import RunLayout


@dataclass(frozen=True)
class Save:
    """One line of a run's ``logs/events.jsonl``: a finished save."""

    tag: str
    """``epoch_003`` or ``step_0000012``."""
    global_step: int
    nbytes: int
    """Every file of the checkpoint."""
    blocked_seconds: float
    """Training blocked by this save, including the wait for the previous one."""
    write_seconds: float
    """From the start of the save to its commit."""
    background: bool

    @property
    def is_epoch(self) -> bool:
        return self.tag.startswith("epoch_")

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Save:
        return cls(
            tag=str(event["tag"]),
            global_step=int(event["global_step"]),
            nbytes=int(event["bytes"]),
            blocked_seconds=float(event["blocked_seconds"]),
            write_seconds=float(event["write_seconds"]),
            background=bool(event["background"]),
        )


def read_saves(layout: RunLayout) -> list[Save]:
    """The saves ``layout``'s run recorded, in the order they finished."""
    path = layout.events
    if not path.is_file():
        raise BenchError(f"{path} does not exist: the trainer recorded no finished save")
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Save.from_event(e) for e in events if e.get("event") == "save"]


@dataclass
class TrainerRun:
    layout: RunLayout
    epoch_stamps: list[float]
    """Seconds after launch (or of running clock) at which each "Epoch N/M" line arrived."""
    saves: list[Save]
    history: list[dict[str, Any]]
    """``metadata.json``'s per-epoch history."""

    @property
    def path(self) -> Path:
        """The run folder (``<root>/base_training/run_001``)."""
        return self.layout.path

    @property
    def epoch_saves(self) -> list[Save]:
        return [s for s in self.saves if s.is_epoch]


def trainer_run(result: Launch, root: Path, kind: str = "base") -> TrainerRun:
    """The first run of ``kind`` (base, lora) under the checkpoint root ``root``, made by the launch ``result``."""
    layout = RunLayout.of(root, kind, 1)
    history = json.loads(layout.metadata.read_text())["history"]
    return TrainerRun(layout, epoch_stamps(result), read_saves(layout), history)
