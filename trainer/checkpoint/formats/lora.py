"""Checkpoints of a LoRA run: one adapter-only file per checkpoint, written by global rank 0 alone.

``lora_weights/epoch_NNN.ckpt`` (``step_NNNNNNN.ckpt`` for one taken inside an epoch) holds ``lora_state_dict`` (the adapters and the modules trained in full,
never a frozen base weight), ``ema_state_dict`` of the same tensors, the optimizer state of those
parameters, epoch and step counters, history and best, metrics, config and every rank's RNG state. The
frozen base is stored once per run in ``base_model/base_model.ckpt``.

Saving gathers exactly the trainable parameters and their Adam state by name (``full_state.py``: DeepSpeed's
tensor-fragment API on every rank; gathering the whole model would waste memory), and rank 0 writes.
Loading scatters them back the same way, so a LoRA run resumes on any number of processes or ZeRO stage.
Commit, manifests, retention and fallback are ``commit.Checkpoints``'.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from launch import Topology
from trainer.checkpoint.formats.base import CKPT_FORMAT, load_checkpoint_file, unwrap_model
from trainer.checkpoint.io.atomic import atomic_write
from trainer.checkpoint.manifest import Manifest
from trainer.checkpoint.protocol import Checkpoints, TrainingState
from trainer.checkpoint.sharding.full_state import (
    FullState,
    gather_full_state,
    restore_rng,
    rng_state,
    scatter_full_state,
)
from trainer.ema import EMA
from trainer.errors import UserError


class AdapterCheckpointManager(Checkpoints):
    payload_key = "lora_state_dict"

    def __init__(
        self,
        run_dir: Path,
        topo: Topology,
        *,
        keep_last_n: int,
        config: dict[str, Any],
        async_save: bool = False,
    ) -> None:
        folder = run_dir / "lora_weights"
        super().__init__(
            run_dir,
            folder,
            topo,
            keep_last_n=keep_last_n,
            config=config,
            kind="lora",
            roots=[(folder, ".ckpt")],
            async_save=async_save,
        )

    def _leftover_folders(self) -> list[Path]:
        return [self.dir, self.run_dir]  # the run folder: a half-written adapter/ export

    def _is_resumable(self, tag: str) -> bool:
        return (self.dir / f"{tag}.ckpt").is_file()

    def _legacy_manifest(self, tag: str) -> Manifest:
        manifest = super()._legacy_manifest(tag)
        try:
            ckpt = load_checkpoint_file(self.dir / f"{tag}.ckpt", key=self.payload_key)
            manifest.global_step = int(ckpt["global_step"])
            manifest.world_size, manifest.distributed = int(ckpt["world_size"]), str(ckpt["distributed"])
        except (UserError, KeyError, TypeError, ValueError):
            pass
        return manifest

    def _snapshot(self, tag: str, **kwargs: Any) -> tuple[list[tuple[Path, Any, Any]], Any]:
        """Gather (collective): the trained tensors, their Adam state, EMA and every rank's RNG; only
        rank 0 writes, so it alone keeps them."""
        model, ema = kwargs["model"], kwargs["ema"]
        full = gather_full_state(model, kwargs["optimizer"], unwrap_model(model), self.topo)
        ema_full = self._keep(ema.full_state())
        rng = _all_rng_states(kwargs["noise_generator"], self.topo)
        return [], ((full, ema_full, rng) if self.topo.is_main else None)

    def _commit(
        self,
        tag: str,
        *,
        state: TrainingState,
        metrics: dict[str, float],
        payload: Any,
        written: dict[str, tuple[int, str]],
    ) -> dict[Path, tuple[int, str]]:
        full, ema_full, rng = payload
        checkpoint = {
            "format": CKPT_FORMAT,
            "kind": "lora",
            "lora_state_dict": full.params,
            "ema_state_dict": ema_full,
            "optimizer": full.optimizer_dict(),
            "rng": rng,
            **state.to_dict(),
            "metrics": metrics,
            "world_size": self.topo.world_size,
            "distributed": self.topo.distributed,
            "config": self.config,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        ckpt = self.dir / f"{tag}.ckpt"
        return {ckpt: atomic_write(ckpt, partial(torch.save, checkpoint), hash_on_thread=not self.async_save)}

    def load(
        self,
        manifest: Manifest,
        *,
        model: Any,
        optimizer: Any,
        ema: EMA,
        noise_generator: torch.Generator,
        seed: int,
    ) -> TrainingState:
        """Restore ``manifest``'s checkpoint on every rank (each reads the file; only rank 0 ever writes it).

        The file holds full tensors by name, so any number of processes and any ZeRO stage can load it.
        """
        ckpt = load_checkpoint_file(self.dir / f"{manifest.tag}.ckpt", key=self.payload_key)
        module = unwrap_model(model)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        if set(ckpt["lora_state_dict"]) != trainable:
            raise UserError(
                f"the LoRA checkpoint {manifest.tag} does not fit the adapters configured now "
                f"({len(set(ckpt['lora_state_dict']) ^ trainable)} tensors differ); resume with the run's own "
                "LoRA config"
            )
        optim = ckpt["optimizer"]
        full = FullState(ckpt["lora_state_dict"], optim["moments"], optim["steps"])
        scatter_full_state(model, optimizer, module, full, self.topo)
        ema.from_full(ckpt["ema_state_dict"])
        saved_rngs = ckpt["rng"]
        rank = self.topo.rank
        restore_rng(
            saved_rngs[rank] if rank < len(saved_rngs) else None,
            noise_generator,
            seed=seed,
            rank=rank,
            global_step=ckpt["global_step"],
        )
        return TrainingState.from_dict(ckpt)


def _all_rng_states(noise_generator: torch.Generator, topo: Topology) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG state, gathered to every rank (a few KB)."""
    mine = rng_state(noise_generator)
    if topo.world_size == 1:
        return [mine]
    everyone: list[Any] = [None] * topo.world_size
    torch.distributed.all_gather_object(everyone, mine)
    return everyone
