"""Checkpoints of a base run: which files a checkpoint has, how they are written, merged and loaded.

Files of a base run (``run_NNN/checkpoints/``), per tag (``epoch_NNN`` or ``step_NNNNNNN``):
  ``epoch_NNN.ckpt``   merged full fp32 checkpoint: ``state_dict``, ``ema_state_dict``, ``epoch``,
                        ``global_step``, ``metrics``, ``config`` (plain data; loads with weights_only=True)
  ``state/<tag>/``     resumable state: DeepSpeed's own shards (``*_optim_states.pt``, ``*model_states.pt``)
                        or, without DeepSpeed, ``model.safetensors`` + ``optimizer.pt``; plus each rank's EMA
                        slice (``ema_rankN.safetensors``) and RNG (``rng_rankN.pt``), and ``trainer_state.json``
                        (counters, history, world size, parameter shapes)
Step checkpoints have no merged file. Every rank writes its files into ``state/.tmp-<tag>/``; rank 0 then
renames the folder. The merged file is written with the rest by a rank that holds every tensor of it
(``_merged_writer``: without ZeRO-3 or half-precision weights, the last rank, which has the fewest files
of its own), else merged by rank 0 from the shards just written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from launch import Topology
from trainer.checkpoint import deepspeed_compat as compat
from trainer.checkpoint.formats import CKPT_FORMAT, Hashes, PendingFile, Snapshot
from trainer.checkpoint.io.atomic import TMP_PREFIX, atomic_rename, atomic_write, atomic_write_json
from trainer.checkpoint.io.serialization import write_safetensors
from trainer.checkpoint.manifest import Manifest
from trainer.checkpoint.sharding.full_state import FullState, full_from_slices, scatter_full_state
from trainer.checkpoint.sharding.zero_merge import merge_zero_optimizer_state, merge_zero_shards
from trainer.checkpoint.states import TrainingStates
from trainer.errors import UserError
from trainer.faults import NO_FAULTS, Faults
from trainer.runs.layout import RunLayout


class BaseFormat:
    payload_key = "state_dict"

    def __init__(self, layout: RunLayout, topo: Topology, config: dict[str, Any], faults: Faults = NO_FAULTS):
        self.layout, self.topo, self.config, self.faults = layout, topo, config, faults
        self.state_root = layout.state_root
        if topo.deepspeed_stage is not None:
            compat.verify_touches()

    def _tmp(self, tag: str) -> Path:
        return self.state_root / f"{TMP_PREFIX}{tag}"

    def _merged_tmp(self, tag: str) -> Path:
        return self.layout.checkpoints / f"{TMP_PREFIX}{tag}.ckpt"

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
        files: list[PendingFile] = []
        weights = None
        merges = progress["step_in_epoch"] == 0 and self._merged_writer(states) == topo.rank
        if topo.deepspeed_stage is not None:  # DeepSpeed's own save, each file it writes held back

            def hold(state_dict: Any, path: str) -> None:
                files.append(PendingFile(Path(path), keep(state_dict), torch.save))

            with compat.engine_file_hooks(states.model, save=hold):
                states.model.save_checkpoint(str(self.state_root), tag=tmp.name, save_latest=False)
            if merges:
                weights = keep(unwrap_model(states.model).state_dict())
        elif topo.is_main:
            weights = keep(unwrap_model(states.model).state_dict())
            files.append(PendingFile(tmp / "model.safetensors", weights, write_safetensors))
            files.append(PendingFile(tmp / "optimizer.pt", keep(states.optimizer.state_dict()), torch.save))
        ema, ema_state = states.ema, None
        if ema.partitioned or topo.is_main:  # unpartitioned EMA is identical on every rank
            ema_state = keep(ema.state_dict())
            files.append(PendingFile(tmp / f"ema_rank{topo.rank}.safetensors", ema_state, write_safetensors))
        files.append(PendingFile(tmp / f"rng_rank{topo.rank}.pt", states.rng.state_dict(), torch.save))
        if merges and weights is not None:
            # Every tensor of the merged file is at hand: write it with the rest, not from the files later.
            full_ema = ema_state if ema_state is not None else keep(ema.state_dict())
            merged = self._merged(weights, full_ema, progress, metrics)
            files.append(PendingFile(self._merged_tmp(tag), merged, torch.save))
        saved = self._trainer_state(progress, states) if topo.is_main else None
        return Snapshot(files, saved)

    def _merged_writer(self, states: TrainingStates) -> int | None:
        """The rank that writes an epoch's merged file from its snapshot, or None when no rank holds every
        tensor of it (ZeRO-3 slices, or half-precision weights beside partitioned fp32 master weights): rank 0
        then merges it from the files. Under ZeRO-1/2 with fp32 weights every rank holds them all, equal to
        the master weights; the last rank writes it, as rank 0 already writes the most files."""
        topo = self.topo
        if states.ema.partitioned:
            return None
        if topo.deepspeed_stage is None:
            return 0  # rank 0 writes the whole state
        module = unwrap_model(states.model)
        if topo.deepspeed_stage >= 3 or any(p.dtype != torch.float32 for p in module.parameters()):
            return None
        return topo.world_size - 1

    def finish(
        self, tag: str, snapshot: Snapshot, written: Hashes, progress: dict[str, Any],
        metrics: dict[str, float], before_publish: Callable[[Path], None],
    ) -> dict[Path, tuple[int, str]]:  # fmt: skip
        tmp, final = self._tmp(tag), self.state_root / tag
        merged_entry = written.pop(self._merged_tmp(tag).name, None)
        atomic_write_json(tmp / "trainer_state.json", snapshot.payload)  # the others were fsynced as written
        if final.exists():  # an uncommitted orphan (its manifest was never written)
            shutil.rmtree(final)
        atomic_rename(tmp, final)
        known = {final / name: entry for name, entry in written.items()}
        if progress["step_in_epoch"] == 0:  # epoch checkpoints also get the merged file users load
            self.faults.point("save.merge", tag=tag, step=progress["global_step"])
            ckpt = self.layout.ckpt(tag)
            if merged_entry is not None:  # written with the state
                atomic_rename(self._merged_tmp(tag), ckpt)
                known[ckpt] = merged_entry
            else:  # merged from the ZeRO shards (or slices) just written
                merged = self._merged(read_model_state(final), read_full_ema(final), progress, metrics)
                known[ckpt] = atomic_write(ckpt, partial(torch.save, merged), before_publish=before_publish)
        return known

    def _trainer_state(self, progress: dict[str, Any], states: TrainingStates) -> dict[str, Any]:
        extra = states.extra_state()
        return {
            **progress,
            "world_size": self.topo.world_size,
            "distributed": self.topo.distributed,
            "ema_partitioned": states.ema.partitioned,
            "param_shapes": {k: list(v) for k, v in states.ema.shapes().items()},
            **({"extra": extra} if extra else {}),
        }

    def _merged(
        self, weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], progress: dict[str, Any],
        metrics: dict[str, float],
    ) -> dict[str, Any]:  # fmt: skip
        return {
            "format": CKPT_FORMAT,
            "kind": self.layout.kind,
            "state_dict": weights,
            "ema_state_dict": ema,
            "epoch": progress["epoch"],
            "global_step": progress["global_step"],
            "metrics": dict(metrics),
            "config": self.config,
        }

    # -- loading --------------------------------------------------------------------------------------

    def load(self, tag: str, states: TrainingStates) -> dict[str, Any]:
        """Restore ``tag`` on every rank, on this launch's number of processes and ZeRO stage."""
        folder, topo = self.state_root / tag, self.topo
        saved = json.loads((folder / "trainer_state.json").read_text())
        _refuse_other_shapes(tag, saved["param_shapes"], states.ema.shapes())
        same_layout = saved["world_size"] == topo.world_size and saved["distributed"] == topo.distributed
        if not same_layout:  # another number of processes or ZeRO stage: the full state from the shards
            module = unwrap_model(states.model)
            scatter_full_state(states.model, states.optimizer, module, read_full_state(folder), topo)
            states.ema.from_full(read_full_ema(folder))
        elif topo.deepspeed_stage is not None:
            with compat.engine_file_hooks(states.model):
                path, _ = states.model.load_checkpoint(
                    str(self.state_root), tag=folder.name, load_optimizer_states=True,
                    load_lr_scheduler_states=False, load_module_strict=True,
                )  # fmt: skip
            if path is None:
                raise UserError(f"DeepSpeed could not load the checkpoint in {folder}")
        else:
            unwrap_model(states.model).load_state_dict(load_file(str(folder / "model.safetensors")))
            states.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        if same_layout:
            own = topo.rank if saved["ema_partitioned"] else 0
            states.ema.load_state_dict(load_file(str(folder / f"ema_rank{own}.safetensors")))
        rng = folder / f"rng_rank{topo.rank}.pt"
        if rng.is_file():
            states.rng.load_state_dict(torch.load(rng, weights_only=True))
        else:
            states.rng.reseed(topo.rank, saved["global_step"])
        states.load_extra(saved.get("extra") or {})
        topo.comm.barrier(what=f"the resume from {tag}")
        return saved

    def adopt(self, tag: str) -> Manifest | None:
        if not tag.startswith("epoch_") or not (self.state_root / tag / "trainer_state.json").is_file():
            return None
        epoch = int(tag.removeprefix("epoch_"))
        manifest = Manifest(tag, epoch, 0, epoch, self.topo.world_size, self.topo.distributed)
        try:
            saved = json.loads((self.state_root / tag / "trainer_state.json").read_text())
            manifest.global_step = int(saved["global_step"])
            manifest.world_size, manifest.distributed = int(saved["world_size"]), str(saved["distributed"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return manifest


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


def read_full_state(folder: Path) -> FullState:
    """The trained parameters, Adam moments and step of one base checkpoint, by name, whatever wrote it."""
    saved = json.loads((folder / "trainer_state.json").read_text())
    names = list(saved["param_shapes"])
    if (folder / "model.safetensors").is_file():
        weights = load_file(str(folder / "model.safetensors"))
        states = torch.load(folder / "optimizer.pt", weights_only=True)["state"]
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
