"""Run folders: allocation, resolution, ``metadata.json`` and the ``--list-runs`` table. No tensors here.

Layout: ``<checkpoint_root>/<kind folder>/run_NNN/`` with ``config.json``, ``metadata.json``, ``checkpoints/``
and ``logs/``. Folder numbers are zero-padded to three digits and keep growing (``run_1000``); they are
always compared as integers, never as strings or by file times.

Rank rule: only global rank 0 calls the functions that create or write (``allocate_run``,
``write_metadata``); the trainer broadcasts what rank 0 decided to the other ranks.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer.atomic import atomic_write_json
from trainer.errors import UserError

KIND_FOLDERS = {"base": "base_training", "lora": "lora_finetuning"}
STATUSES = ("running", "completed", "failed", "interrupted")
_RUN_NAME = re.compile(r"^run_(\d{3,})$")


class RunError(UserError):
    """A run that cannot be created, found or resumed as asked."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def kind_root(checkpoint_root: Path, kind: str) -> Path:
    return checkpoint_root / KIND_FOLDERS[kind]


def run_dir(root: Path, number: int) -> Path:
    return root / f"run_{number:03d}"


def run_numbers(root: Path) -> list[int]:
    """Numbers of the run folders under ``root``, ascending."""
    if not root.is_dir():
        return []
    numbers = []
    for entry in os.scandir(root):
        match = _RUN_NAME.match(entry.name)
        if match and entry.is_dir():
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def allocate_run(root: Path, number: int | None = None) -> int:
    """Create a new run folder and return its number (global rank 0 only).

    ``mkdir`` is atomic, so launches racing for the same number each get a distinct folder: the loser of a
    race moves on to the next number. An explicit ``number`` that exists already is refused.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".tmp-write-probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise RunError(
            f"cannot write to the checkpoint folder {root}: {e.strerror}. "
            "Choose another with --checkpoint-root or fix its permissions."
        ) from None
    if number is not None:
        try:
            run_dir(root, number).mkdir()
        except FileExistsError:
            raise RunError(
                f"run {number:03d} already exists in {root}; add --resume to continue it, "
                "or leave out --run-number to start a new run"
            ) from None
        return number
    candidate = (run_numbers(root) or [0])[-1] + 1
    while True:
        try:
            run_dir(root, candidate).mkdir()
            return candidate
        except FileExistsError:
            candidate += 1


def resolve_run(root: Path, number: int | None) -> int:
    """The run to resume: ``number``, or the newest run when None."""
    numbers = run_numbers(root)
    if number is None:
        if not numbers:
            raise RunError(f"there is no run to resume in {root}; start one without --resume")
        return numbers[-1]
    if number not in numbers:
        available = ", ".join(f"{n:03d}" for n in numbers[-10:]) or "none"
        raise RunError(f"run {number:03d} does not exist in {root} (runs there: {available})")
    return number


# --------------------------------------------------------------------------------------------------
# metadata.json
# --------------------------------------------------------------------------------------------------


def new_metadata(
    *,
    number: int,
    kind: str,
    experiment: str,
    dataset: str,
    num_classes: int,
    world_size: int,
    distributed: str,
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
        "epochs_total": None,
        "epochs_completed": 0,
        "global_step": 0,
        "best": None,
        "checkpoints": [],
        "history": [],
        "resumes": [],
        "events": [],
    }


def read_metadata(run: Path) -> dict[str, Any]:
    with open(run / "metadata.json") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("metadata.json does not hold an object")
    return data


def write_metadata(run: Path, metadata: dict[str, Any]) -> None:
    """Atomically replace ``metadata.json`` (global rank 0 only)."""
    metadata["updated_at"] = now()
    atomic_write_json(run / "metadata.json", metadata)


# --------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """One row of ``--list-runs``; plain data, also returned by ``trainer.list_runs``."""

    number: int
    path: str
    kind: str | None
    experiment: str | None
    dataset: str | None
    epochs_completed: int | None
    epochs_total: int | None
    checkpoints: int | None
    best_epoch: int | None
    best_metric: str | None
    best_value: float | None
    status: str
    learning_rate: float | None = None
    best_mode: str = "min"
    """Whether lower (min) or higher (max) values of best_metric are better."""
    is_best: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(root: Path, number: int) -> RunSummary:
    """Summary of one run from its metadata; unreadable metadata gives a row that says so."""
    path = run_dir(root, number)
    try:
        meta = read_metadata(path)
        best = meta.get("best") or {}
        dataset = meta.get("dataset") or {}
        config = meta.get("config_summary") or {}
        return RunSummary(
            number=number,
            path=str(path),
            kind=meta.get("kind"),
            experiment=meta.get("experiment"),
            dataset=f"{dataset.get('name')} ({dataset.get('num_classes')})" if dataset else None,
            epochs_completed=_int_or_none(meta.get("epochs_completed")),
            epochs_total=_int_or_none(meta.get("epochs_total")),
            checkpoints=len(meta.get("checkpoints") or []),
            best_epoch=best.get("epoch"),
            best_metric=best.get("metric"),
            best_value=None if best.get("value") is None else float(best["value"]),
            status=str(meta.get("status", "unknown")),
            learning_rate=config.get("learning_rate"),
            best_mode="max" if best.get("mode") == "max" else "min",
        )
    except FileNotFoundError:
        status = "broken: no metadata.json"
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        status = f"broken: unreadable metadata.json ({type(e).__name__})"
    except (AttributeError, TypeError, KeyError) as e:  # valid JSON of the wrong shape
        status = f"broken: malformed metadata.json ({type(e).__name__})"
    return RunSummary(number, str(path), None, None, None, None, None, None, None, None, None, status)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def list_runs(root: Path) -> list[RunSummary]:
    """Every run under ``root`` in run-number order; the best by the newest run's metric is marked."""
    rows = [summarize(root, n) for n in run_numbers(root)]
    scored = [r for r in rows if r.best_value is not None]
    if scored:
        metric, mode = scored[-1].best_metric, scored[-1].best_mode
        same = [r for r in scored if r.best_metric == metric and r.best_mode == mode]
        pick = max if mode == "max" else min
        pick(same, key=lambda r: float(r.best_value or 0.0)).is_best = True
    return rows


