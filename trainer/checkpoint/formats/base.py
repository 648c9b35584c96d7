"""Checkpoints of a base run: which files a checkpoint has, how they are written and loaded.

Files of a base run (``run_NNN/checkpoints/``), per tag (``epoch_NNN`` or ``step_NNNNNNN``):
  ``<tag>.ckpt``                     the model file users load (``torch.load(..., weights_only=True)``):
                                     ``state_dict`` (fp32 weights, the master weights under DeepSpeed),
                                     ``ema_state_dict``, ``epoch``, ``global_step``, ``metrics``, ``config``
  ``state/<tag>/optimizer.safetensors``  Adam's moments by parameter: ``exp_avg/<name>``, ``exp_avg_sq/<name>``
  ``state/<tag>/rng_rankN.pt``       each rank's RNG state
  ``state/<tag>/trainer_state.json`` counters, history, best, world size, parameter shapes, Adam's steps,
                                     DeepSpeed's own counters
Every tensor is stored once: a resume takes the weights and the EMA from the model file. Each rank writes its
own pieces of the two tensor files side by side (``sharding/owned.py`` says which, ``storage/tensor_files.py``
where), so a save writes at the speed of every rank's disk bandwidth and no rank gathers another's tensors;
global rank 0 also writes the model file's header (its layout drawn up in the save's job, off the training
thread, while the moments are written) and ``trainer_state.json``. Everything is written under ``state/.tmp-<tag>/``; rank 0 then renames the folder
into place and the model file out of it. A resume reads exactly what its launch needs, on any number of
processes and any ZeRO stage.

Checkpoints of earlier versions (no ``state_version``: DeepSpeed's shard files) are read by ``legacy.py``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from launch import Topology
from trainer.checkpoint import deepspeed_compat as compat
from trainer.checkpoint.folder import CheckpointFolder
from trainer.checkpoint.formats import (
    CKPT_FORMAT,
    CheckpointDamaged,
    PendingFile,
    PendingPart,
    Snapshot,
    Written,
    legacy,
)
from trainer.checkpoint.manifest import Entry, Manifest
from trainer.checkpoint.sharding.owned import EMA, WEIGHTS, OwnedState, Piece
from trainer.checkpoint.states import TrainingStates, TrainState
from trainer.errors import UserError
from trainer.faults import NO_FAULTS, Faults
from trainer.storage.atomic import TMP_PREFIX, atomic_rename, delete_inside
from trainer.storage.json_files import as_int, read_json_file
from trainer.storage.paths import real_folder
from trainer.storage.tensor_files import (
    FileLayout,
    torch_file_layout,
)
from trainer.storage.tensor_reader import TensorFileReader, layout_record, recorded_layout

STATE_VERSION = 2
"""``trainer_state.json``'s ``state_version``: the layout above (absent: ``legacy.py``'s)."""
MODEL_FILE, OPTIMIZER_FILE = "model.ckpt", "optimizer.safetensors"
"""The tensor files in ``state/.tmp-<tag>/`` while written (the model file then becomes ``<tag>.ckpt``)."""


class BaseFormat:
    payload_key = "state_dict"

    def __init__(
        self, where: CheckpointFolder, topo: Topology, config: dict[str, Any], faults: Faults = NO_FAULTS
    ):
        self.where, self.topo, self.config, self.faults = where, topo, config, faults
        self.state_root = where.state_root
        self._owned_state: OwnedState | None = None
        if topo.deepspeed_stage is not None:
            compat.verify_touches()

    def _owned(self, states: TrainingStates) -> OwnedState:
        """This rank's pieces of ``states`` (kept between saves: see ``OwnedState.pieces``)."""
        if self._owned_state is None or self._owned_state.states is not states:
            self._owned_state = OwnedState(states, self.topo)
        return self._owned_state

    def _tmp(self, tag: str) -> Path:
        return self.state_root / f"{TMP_PREFIX}{tag}"

    # -- saving ---------------------------------------------------------------------------------------

    def snapshot(
        self, tag: str, states: TrainingStates, progress: dict[str, Any], metrics: dict[str, float],
        keep: Callable[[Any], Any],
    ) -> Snapshot:  # fmt: skip
        tmp, topo = self._tmp(tag), self.topo
        if topo.is_main:  # in a real folder of the run: a linked state/ would take the deletion elsewhere
            real_folder(self.state_root, self.where.owner)
            if tmp.exists() or tmp.is_symlink():  # a crash's leftover (a link: removed itself)
                delete_inside(tmp, self.where.owner)
            tmp.mkdir()
        topo.comm.barrier(what=f"the snapshot of {tag}")
        owned = self._owned(states)
        model, optimizer = owned.pieces()
        copies = keep([piece.data for piece in (*model, *optimizer)])
        kept = [Piece(piece.key, piece.start, data) for piece, data in zip((*model, *optimizer), copies)]
        snapshot = Snapshot(
            files=[PendingFile(tmp / f"rng_rank{topo.rank}.pt", states.rng.state_dict(), torch.save)],
            parts=[  # the moments' layout is every rank's own; the model file's, rank 0's (its pickle)
                PendingPart(tmp / OPTIMIZER_FILE, owned.moments_layout, kept[len(model) :]),
                PendingPart(tmp / MODEL_FILE, MODEL_FILE, kept[: len(model)]),
            ],
        )
        if topo.is_main:
            trainer_state = self._trainer_state(progress, states, owned)
            write = partial(_write_trainer_state, snapshot)
            snapshot.files.append(
                PendingFile(tmp / "trainer_state.json", trainer_state, write, after_layouts=True)
            )
            model_file = {
                "format": CKPT_FORMAT,
                "kind": "base",
                WEIGHTS: owned.weight_specs,
                EMA: owned.ema_specs,
                "epoch": progress["epoch"],
                "global_step": progress["global_step"],
                "metrics": dict(metrics),
                "config": self.config,
            }
            snapshot.layouts = lambda: {MODEL_FILE: torch_file_layout(model_file)}
        return snapshot

    def finish(
        self, tag: str, snapshot: Snapshot, written: Written, progress: dict[str, Any],
        metrics: dict[str, float], before_publish: Callable[[Path], None],
    ) -> dict[Path, Entry]:  # fmt: skip
        tmp, final, ckpt = self._tmp(tag), self.state_root / tag, self.where.ckpt(tag)
        if final.exists():  # an uncommitted orphan (its manifest was never written)
            shutil.rmtree(final)
        atomic_rename(tmp, final)
        self.faults.point("save.merge", tag=tag, step=progress["global_step"])
        atomic_rename(final / MODEL_FILE, ckpt)
        known = {final / name: entry for name, entry in written.items() if name != MODEL_FILE}
        known[ckpt] = written[MODEL_FILE]
        return known

    def _trainer_state(
        self, progress: dict[str, Any], states: TrainingStates, owned: OwnedState
    ) -> dict[str, Any]:
        extra = states.extra_state()
        return {
            **progress,
            "state_version": STATE_VERSION,
            "world_size": self.topo.world_size,
            "distributed": self.topo.distributed,
            "ema_partitioned": states.ema.partitioned,
            "param_shapes": {k: list(v) for k, v in states.ema.shapes().items()},
            "adam_steps": owned.adam_steps(),
            "engine": owned.engine_counters(),
            **({"extra": extra} if extra else {}),
        }

    # -- loading --------------------------------------------------------------------------------------

    def prepare(self, manifest: Manifest, states: TrainingStates) -> Prepared:
        """Every rank: ``trainer_state.json``, this rank's RNG state and where each tensor lies, read and
        checked before anything is loaded; each file only when the manifest lists it."""
        tag, topo = manifest.tag, self.topo
        folder = self.state_root / tag
        listed = _Listed(manifest, self.where.path)
        try:
            saved = read_json_file(listed.path(folder / "trainer_state.json"))
            if not isinstance(saved, dict) or not isinstance(saved.get("param_shapes"), dict):
                raise ValueError("trainer_state.json holds no parameter shapes")
        except (OSError, ValueError) as e:
            raise CheckpointDamaged(str(e)) from None
        try:
            ranks = as_int(saved.get("world_size"), "world_size")
            _check_saved(saved)
        except ValueError as e:
            raise CheckpointDamaged(f"trainer_state.json: {e}") from None
        _refuse_other_shapes(tag, saved["param_shapes"], states.ema.shapes())
        rng = None
        if topo.rank < ranks:  # else a rank the checkpoint did not have: seeded afresh
            path = listed.path(folder / f"rng_rank{topo.rank}.pt")
            rng = _read_pickle(path, lambda p: torch.load(p, weights_only=True))
            if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
                raise CheckpointDamaged(f"{path.name} holds no RNG state")
        if saved.get("state_version", 1) < STATE_VERSION:
            legacy.check(folder, listed.files(folder))
            return Prepared(tag, folder, saved, rng, None)
        files = {
            listed.path(self.where.ckpt(tag)): MODEL_FILE,
            listed.path(folder / OPTIMIZER_FILE): OPTIMIZER_FILE,
        }
        try:
            layouts = {path: recorded_layout(saved["tensor_files"][name]) for path, name in files.items()}
            for path, layout in layouts.items():
                listed.check_size(path, layout.size)
            self._owned(states).check(layouts.values())
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointDamaged(
                f"its record of where the tensors lie does not fit its files ({e})"
            ) from None
        return Prepared(tag, folder, saved, rng, layouts)

    def load(self, prepared: Prepared, states: TrainingStates) -> dict[str, Any]:
        """Restore a prepared checkpoint on every rank, on this launch's number of processes and ZeRO stage."""
        saved, topo = prepared.saved, self.topo
        self._owned_state = None  # a load may give the optimizer new state tensors: pieces are made anew
        if prepared.layouts is None:
            legacy.load(prepared.folder, saved, states, topo)
        else:
            with TensorFileReader(dict(prepared.layouts)) as read:
                self._owned(states).restore(read, saved["adam_steps"], saved.get("engine") or {})
        if prepared.rng is not None:
            states.rng.load_state_dict(prepared.rng)
        else:
            states.rng.reseed(topo.rank, saved["global_step"])
        states.load_extra(saved.get("extra") or {})
        topo.comm.barrier(what=f"the resume from {prepared.tag}")
        return saved

    def references(self) -> dict[str, Entry]:
        return {}  # a base checkpoint is whole in its folder

    def adopt(self, tag: str) -> Manifest | None:
        return legacy.adopt(self.state_root, tag, self.topo)


