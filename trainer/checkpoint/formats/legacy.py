"""Base checkpoints of earlier versions of the trainer, read so that every run written before keeps resuming.

Until the layout of ``base.py`` (``trainer_state.json``'s ``state_version`` 2), a base checkpoint's resumable
state was DeepSpeed's own ``save_checkpoint`` files (``*_optim_states.pt`` with each rank's fp32 master
partition and Adam state, ``*model_states.pt`` with the module's weights), or in a single process
``model.safetensors`` + ``optimizer.pt``; beside them each rank's EMA (``ema_rankN.safetensors``) and RNG,
and for an epoch a merged ``epoch_NNN.ckpt`` written again from the same tensors. Runs from before manifests
existed have no ``manifests/`` at all (``adopt``).

On the processes and ZeRO stage that wrote it, such a checkpoint loads through DeepSpeed's own
``load_checkpoint`` (every file it reads weights-only); on others, the full state is merged from the shards
(``sharding/zero_merge.py``) and scattered (``sharding/full_state.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from launch import Topology
from trainer.checkpoint import deepspeed_compat as compat
from trainer.checkpoint.formats import CheckpointDamaged
from trainer.checkpoint.manifest import Manifest
from trainer.checkpoint.sharding.full_state import FullState, full_from_slices, scatter_full_state
from trainer.checkpoint.sharding.zero_merge import merge_zero_optimizer_state, merge_zero_shards
from trainer.checkpoint.states import TrainingStates, unwrap_model
from trainer.errors import UserError
from trainer.storage.json_files import read_json_file
from trainer.storage.tensor_files import read_layout


def load(folder: Path, saved: dict[str, Any], states: TrainingStates, topo: Topology) -> None:
    """Restore the checkpoint in ``folder`` (``saved``: its ``trainer_state.json``) on every rank, on this
    launch's number of processes and ZeRO stage (the counters are the caller's)."""
    same_layout = saved["world_size"] == topo.world_size and saved["distributed"] == topo.distributed
    if not same_layout:  # another number of processes or ZeRO stage: the full state from the shards
        module = unwrap_model(states.model)
        scatter_full_state(states.model, states.optimizer, module, read_full_state(folder), topo)
        states.ema.from_full(read_full_ema(folder))
    elif topo.deepspeed_stage is not None:
        with compat.engine_file_hooks(states.model):
            path, _ = states.model.load_checkpoint(
                str(folder.parent), tag=folder.name, load_optimizer_states=True,
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


def check(folder: Path, files: list[Path]) -> None:
    """That every listed file of a checkpoint of an earlier version reads back weights-only (its pickles
    memory-mapped, so only their structure is read; safetensors by their header), before ``load`` changes
    any state: ``CheckpointDamaged`` naming the first that does not."""
    for path in files:
        try:
            if path.suffix == ".pt":
                compat.load_shard(path)
            elif path.suffix == ".safetensors":
                read_layout(path)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
            reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
            raise CheckpointDamaged(f"{path.name} cannot be read weights-only ({reason[:200]})") from None


def adopt(state_root: Path, tag: str, topo: Topology) -> Manifest | None:
    """The manifest (without files) of an epoch checkpoint written before manifests existed, or None if it
    is not resumable."""
    if not tag.startswith("epoch_") or not (state_root / tag / "trainer_state.json").is_file():
        return None
    epoch = int(tag.removeprefix("epoch_"))
    manifest = Manifest(tag, epoch, 0, epoch, topo.world_size, topo.distributed)
    try:
        saved = read_json_file(state_root / tag / "trainer_state.json")
        manifest.global_step = int(saved["global_step"])
        manifest.world_size, manifest.distributed = int(saved["world_size"]), str(saved["distributed"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return manifest


def read_full_state(folder: Path) -> FullState:
    """The trained parameters, Adam moments and step of one checkpoint, by name, whatever wrote it."""
    saved = read_json_file(folder / "trainer_state.json")
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
    """Full fp32 model weights from one checkpoint's resumable state (merging ZeRO shards if needed)."""
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    return merge_zero_shards(folder)


def read_full_ema(folder: Path) -> dict[str, torch.Tensor]:
    """Full EMA tensors from one checkpoint's resumable state (reassembling ZeRO-3 slices if needed)."""
    saved = read_json_file(folder / "trainer_state.json")
    if not saved["ema_partitioned"]:
        return load_file(str(folder / "ema_rank0.safetensors"))
    slices = [load_file(str(folder / f"ema_rank{r}.safetensors")) for r in range(saved["world_size"])]
    return {
        name: full_from_slices([s[name] for s in slices], torch.Size(shape))
        for name, shape in saved["param_shapes"].items()
    }
