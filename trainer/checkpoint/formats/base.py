"""Checkpoints of a base run: which files a checkpoint has, how they are written, merged and loaded.

Files of a base run (``run_NNN/checkpoints/``), per tag (``epoch_NNN`` or ``step_NNNNNNN``):
  ``epoch_NNN.ckpt``   merged full fp32 checkpoint: ``state_dict``, ``ema_state_dict``, ``epoch``,
                        ``global_step``, ``metrics``, ``config`` (plain data; loads with weights_only=True)
  ``best.ckpt``/``last.ckpt``  hard links to an epoch file (a copy where links are impossible)
  ``state/<tag>/``     resumable state: DeepSpeed's own shards (``*_optim_states.pt``, ``*model_states.pt``)
                        or, without DeepSpeed, ``model.safetensors`` + ``optimizer.pt``; plus each rank's EMA
                        slice and RNG state and ``trainer_state.json`` (counters, history)
  ``manifests/<tag>.json``  size and sha256 of every file above, written last: the commit record
Step checkpoints have no merged file. The commit protocol (manifests, background saves, retention, resume
with fallback) is ``commit.Checkpoints``'; a LoRA run's files are ``adapter_checkpoint.py``'s.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from launch import Topology, barrier
from trainer import faults
from trainer.checkpoint.io.atomic import (
    TMP_PREFIX,
    atomic_rename,
    atomic_write,
    atomic_write_json,
)
from trainer.checkpoint.io.serialization import write_safetensors
from trainer.checkpoint.manifest import (
    Manifest,
    epoch_tag,
)
from trainer.checkpoint.protocol import Checkpoints, TrainingState
from trainer.checkpoint.sharding.full_state import FullState, restore_rng, rng_state, scatter_full_state
from trainer.checkpoint.sharding.zero_merge import (
    merge_zero_optimizer_state,
    merge_zero_shards,
    weights_only_loads,
)
from trainer.ema import EMA, full_from_slices
from trainer.errors import UserError

CKPT_FORMAT = "diffit-trainer/checkpoint-v1"


def epoch_name(epoch: int) -> str:
    return epoch_tag(epoch)


def load_checkpoint_file(path: Path, key: str = "state_dict") -> dict[str, Any]:
    """A ``.ckpt`` of this trainer, weights-only: a file that needs pickled code is refused.

    ``key`` is the entry it must hold: ``state_dict`` for base checkpoints, ``lora_state_dict`` for LoRA ones.
    """
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
    if not isinstance(data, dict) or key not in data:
        kind = data.get("kind") if isinstance(data, dict) else None
        what = f"a {kind} checkpoint" if isinstance(kind, str) else "not a checkpoint of this trainer"
        raise UserError(f"{path} is {what} (no '{key}' inside)")
    return data


class CheckpointManager(Checkpoints):
    """Saves and restores the full training state of a base run, on every rank."""

    def __init__(
        self,
        run_dir: Path,
        topo: Topology,
        *,
        keep_last_n: int,
        config: dict[str, Any],
        async_save: bool = False,
    ) -> None:
        self.state_root = run_dir / "checkpoints" / "state"
        folder = run_dir / "checkpoints"
        super().__init__(
            run_dir,
            folder,
            topo,
            keep_last_n=keep_last_n,
            config=config,
            kind="base",
            roots=[(folder, ".ckpt"), (self.state_root, "")],
            async_save=async_save,
        )

    def _is_resumable(self, tag: str) -> bool:
        return (self.state_root / tag / "trainer_state.json").is_file()

    def _legacy_manifest(self, tag: str) -> Manifest:
        manifest = super()._legacy_manifest(tag)
        try:
            saved = json.loads((self.state_root / tag / "trainer_state.json").read_text())
            manifest.global_step = int(saved["global_step"])
            manifest.world_size, manifest.distributed = int(saved["world_size"]), str(saved["distributed"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return manifest

    # -- saving ---------------------------------------------------------------------------------------

    per_rank_files = True

    def _tmp_dir(self, tag: str) -> Path:
        return self.state_root / f"{TMP_PREFIX}{tag}"

    def _merged_tmp(self, tag: str) -> Path:
        return self.dir / f"{TMP_PREFIX}{tag}.ckpt"

    def _snapshot(self, tag: str, **kwargs: Any) -> tuple[list[tuple[Path, Any, Any]], Any]:
        model, ema, noise, state = kwargs["model"], kwargs["ema"], kwargs["noise_generator"], kwargs["state"]
        tmp = self._tmp_dir(tag)
        if self.topo.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.topo)
        items: list[tuple[Path, Any, Any]] = []
        keep = self._keep
        weights = None
        if self.topo.deepspeed_stage is not None:
            with _captured_engine_writes(model, items, keep):  # DeepSpeed's own save, its writes held back
                model.save_checkpoint(str(self.state_root), tag=tmp.name, save_latest=False)
        elif self.topo.is_main:
            weights = keep(unwrap_model(model).state_dict())
            items.append((tmp / "model.safetensors", weights, write_safetensors))
            items.append((tmp / "optimizer.pt", keep(kwargs["optimizer"].state_dict()), torch.save))
        rank = self.topo.rank
        if ema.partitioned or self.topo.is_main:  # unpartitioned EMA is identical on every rank
            ema_state = keep(ema.local_state())
            items.append((tmp / f"ema_rank{rank}.safetensors", ema_state, write_safetensors))
        items.append((tmp / f"rng_rank{rank}.pt", rng_state(noise), torch.save))
        if weights is not None and not ema.partitioned and state.step_in_epoch == 0:
            # Every tensor of the merged file is at hand: write it with the rest, not from the files later.
            merged = self._merged_payload(weights, ema_state, state, kwargs["metrics"])
            items.append((self._merged_tmp(tag), merged, torch.save))
        main = self._trainer_state(state, ema) if self.topo.is_main else None
        return items, main

    def _commit(
        self,
        tag: str,
        *,
        state: TrainingState,
        metrics: dict[str, float],
        payload: Any,
        written: dict[str, tuple[int, str]],
    ) -> dict[Path, tuple[int, str]]:
        tmp, final = self._tmp_dir(tag), self.state_root / tag
        merged_entry = written.pop(self._merged_tmp(tag).name, None)
        atomic_write_json(tmp / "trainer_state.json", payload)  # every other file was fsynced as written
        if final.exists():  # an uncommitted orphan (its manifest was never written)
            shutil.rmtree(final)
        atomic_rename(tmp, final)
        known = {final / name: entry for name, entry in written.items()}
        if state.step_in_epoch == 0:  # epoch checkpoints also get the merged file users load
            faults.point("save.merge")
            ckpt = self.dir / f"{tag}.ckpt"
            if merged_entry is not None:  # written with the state
                atomic_rename(self._merged_tmp(tag), ckpt)
                known[ckpt] = merged_entry
            else:  # merged from the ZeRO shards (or slices) just written
                merged = self._merged_payload(read_model_state(final), read_full_ema(final), state, metrics)
                known[ckpt] = atomic_write(
                    ckpt, partial(torch.save, merged), hash_on_thread=not self.async_save
                )
        return known

    def _trainer_state(self, state: TrainingState, ema: EMA) -> dict[str, Any]:
        return {
            **state.to_dict(),
            "world_size": self.topo.world_size,
            "distributed": self.topo.distributed,
            "ema_partitioned": ema.partitioned,
            "param_shapes": {k: list(v) for k, v in ema.shapes().items()},
        }

    def _merged_payload(
        self,
        weights: dict[str, torch.Tensor],
        ema: dict[str, torch.Tensor],
        state: TrainingState,
        metrics: dict[str, float],
    ) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT,
            "kind": self.kind,
            "state_dict": weights,
            "ema_state_dict": ema,
            "epoch": state.epoch,
            "global_step": state.global_step,
            "metrics": dict(metrics),
            "config": self.config,
        }

    # -- loading --------------------------------------------------------------------------------------

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
        """Restore checkpoint ``manifest`` on every rank, on this launch's number of processes and stage."""
        folder = self.state_root / manifest.tag
        saved = json.loads((folder / "trainer_state.json").read_text())
        now = {name: list(shape) for name, shape in ema.shapes().items()}
        changed = [name for name in now if saved["param_shapes"].get(name) != now[name]]
        changed += [name for name in saved["param_shapes"] if name not in now]
        if changed:
            name = changed[0]
            raise UserError(
                f"the checkpoint {manifest.tag} does not fit the model as configured now: {len(changed)} "
                f"parameter(s) differ, e.g. {name} (saved {saved['param_shapes'].get(name)}, now {now.get(name)}); "
                "drop the --set model.* override that changes the architecture"
            )
        same_layout = (
            saved["world_size"] == self.topo.world_size and saved["distributed"] == self.topo.distributed
        )
        if not same_layout:
            # Another number of processes or ZeRO stage: rebuild the full state from the shards.
            scatter_full_state(model, optimizer, unwrap_model(model), read_full_state(folder), self.topo)
            ema.from_full(read_full_ema(folder))
        elif self.topo.deepspeed_stage is not None:
            with weights_only_loads():
                path, _ = model.load_checkpoint(
                    str(self.state_root),
                    tag=folder.name,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                    load_module_strict=True,
                )
            if path is None:
                raise UserError(f"DeepSpeed could not load the checkpoint in {folder}")
        else:
            unwrap_model(model).load_state_dict(load_file(str(folder / "model.safetensors")))
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        if same_layout:
            rank = self.topo.rank
            ema.load_local_state(
                load_file(str(folder / f"ema_rank{rank if saved['ema_partitioned'] else 0}.safetensors"))
            )
        rng_file = folder / f"rng_rank{self.topo.rank}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
        restore_rng(rng, noise_generator, seed=seed, rank=self.topo.rank, global_step=saved["global_step"])
        barrier(self.topo)
        return TrainingState.from_dict(saved)