def _check_saved(saved: dict[str, Any]) -> None:
    """``trainer_state.json``'s fields, read as data: the counters (``TrainState.check``), then the optimizer's
    steps and the engine's counters, numbers by name; ``ValueError`` saying what is wrong."""
    TrainState.check(saved)
    for key in ("adam_steps", "engine", "extra"):
        value = saved.get(key) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{key} is not an object")
        if key != "extra" and not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        ):
            raise ValueError(f"{key} holds something other than numbers")


def _write_trainer_state(snapshot: Snapshot, trainer_state: dict[str, Any], f: Any) -> None:
    """``trainer_state.json``, with where each tensor lies in the two tensor files (once rank 0's layouts
    are drawn up), for a resume to read slices without parsing the files."""
    placed = {part.path.name: part.layout for part in snapshot.parts if not isinstance(part.layout, str)}
    layouts = {name: layout_record(layout) for name, layout in {**placed, **snapshot.drawn}.items()}
    f.write((json.dumps({**trainer_state, "tensor_files": layouts}, indent=1) + "\n").encode())


@dataclass
class Prepared:
    """A checkpoint ``BaseFormat.prepare`` read and checked: what its load needs."""

    tag: str
    folder: Path
    saved: dict[str, Any]
    """``trainer_state.json``."""
    rng: dict[str, Any] | None
    """This rank's RNG state, None where the checkpoint has none for it."""
    layouts: dict[Path, FileLayout] | None
    """Where the tensors lie in each tensor file; None for a checkpoint of an earlier version."""