def format_table(rows: list[RunSummary], title: str) -> str:
    """The human table of ``--list-runs``."""
    if not rows:
        return f"{title}: no runs yet"
    headers = ["Run #", "Experiment", "Dataset", "Epochs", "Checkpoints", "Best", "Value", "Status"]
    body = []
    for r in rows:
        epochs = "-" if r.epochs_completed is None else f"{r.epochs_completed}/{r.epochs_total or '?'}"
        best = "-" if r.best_epoch is None else f"{r.best_metric} @ {r.best_epoch}"
        value = "-" if r.best_value is None else f"{r.best_value:.4f}"
        body.append(
            [
                f"{r.number:03d}",
                r.experiment or "-",
                r.dataset or "-",
                epochs,
                "-" if r.checkpoints is None else str(r.checkpoints),
                best,
                value + ("  <- best" if r.is_best else ""),
                r.status,
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The live run
# --------------------------------------------------------------------------------------------------


class RunHandle:
    """The run being trained. Every rank has one; only global rank 0 prints and writes metadata."""

    def __init__(self, path: Path, number: int, *, is_main: bool) -> None:
        self.path, self.number, self.is_main = path, number, is_main
        self.metadata: dict[str, Any] = read_metadata(path) if is_main else {}

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def update(self, **fields: Any) -> None:
        if self.is_main:
            self.metadata.update(fields)
            write_metadata(self.path, self.metadata)

    def record_epoch(self, state: Any, kept: list[int]) -> None:
        """After an epoch: counters, history and best from the trainer state, and the epochs on disk."""
        self.update(
            epochs_completed=state.epoch,
            global_step=state.global_step,
            history=list(state.history or []),
            best=state.best,
            checkpoints=kept,
        )

    def record_resume(self, *, epoch: int, checkpoint: str, state: Any) -> None:
        if not self.is_main:
            return
        resumes = [
            *self.metadata.get("resumes", []),
            {"at": now(), "from_epoch": epoch, "checkpoint": checkpoint},
        ]
        # The checkpoint is the truth: metadata written after it may be behind (a crash between the two).
        self.update(
            status="running",
            resumes=resumes,
            epochs_completed=state.epoch,
            global_step=state.global_step,
            history=list(state.history or []),
            best=state.best,
        )

    def finish(self, status: str) -> None:
        assert status in STATUSES, status
        self.update(status=status)
