"""The two checkpoint formats, and what the manager asks of a format.

A format says which files a checkpoint has and how they are written and read; the manager decides when,
and the commit protocol makes them count. A save goes through a format in two parts:
  ``snapshot``  on every rank (collective under DeepSpeed): copy the state to host memory and list what this
                rank writes: whole files (``PendingFile``) and its parts of files that every rank writes side
                by side (``PendingPart``, placed by a layout every rank has, or that rank 0 draws up in the
                save's job: ``Snapshot.layouts``); training goes on as soon as it returns.
  ``finish``    on global rank 0, once every rank's files are written: put the checkpoint in place (rename
                folders, write the files rank 0 alone writes) and return the manifest entries it knows.
``load`` restores a committed checkpoint on every rank, on this launch's number of processes and stage.

  base.py    base runs: the model file users load (fp32 weights and EMA), Adam's moments, each rank's RNG,
             ``trainer_state.json``: every tensor once, every rank writing its own pieces
  legacy.py  base checkpoints of earlier versions (DeepSpeed's shard files and a merged file beside them)
  lora.py    LoRA runs: one file of the trained tensors, their EMA and Adam state by name, written by rank 0
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from trainer.checkpoint.manifest import Entry, Manifest, verify_file
from trainer.checkpoint.sharding.owned import Piece
from trainer.checkpoint.states import TrainingStates
from trainer.errors import UserError
from trainer.storage.tensor_files import FileLayout

CKPT_FORMAT = "diffit-trainer/checkpoint-v1"
"""``format`` of every ``.ckpt`` file this trainer writes."""

Written = dict[str, Entry]
"""File name → its manifest entry, for the files whose bytes were hashed as they were written."""


@dataclass
class PendingFile:
    """A file of a snapshot, written by the save's job: ``write(obj, file)`` to ``path``."""

    path: Path
    obj: Any
    write: Callable[[Any, Any], Any]
    after_layouts: bool = False
    """Written once rank 0's layouts are drawn up (``Snapshot.drawn``), which ``write`` may then read."""


@dataclass
class PendingPart:
    """This rank's part of a file that every rank writes side by side: its ``pieces``, placed by ``layout``
    (the same on every rank), or by the layout of that name that rank 0 draws up (``Snapshot.layouts``)."""

    path: Path
    layout: FileLayout | str
    pieces: list[Piece]


@dataclass
class Snapshot:
    """What one rank holds of a checkpoint between the snapshot and the commit."""

    files: list[PendingFile] = field(default_factory=list)
    """What this rank writes (every rank, or only rank 0)."""
    parts: list[PendingPart] = field(default_factory=list)
    """This rank's parts of the files every rank writes."""
    layouts: Callable[[], dict[str, FileLayout]] | None = None
    """Rank 0: the layouts its parts name, by name; drawn up by the save's job, off the training thread,
    while the parts with a layout of their own are written."""
    payload: Any = None
    """What rank 0's ``finish`` needs (None on the other ranks)."""
    drawn: dict[str, FileLayout] = field(default_factory=dict)
    """Rank 0: the layouts ``layouts`` drew up, once the save's job has (for ``finish`` to record)."""

    def tensors(self) -> list[Any]:
        """What the snapshot holds in memory (to count the host memory of a background save)."""
        return [
            [f.obj for f in self.files],
            [p.data for part in self.parts for p in part.pieces],
            self.payload,
        ]


class CheckpointFormat(Protocol):
    """The files of one kind of checkpoint; see the module docstring for the order of calls."""

    payload_key: str
    """The entry every ``.ckpt`` file of this kind holds (``state_dict`` or ``lora_state_dict``)."""

    def snapshot(
        self, tag: str, states: TrainingStates, progress: dict[str, Any], metrics: dict[str, float],
        keep: Callable[[Any], Any],
    ) -> Snapshot:  # fmt: skip
        """Collective. ``progress``: ``TrainState.state_dict()`` as saved; ``keep``: what the snapshot holds
        of a state object (a host copy for a background save, the object itself for a synchronous one)."""
        ...

    def finish(
        self, tag: str, snapshot: Snapshot, written: Written, progress: dict[str, Any],
        metrics: dict[str, float], before_publish: Callable[[Path], None],
    ) -> dict[Path, Entry]:  # fmt: skip
        """Rank 0, after every rank wrote its files. Returns the manifest entries by final path of the files
        whose hashes are already known; may raise OSError (nothing of the tag counts until committed)."""
        ...

    def prepare(self, manifest: Manifest, states: TrainingStates) -> Any:
        """Every rank, before any state changes (no collective): read and check whatever of the verified
        checkpoint can still be found wrong (its small files, the records of where its tensors lie), only
        files its manifest lists. Raises ``CheckpointDamaged`` saying why (the ranks then fall back to an
        older checkpoint together), or ``UserError`` when it cannot fit this launch."""
        ...

    def load(self, prepared: Any, states: TrainingStates) -> dict[str, Any]:
        """Every rank: restore a checkpoint ``prepare`` accepted into ``states``; returns the saved
        ``TrainState`` dict."""
        ...

    def references(self) -> dict[str, Entry]:
        """Rank 0: files outside the checkpoint folder every checkpoint depends on, by path relative to the
        run folder, with their entries (``Manifest.references``)."""
        ...

    def adopt(self, tag: str) -> Manifest | None:
        """A checkpoint written before manifests existed: its manifest (without files), or None if it is
        not resumable."""
        ...


class CheckpointDamaged(Exception):
    """A checkpoint whose files match their manifest but cannot be read as what they should be (a pickle that
    needs code, a truncated or malformed file written so, a file its manifest does not list)."""


def load_checkpoint_file(
    path: Path, key: str | tuple[str, ...] = "state_dict", *, verified: bool = False
) -> dict[str, Any]:
    """A ``.ckpt`` of this trainer, weights-only: a file that needs pickled code is refused.

    ``key`` is the entry it must hold (or one of them): ``state_dict`` for base checkpoints,
    ``lora_state_dict`` for LoRA ones. Unless the caller has ``verified`` it, a file of a run is first checked
    against the manifest that lists it (``verify_file``: a damaged one is refused); a loose file (no manifest
    lists it: a copy, a download) is loaded weights-only, and a line says it was not checked.
    """
    if not verified and path.is_file() and not verify_file(path):
        print(f"note: {path} is not a committed checkpoint of a run: loaded weights-only, not checked against "
              "a manifest", file=sys.stderr)  # fmt: skip
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise UserError(
            f"cannot load checkpoint {path}: the file is damaged, was not written by this trainer, or needs "
            f"pickled code to load ({reason})"
        ) from None
    keys = (key,) if isinstance(key, str) else key
    if not isinstance(data, dict) or not any(k in data for k in keys):
        kind = data.get("kind") if isinstance(data, dict) else None
        what = f"a {kind} checkpoint" if isinstance(kind, str) else "not a checkpoint of this trainer"
        raise UserError(f"{path} is {what} (no '{keys[0]}' inside)")
    return data