class _Listed:
    """The files a manifest lists, by their path: only those are read (``CheckpointDamaged`` for any other)."""

    def __init__(self, manifest: Manifest, checkpoints: Path) -> None:
        self.manifest, self.checkpoints = manifest, checkpoints

    def key(self, path: Path) -> str:
        return path.relative_to(self.checkpoints).as_posix()

    def has(self, path: Path) -> bool:
        return self.key(path) in self.manifest.files

    def path(self, path: Path) -> Path:
        if not self.has(path):
            raise CheckpointDamaged(f"{self.key(path)} is not listed in its manifest")
        return path

    def files(self, folder: Path) -> list[Path]:
        prefix = self.key(folder) + "/"
        return [
            self.checkpoints / relative for relative in self.manifest.files if relative.startswith(prefix)
        ]

    def check_size(self, path: Path, size: int) -> None:
        listed = self.manifest.files[self.key(path)]["bytes"]
        if listed != size:
            raise ValueError(f"{path.name} has {listed} bytes, its record says {size}")


def _read_pickle(path: Path, load: Callable[[Path], Any]) -> Any:
    """A pickle-format file of a verified checkpoint, weights-only: ``CheckpointDamaged`` where it cannot be
    read so (it was written damaged, or needs code)."""
    try:
        return load(path)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise CheckpointDamaged(f"{path.name} cannot be read weights-only ({reason[:200]})") from None


def _refuse_other_shapes(tag: str, saved: dict[str, list[int]], now: dict[str, torch.Size]) -> None:
    current = {name: list(shape) for name, shape in now.items()}
    changed = [name for name in current if saved.get(name) != current[name]]
    changed += [name for name in saved if name not in current]
    if changed:
        name = changed[0]
        raise UserError(
            f"the checkpoint {tag} does not fit the model as configured now: {len(changed)} parameter(s) "
            f"differ, e.g. {name} (saved {saved.get(name)}, now {current.get(name)}); drop the --set model.* "
            "override that changes the architecture"
        )
