"""Checkpoints of a LoRA run: one adapter-only file per checkpoint, written by global rank 0 alone.

``lora_weights/<tag>.ckpt`` holds ``lora_state_dict`` (the adapters and the modules trained in full, never a
frozen base weight), ``ema_state_dict`` of the same tensors, the optimizer state of those parameters, the
trainer's counters, history and best, metrics, config and every rank's RNG state. The frozen base is stored
once per run (the ``base`` it is given); peft's export of the best adapters goes to ``adapter/``.

Saving gathers exactly the trainable parameters and their Adam state by name (``sharding/full_state.py``:
DeepSpeed's tensor-fragment API on every rank; gathering the whole model would waste memory), and rank 0
writes. Loading scatters them back the same way, so a LoRA run resumes on any number of processes or ZeRO
stage.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from launch import Topology
from trainer.checkpoint import deepspeed_compat as compat
from trainer.checkpoint.folder import CheckpointFolder
from trainer.checkpoint.formats import CKPT_FORMAT, CheckpointDamaged, Snapshot, Written, load_checkpoint_file
from trainer.checkpoint.manifest import Entry, Manifest, whole
from trainer.checkpoint.sharding.full_state import FullState, gather_full_state, scatter_full_state
from trainer.checkpoint.states import TrainingStates, TrainState, unwrap_model
from trainer.errors import UserError
from trainer.storage.atomic import TMP_PREFIX, atomic_rename, atomic_write, umask
from trainer.storage.checksums import file_digest


class LoraFormat:
    payload_key = "lora_state_dict"

    def __init__(self, where: CheckpointFolder, topo: Topology, config: dict[str, Any], base: Path) -> None:
        """``base``: the stored base model file the adapters apply to, in ``where``'s owner."""
        self.where, self.topo, self.config, self.base = where, topo, config, base
        self._base: dict[str, Entry] | None = None
        if topo.deepspeed_stage is not None:
            compat.verify_touches()

    def references(self) -> dict[str, Entry]:
        """The stored base the adapters apply to, hashed once per launch (it never changes in a run)."""
        if self._base is None:
            stored = self.base
            self._base = {
                stored.relative_to(self.where.owner).as_posix(): whole(
                    stored.stat().st_size, file_digest(stored)
                )
            }
        return self._base

    def snapshot(
        self, tag: str, states: TrainingStates, progress: dict[str, Any], metrics: dict[str, float],
        keep: Callable[[Any], Any],
    ) -> Snapshot:  # fmt: skip
        """Gather (collective): the trained tensors, their Adam state, EMA and every rank's RNG; only
        rank 0 writes, so it alone keeps them."""
        model = states.model
        full = gather_full_state(model, states.optimizer, unwrap_model(model), self.topo)
        ema = keep(states.ema.full_state())
        rngs = self.topo.comm.all_gather(states.rng.state_dict(), what=f"the snapshot of {tag} (RNG states)")
        if not self.topo.is_main:
            return Snapshot()
        checkpoint = {
            "format": CKPT_FORMAT,
            "kind": "lora",
            "lora_state_dict": full.params,
            "ema_state_dict": ema,
            "optimizer": full.optimizer_dict(),
            "rng": rngs,
            **progress,
            "metrics": dict(metrics),
            "world_size": self.topo.world_size,
            "distributed": self.topo.distributed,
            "config": self.config,
            **({"extra": states.extra_state()} if states.extra else {}),
        }
        return Snapshot(payload=checkpoint)

    def finish(
        self, tag: str, snapshot: Snapshot, written: Written, progress: dict[str, Any],
        metrics: dict[str, float], before_publish: Callable[[Path], None],
    ) -> dict[Path, Entry]:  # fmt: skip
        self.where.path.mkdir(parents=True, exist_ok=True)
        ckpt = self.where.ckpt(tag)
        return {
            ckpt: whole(
                *atomic_write(ckpt, partial(torch.save, snapshot.payload), before_publish=before_publish)
            )
        }

    def prepare(self, manifest: Manifest, states: TrainingStates) -> dict[str, Any]:
        """Every rank reads the file (only rank 0 ever writes it), weights-only, and checks its structure
        before anything is loaded. It holds full tensors by name, so any number of processes and any ZeRO
        stage can load it."""
        tag, ckpt_path = manifest.tag, self.where.ckpt(manifest.tag)
        if ckpt_path.name not in manifest.files:
            raise CheckpointDamaged(f"{ckpt_path.name} is not listed in its manifest")
        try:
            ckpt = load_checkpoint_file(ckpt_path, key=self.payload_key, verified=True)
            optim, rngs = ckpt["optimizer"], ckpt["rng"]
            full = FullState(dict(ckpt["lora_state_dict"]), dict(optim["moments"]), dict(optim["steps"]))
            if not isinstance(rngs, list) or not isinstance(ckpt["ema_state_dict"], dict):
                raise TypeError("its RNG states or EMA are malformed")
            if not all(isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor) for r in rngs):
                raise TypeError("its RNG states are malformed")
            TrainState.check(ckpt)
        except (UserError, KeyError, TypeError, ValueError) as e:
            raise CheckpointDamaged(str(e)) from None
        trainable = {n for n, p in unwrap_model(states.model).named_parameters() if p.requires_grad}
        if set(full.params) != trainable:
            raise UserError(
                f"the LoRA checkpoint {tag} does not fit the adapters configured now "
                f"({len(set(full.params) ^ trainable)} tensors differ); resume with the run's own LoRA config"
            )
        return {**ckpt, "full_state": full}

    def load(self, prepared: dict[str, Any], states: TrainingStates) -> dict[str, Any]:
        scatter_full_state(
            states.model, states.optimizer, unwrap_model(states.model), prepared["full_state"], self.topo
        )
        states.ema.from_full(prepared["ema_state_dict"])
        rank, saved_rngs = self.topo.rank, prepared["rng"]
        if rank < len(saved_rngs):
            states.rng.load_state_dict(saved_rngs[rank])
        else:
            states.rng.reseed(rank, prepared["global_step"])
        states.load_extra(prepared.get("extra") or {})
        return prepared

    def adopt(self, tag: str) -> Manifest | None:
        if not tag.startswith("epoch_") or not self.where.ckpt(tag).is_file():
            return None
        epoch = int(tag.removeprefix("epoch_"))
        manifest = Manifest(tag, epoch, 0, epoch, self.topo.world_size, self.topo.distributed)
        try:
            ckpt = load_checkpoint_file(self.where.ckpt(tag), key=self.payload_key)
            manifest.global_step = int(ckpt["global_step"])
            manifest.world_size, manifest.distributed = int(ckpt["world_size"]), str(ckpt["distributed"])
        except (UserError, KeyError, TypeError, ValueError):
            pass
        return manifest


def export_adapter(model: Any, final: Path) -> None:
    """peft's standard export (``save_pretrained``) of ``model``'s adapters to the folder ``final``, replaced
    atomically (rank 0; ``model``: the inference copy holding the EMA weights)."""
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for path in tmp.iterdir():  # safetensors writes 0600; every other file of a run follows the umask
        path.chmod(0o666 & ~umask())
    if final.exists():
        shutil.rmtree(final)
    atomic_rename(tmp, final)
