"""``metadata.json`` of a run and ``RunHandle``, the live run's record: status, progress, events.

Rank rule, kept here: every rank has a ``RunHandle``; only global rank 0 prints and writes. A failed write
(a full disk) is reported, never fatal: the checkpoints are the truth and a resume rewrites metadata from
them.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.runs.layout import RunLayout

if TYPE_CHECKING:
    from trainer.config.changes import Change
    from trainer.config.schema import TrainConfig
from trainer.storage.atomic import append_to, atomic_write_json
from trainer.storage.json_files import read_json_file
from trainer.storage.paths import real_folder

STATUSES = ("running", "completed", "failed", "interrupted")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_metadata(
    *,
    number: int | None = None,
    kind: str,
    experiment: str,
    dataset: str,
    num_classes: int,
    world_size: int,
    distributed: str,
    precision: str | None = None,
) -> dict[str, Any]:
    stamp = now()
    return {
        "run_number": number,
        "kind": kind,
        "experiment": experiment,
        "dataset": {"name": dataset, "num_classes": num_classes},
        "status": "running",
        "created_at": stamp,
        "updated_at": stamp,
        "world_size": world_size,
        "distributed": distributed,
        "precision": precision,
        "epochs_total": None,
        "epochs_completed": 0,
        "global_step": 0,
        "best": None,
        "checkpoints": [],
        "history": [],
        "resumes": [],
        "events": [],
    }


class MalformedMetadata(ValueError):
    """A ``metadata.json`` that is JSON, but not of the shape the trainer writes."""


_TEXT = ("kind", "experiment", "status", "created_at", "updated_at", "distributed", "precision", "run_key")
_COUNTS = ("run_number", "world_size", "epochs_completed", "global_step", "epochs_total")
_RECORDS = (
    "dataset",
    "best",
    "forked_from",
    "init_from",
    "base_checkpoint",
    "config_summary",
    "trackers",
    "launch",
)
_LISTS = ("checkpoints", "history", "resumes", "events", "attempts")
_FIELDS: dict[str, type] = {
    **dict.fromkeys(_TEXT, str),
    **dict.fromkeys(_COUNTS, int),
    **dict.fromkeys(_RECORDS, dict),
    **dict.fromkeys(_LISTS, list),
}
"""The type of every field the tool reads (or null); list fields hold objects (``checkpoints``: numbers)."""


def read_metadata(run: Path) -> dict[str, Any]:
    """A run's ``metadata.json``, read as data from someone else (``read_json_file``) and checked against the
    shape the trainer writes (``_FIELDS``); ``FileNotFoundError``, or ``ValueError`` saying what is wrong
    (``MalformedMetadata`` for JSON of another shape)."""
    data = read_json_file(run / "metadata.json")
    if not isinstance(data, dict):
        raise MalformedMetadata("it does not hold an object")
    for key, kind in _FIELDS.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MalformedMetadata(f"{key} is a {type(value).__name__}, not a {kind.__name__}")
        if isinstance(value, int) and value < 0:
            raise MalformedMetadata(f"{key} is negative")
        if isinstance(value, list):
            item = int if key == "checkpoints" else dict
            if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                raise MalformedMetadata(f"{key} holds something other than {item.__name__}s")
    return data


def write_metadata(run: Path, metadata: dict[str, Any]) -> None:
    """Atomically replace ``metadata.json`` (global rank 0 only)."""
    metadata["updated_at"] = now()
    atomic_write_json(run / "metadata.json", metadata)


def new_branch(record: dict[str, Any] | None) -> dict[str, Any]:
    """The trackers record of a run that went back to an earlier checkpoint (or a fork's first): a new wandb
    run (its id made on first use) that names the one it branched from, and a TensorBoard folder of its own,
    so the abandoned branch never mixes into the continued curve."""
    record = dict(record or {})
    return {"branch": int(record.get("branch") or 0) + 1, "branched_from": record.get("wandb_id")}


class RunHandle:
    """The run being trained: its layout, and its record for every rank (only global rank 0 writes)."""

    def __init__(self, layout: RunLayout, *, is_main: bool) -> None:
        self.layout, self.is_main = layout, is_main
        self.path, self.number = layout.path, layout.number
        self.metadata: dict[str, Any] = read_metadata(layout.path) if is_main else {}

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        if self.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into metadata.json."""
        if self.is_main:
            self.metadata.update(fields)
            try:
                write_metadata(self.path, self.metadata)
            except OSError as e:
                self.warn(f"could not update {self.layout.metadata}: {e.strerror or e}")

    def record_progress(self, progress: dict[str, Any], kept: list[int]) -> None:
        """Counters, history and best from the trainer's state (``TrainState.state_dict()``) and the
        epoch checkpoints on disk."""
        self.update(
            epochs_completed=progress["epoch"],
            global_step=progress["global_step"],
            history=list(progress["history"]),
            best=progress["best"],
            checkpoints=kept,
        )

    def record_checkpoints(self, epochs: list[int]) -> None:
        """The epoch checkpoints on disk, after a save committed (and retention dropped what it drops)."""
        self.update(checkpoints=epochs)

    def record_event(self, kind: str, **fields: Any) -> None:
        """Append to ``events``: fallbacks, restarts, world-size changes, interruptions, failed saves."""
        if self.is_main:
            self.update(events=[*self.metadata.get("events", []), {"at": now(), "kind": kind, **fields}])

    def record_save(self, record: dict[str, Any]) -> None:
        """One line of ``logs/events.jsonl`` for a finished save (read by ``make bench``)."""
        if not self.is_main:
            return
        try:
            real_folder(self.layout.logs, self.layout.path)
            with append_to(self.layout.events) as f:
                f.write(json.dumps({"at": now(), "event": "save", **record}) + "\n")
        except OSError as e:
            self.warn(f"could not append to {self.layout.events}: {e.strerror or e}")

    def record_resume(self, *, checkpoint: str | None, progress: dict[str, Any], world_size: int,
                      distributed: str, precision: str) -> None:  # fmt: skip
        if not self.is_main:
            return
        resumes = [
            *self.metadata.get("resumes", []),
            {
                "at": now(),
                "from_epoch": progress["epoch"],
                "global_step": progress["global_step"],
                "checkpoint": checkpoint,
                "world_size": world_size,
                "distributed": distributed,
                "precision": precision,
            },
        ]
        # The checkpoint is the truth: metadata written after it may be behind (a crash between the two).
        self.update(
            status="running",
            resumes=resumes,
            world_size=world_size,
            distributed=distributed,
            precision=precision,
            epochs_completed=progress["epoch"],
            global_step=progress["global_step"],
            history=list(progress["history"]),
            best=progress["best"],
        )

    def record_changes(self, changes: list[Change], config: TrainConfig, *, step: int, how: str) -> None:
        """Announce each accepted change of the config (``how``: "on resume", "in this fork"), record them as
        one event, and keep the listing's summary true."""
        if not changes:
            return
        for c in changes:
            self.print(f"Changed {how}: {c.key} {c.old!r} -> {c.new!r} (from step {step})")
        self.record_event("config_changed", global_step=step,
                          changes=[{"key": c.key, "old": c.old, "new": c.new} for c in changes])  # fmt: skip
        summary = {**self.metadata.get("config_summary", {}), "learning_rate": config.learning_rate,
                   "batch_size": config.batch_size, "model": config.model.name, "seed": config.seed}  # fmt: skip
        self.update(config_summary=summary, experiment=config.experiment)

    def record_attempt(self, key: str, job: dict[str, Any]) -> None:
        """Append to ``attempts`` (``--auto-resume``): this launch of the job, and how the previous one ended."""
        if not self.is_main:
            return
        attempts = list(self.metadata.get("attempts") or [])
        previous = None
        if attempts:
            status = self.metadata.get("status")
            stops = [
                e for e in self.metadata.get("events") or [] if e.get("kind") in ("interrupted", "peer_lost")
            ]
            previous = {
                "running": "killed or lost (it never recorded an end)",
                "interrupted": f"stopped by {stops[-1].get('signal', 'a stop signal')} at step "
                f"{stops[-1].get('global_step')}"
                if stops
                else "interrupted",
            }.get(str(status), str(status))
        attempts.append(
            {"attempt": len(attempts) + 1, "at": now(), "key": key, **job, "previous_ended": previous}
        )
        self.update(attempts=attempts)

    def finish(self, status: str) -> None:
        assert status in STATUSES, status
        self.update(status=status)
