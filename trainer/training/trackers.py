"""Experiment trackers (Weights & Biases, TensorBoard) fed by global rank 0, with files under the run's ``logs/``.

``logging.trackers`` picks any of ``wandb`` and ``tensorboard``; with none, neither library is imported. Every
value is logged with ``step=global_step`` (optimizer steps since the run began), so a resumed run continues
its curves where the checkpoint left them instead of restarting at 0:

- TensorBoard writes to ``logs/tensorboard/`` for the run's whole life; a resumed launch adds an event file
  there and sets ``purge_step``, so points a crashed launch wrote after its last checkpoint are dropped. A run
  that went back to an earlier checkpoint (``--resume N --from TAG``) writes to ``logs/tensorboard/branch_K/``
  and a new wandb run (``runs.metadata.new_branch``), so the abandoned branch stays apart.
- wandb keeps one run id per training run, stored in ``metadata.json`` (``trackers.wandb_id``) before the
  first ``wandb.init``; ``--resume`` reopens that id with ``resume="allow"``. Offline (the default) each
  launch adds a folder ``logs/wandb/offline-run-*-<id>/``; ``wandb sync`` uploads them as one run.
  wandb ignores steps lower than ones it has already seen, so an online run resumed after a crash shows
  the gap between the checkpoint and the crash only once.

Why the libraries are called directly rather than through ``accelerate.tracking`` (``WandBTracker``,
``TensorBoardTracker``): those classes exist to be driven by ``Accelerator(log_with=...)``, which cannot be
used here because the Accelerator is built before the run folder (and so the log folder and the stored
wandb id) is known. On their own they are thin wrappers that would still need this module's work (id
storage, resume), and they hide what resume and failure need: TensorBoard's ``purge_step`` and
``wandb.finish(exit_code=...)``, which marks a crashed run as failed rather than finished.

Rank rule, kept here: ``open_trackers`` opens nothing on ranks other than global rank 0 and returns an empty
``Trackers``, whose methods do nothing; the loop calls them on every rank without checking.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.config.schema import TrainConfig
    from trainer.runs.metadata import RunHandle


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, key: str, path: Path, step: int) -> None: ...

    def backfill(self, history: list[dict[str, Any]], steps_per_epoch: int) -> None: ...

    def close(self, *, failed: bool) -> None: ...


EPOCH_KEYS = {"epoch": "epoch/epoch", "train_loss": "epoch/train_loss", "val_loss": "epoch/val_loss",
              "fid": "epoch/fid", "seconds": "epoch/seconds", "images_per_sec": "epoch/images_per_sec"}  # fmt: skip
"""A history entry's values → the tracker keys of an epoch's metrics."""


def epoch_metrics(entry: dict[str, Any]) -> dict[str, float | None]:
    """The tracker metrics of one epoch, from its history entry."""
    return {key: entry.get(field) for field, key in EPOCH_KEYS.items()}


def epoch_step(entry: dict[str, Any], steps_per_epoch: int) -> int:
    """The global step an epoch ended at (older history entries did not record it)."""
    return int(entry.get("global_step") or entry["epoch"] * steps_per_epoch)


class TensorBoardTracker:
    """A ``SummaryWriter`` on ``logs/tensorboard/``, shared by every launch of the run."""

    def __init__(self, folder: Path, *, resume_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _not_installed("tensorboard") from None

        # purge_step: on reading, TensorBoard drops points at steps >= it that earlier event files hold (a
        # crashed launch's steps after its last checkpoint), so a resumed curve never doubles back.
        self.writer = SummaryWriter(
            str(folder), purge_step=resume_step + 1 if resume_step else None, flush_secs=30
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(key, pixels, global_step=step, dataformats="HWC")
        self.writer.flush()  # grids come once per epoch at most; show them without waiting for flush_secs

    def backfill(self, history: list[dict[str, Any]], steps_per_epoch: int) -> None:
        """Nothing to do: TensorBoard's event files of a killed launch keep what it wrote."""

    def close(self, *, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run under ``logs/wandb/``, reopened by id on every launch of the training run."""

    def __init__(
        self, logs: Path, *, run_id: str, project: str, name: str, mode: str, config: dict[str, Any]
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise _not_installed("wandb") from None

        self._wandb, self.logs, self.run_id, self.mode = wandb, logs, run_id, mode
        try:
            self.run = wandb.init(
                project=project,
                name=name,
                id=run_id,
                resume="allow",  # a new id starts the run; a stored one continues it
                dir=str(logs),
                mode=mode,  # type: ignore[arg-type]  # WANDB_MODE may hold any of wandb's modes
                config=config,
            )
        except Exception as e:  # wandb raises its own errors for logins, network, bad settings
            raise UserError(
                f"wandb could not start in {mode} mode ({type(e).__name__}: {e}); run `wandb login`, set "
                "logging.wandb_mode=offline, or drop wandb from logging.trackers"
            ) from e

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=self._monotonic(step))

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=self._monotonic(step))

    def _monotonic(self, step: int) -> int:
        """wandb drops points at a step lower than one already logged; a background save's figures, reported
        after training moved on, go to the newest step instead (TensorBoard keeps their own step)."""
        self._last_step = max(step, getattr(self, "_last_step", step))
        return self._last_step

    def backfill(self, history: list[dict[str, Any]], steps_per_epoch: int) -> None:
        """Log the epochs of ``history`` that no earlier launch's offline files hold: a launch killed hard
        loses what wandb had not yet written. (Online, wandb's server keeps what reached it.)"""
        if self.mode != "offline":
            return
        own = Path(self.run.dir).parent  # this launch's offline-run-* folder
        logged = logged_epochs(self.logs / "wandb", self.run_id, skip=own)
        for entry in sorted(history, key=lambda e: int(e["epoch"])):
            if int(entry["epoch"]) not in logged:
                values = {k: float(v) for k, v in epoch_metrics(entry).items() if v is not None}
                self.log(values, step=epoch_step(entry, steps_per_epoch))

    def close(self, *, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def logged_epochs(folder: Path, run_id: str, skip: Path | None = None) -> set[int]:
    """The epochs whose ``epoch/epoch`` metric the offline files of wandb run ``run_id`` under ``folder``
    hold (each launch adds a folder ``offline-run-*-<id>/``; ``skip`` one of them)."""
    epochs: set[int] = set()
    for path in folder.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"):
        if skip is not None and path.parent.resolve() == skip.resolve():
            continue
        for history in wandb_history(path):
            if "epoch/epoch" in history:
                epochs.add(int(float(history["epoch/epoch"])))
    return epochs


def wandb_history(path: Path) -> list[dict[str, str]]:
    """The history rows of a wandb ``.wandb`` file (key → JSON-encoded value), read as wandb writes it: a
    ``:W&B`` header, then LevelDB-log records (32 KiB blocks of chunks) of ``Record`` protobufs. A file cut
    short by a kill ends at its last whole record."""
    from wandb.proto import wandb_internal_pb2

    rows: list[dict[str, str]] = []
    for raw in _leveldb_records(path.read_bytes()):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        try:
            record.ParseFromString(raw)
        except Exception:  # a torn record at the end of a killed launch's file
            break
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            )
    return rows


def _leveldb_records(data: bytes, block: int = 32768) -> list[bytes]:
    if data[:4] != b":W&B":
        return []
    records, pending, pos = [], b"", 7  # header: ":W&B", a 2-byte magic, a version byte
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (0, 1):  # padding / a whole record
            records += [chunk] if kind == 1 else []
            if kind == 0:
                pos += block - pos % block if pos % block else 0
        elif kind == 2:
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
            if kind == 4:
                records.append(pending)
    return records


class Trackers:
    """The trackers this process feeds: none on ranks other than 0, so callers never check the rank."""

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self._trackers = list(trackers or [])

    @property
    def enabled(self) -> bool:
        return bool(self._trackers)

    def adopt(self, other: Trackers) -> None:
        """Feed ``other``'s trackers from now on (opened once a resume has set the step to continue from;
        whoever holds this object logs to them)."""
        self._trackers = other._trackers

    def log(self, metrics: dict[str, float | None], step: int) -> None:
        """Scalars at optimizer step ``step``; ``None`` values (no validation split) are left out."""
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        for tracker in self._trackers:
            tracker.log(values, step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """An image file (a sample grid PNG) at optimizer step ``step``."""
        for tracker in self._trackers:
            tracker.log_image(key, path, step)

    def backfill(self, history: list[dict[str, Any]], steps_per_epoch: int) -> None:
        """After a resume: give every tracker the epochs of ``history`` it lost (a launch killed hard)."""
        for tracker in self._trackers:
            tracker.backfill(history, steps_per_epoch)

    def close(self, *, failed: bool = False) -> None:
        """Close every tracker once. A tracker that fails to close is reported, never raised: it must not
        hide the training error being handled, nor fail a run whose checkpoints are written."""
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            try:
                tracker.close(failed=failed)
            except Exception as e:
                print(f"warning: could not close {type(tracker).__name__}: {e}", file=sys.stderr, flush=True)


def wandb_mode(configured: str) -> str:
    """The config's ``logging.wandb_mode``, unless the user set WANDB_MODE in the environment."""
    return os.environ.get("WANDB_MODE") or configured


def open_trackers(config: TrainConfig, run: RunHandle, *, resume_step: int) -> Trackers:
    """Open the configured trackers on global rank 0 (an empty ``Trackers`` elsewhere or with none).

    ``resume_step`` is the global step the run continues from (0 for a new run). The wandb id is written to
    ``metadata.json`` before ``wandb.init``, so a launch that dies during start-up is resumed under it too.
    """
    names = config.logging.trackers
    if not run.is_main or not names:
        return Trackers()
    logs = run.layout.logs
    logs.mkdir(exist_ok=True)
    opened: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                branch = int((run.metadata.get("trackers") or {}).get("branch") or 0)
                opened.append(
                    TensorBoardTracker(run.layout.tensorboard_branch(branch), resume_step=resume_step)
                )
            elif name == "wandb":
                opened.append(
                    WandbTracker(
                        logs,
                        run_id=_wandb_id(run),
                        project=config.experiment,
                        name=f"{run.path.parent.name}/{run.path.name}",
                        mode=wandb_mode(config.logging.wandb_mode),
                        config={**config.to_dict(), **_lineage(run)},
                    )
                )
            else:  # config validation admits only the names above
                raise AssertionError(f"unknown tracker {name!r}")
    except BaseException:
        Trackers(opened).close(failed=True)
        raise
    return Trackers(opened)


def _not_installed(name: str) -> UserError:
    return UserError(f"logging.trackers names {name}, which is not installed: pip install {name}, or drop it")


def _lineage(run: RunHandle) -> dict[str, Any]:
    """What a wandb run's config says of where it comes from (a rewind's or a fork's earlier wandb run)."""
    record = run.metadata.get("trackers") or {}
    lineage = {k: run.metadata[k] for k in ("forked_from", "init_from") if run.metadata.get(k)}
    return {**lineage, **({"branched_from": record["branched_from"]} if record.get("branched_from") else {})}


def _wandb_id(run: RunHandle) -> str:
    """The run's wandb id from ``metadata.json``, created and stored on first use."""
    stored: dict[str, Any] = dict(run.metadata.get("trackers") or {})
    if not stored.get("wandb_id"):
        stored["wandb_id"] = secrets.token_hex(4)  # wandb ids: lowercase letters and digits, like its own
        run.update(trackers=stored)
    return str(stored["wandb_id"])
