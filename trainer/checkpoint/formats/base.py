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
own pieces of the two tensor files side by side (``sharding/owned.py`` says which, ``io/tensor_files.py``
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
from functools import partial
from pathlib import Path
from typing import Any

import torch

from launch import Topology
from trainer.checkpoint import deepspeed_compat as compat
from trainer.checkpoint.formats import CKPT_FORMAT, PendingFile, PendingPart, Snapshot, Written, legacy
from trainer.checkpoint.io.atomic import TMP_PREFIX, atomic_rename
from trainer.checkpoint.io.tensor_files import (
    torch_file_layout,
)
from trainer.checkpoint.io.tensor_reader import TensorFileReader, layout_record, recorded_layout
from trainer.checkpoint.manifest import Entry, Manifest
from trainer.checkpoint.sharding.owned import EMA, WEIGHTS, OwnedState, Piece
from trainer.checkpoint.states import TrainingStates
from trainer.errors import UserError
from trainer.faults import NO_FAULTS, Faults
from trainer.runs.layout import RunLayout

STATE_VERSION = 2
"""``trainer_state.json``'s ``state_version``: the layout above (absent: ``legacy.py``'s)."""
MODEL_FILE, OPTIMIZER_FILE = "model.ckpt", "optimizer.safetensors"
"""The tensor files in ``state/.tmp-<tag>/`` while written (the model file then becomes ``<tag>.ckpt``)."""


class BaseFormat:
    payload_key = "state_dict"

    def __init__(self, layout: RunLayout, topo: Topology, config: dict[str, Any], faults: Faults = NO_FAULTS):
        self.layout, self.topo, self.config, self.faults = layout, topo, config, faults
        self.state_root = layout.state_root
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
        if topo.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
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
                "kind": self.layout.kind,
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
        tmp, final, ckpt = self._tmp(tag), self.state_root / tag, self.layout.ckpt(tag)
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

    def load(self, tag: str, states: TrainingStates) -> dict[str, Any]:
        """Restore ``tag`` on every rank, on this launch's number of processes and ZeRO stage."""
        folder, topo = self.state_root / tag, self.topo
        self._owned_state = None  # a load may give the optimizer new state tensors: pieces are made anew
        saved = json.loads((folder / "trainer_state.json").read_text())
        _refuse_other_shapes(tag, saved["param_shapes"], states.ema.shapes())
        if saved.get("state_version", 1) < STATE_VERSION:
            legacy.load(folder, saved, states, topo)
        else:
            try:
                recorded = saved["tensor_files"]
                files = {
                    self.layout.ckpt(tag): recorded[MODEL_FILE],
                    folder / OPTIMIZER_FILE: recorded[OPTIMIZER_FILE],
                }
                with TensorFileReader(
                    {path: recorded_layout(record) for path, record in files.items()}
                ) as read:
                    self._owned(states).restore(read, saved["adam_steps"], saved.get("engine") or {})
            except (
                KeyError,
                ValueError,
                EOFError,
            ) as e:  # verified, so not damaged: written for another model
                raise UserError(
                    f"the checkpoint {tag} does not fit this launch: {type(e).__name__}: {e}"
                ) from None
        rng = folder / f"rng_rank{topo.rank}.pt"
        if rng.is_file():
            states.rng.load_state_dict(torch.load(rng, weights_only=True))
        else:
            states.rng.reseed(topo.rank, saved["global_step"])
        states.load_extra(saved.get("extra") or {})
        topo.comm.barrier(what=f"the resume from {tag}")
        return saved

    def adopt(self, tag: str) -> Manifest | None:
        return legacy.adopt(self.state_root, tag, self.topo)


def _write_trainer_state(snapshot: Snapshot, trainer_state: dict[str, Any], f: Any) -> None:
    """``trainer_state.json``, with where each tensor lies in the two tensor files (once rank 0's layouts
    are drawn up), for a resume to read slices without parsing the files."""
    placed = {part.path.name: part.layout for part in snapshot.parts if not isinstance(part.layout, str)}
    layouts = {name: layout_record(layout) for name, layout in {**placed, **snapshot.drawn}.items()}
    f.write((json.dumps({**trainer_state, "tensor_files": layouts}, indent=1) + "\n").encode())


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