def read_full_state(folder: Path) -> FullState:
    """The trained parameters, Adam moments and step of one base checkpoint, by name, whatever wrote it."""
    saved = json.loads((folder / "trainer_state.json").read_text())
    names = list(saved["param_shapes"])
    if (folder / "model.safetensors").is_file():
        weights = load_file(str(folder / "model.safetensors"))
        optim = torch.load(folder / "optimizer.pt", weights_only=True)
        states = optim["state"]
        moments = {
            key: {
                n: states[i][key] if i in states else torch.zeros_like(weights[n])
                for i, n in enumerate(names)
            }
            for key in ("exp_avg", "exp_avg_sq")
        }
        steps = {n: float(states[i]["step"]) if i in states else 0.0 for i, n in enumerate(names)}
        return FullState({n: weights[n].float() for n in names}, moments, steps)
    weights = merge_zero_shards(folder)
    moments, step = merge_zero_optimizer_state(folder)
    return FullState({n: weights[n] for n in names}, moments, {n: step for n in names})


def read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from one epoch's resumable state (merging ZeRO shards if needed)."""
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    return merge_zero_shards(folder)


def read_full_ema(folder: Path) -> dict[str, torch.Tensor]:
    """Full EMA tensors from one epoch's resumable state (reassembling ZeRO-3 slices if needed)."""
    saved = json.loads((folder / "trainer_state.json").read_text())
    if not saved["ema_partitioned"]:
        return load_file(str(folder / "ema_rank0.safetensors"))
    slices = [load_file(str(folder / f"ema_rank{r}.safetensors")) for r in range(saved["world_size"])]
    return {
        name: full_from_slices([s[name] for s in slices], torch.Size(shape))
        for name, shape in saved["param_shapes"].items()
    }


def unwrap_model(model: Any) -> torch.nn.Module:
    """The plain module inside a DeepSpeed engine or DDP wrapper."""
    return model.module if hasattr(model, "module") else model


class _captured_engine_writes:
    """For one DeepSpeed ``save_checkpoint``: each file it would write is held back (``keep``: copied to host
    memory for a background save) as (path, object, writer), to be written by the save's job. DeepSpeed's collective sequence is untouched,
    and a write error can no longer leave one rank behind in its barriers."""

    def __init__(self, engine: Any, items: list[tuple[Path, Any, Any]], keep: Any) -> None:
        self.engine, self.items, self.keep = engine, items, keep

    def __enter__(self) -> None:
        checkpoint_engine = self.engine.checkpoint_engine
        self.original = checkpoint_engine.save
        items, keep = self.items, self.keep

        def save(state_dict: Any, path: str) -> None:
            items.append((Path(path), keep(state_dict), torch.save))

        checkpoint_engine.save = save

    def __exit__(self, *exc: object) -> None:
        self.engine.checkpoint_engine.save = self.original
