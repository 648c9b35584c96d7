"""Checkpoints of a LoRA run: one adapter-only file per epoch, written by global rank 0 alone.

``lora_weights/epoch_NNN.ckpt`` holds ``lora_state_dict`` (the adapters and the modules trained in full,
never a frozen base weight), ``ema_state_dict`` of the same tensors, the optimizer state of those
parameters, epoch and step counters, history and best, metrics, config and every rank's RNG state. The
frozen base is stored once per run in ``base_model/base_model.ckpt``.

Under DeepSpeed the trainable tensors live in the optimizer's fp32 partitions (and, under ZeRO-3, the
parameters themselves are partitioned), so saving gathers exactly the trainable parameters with
DeepSpeed's tensor-fragment API on every rank (a gather on one rank would hang; gathering the whole model
would waste memory), and rank 0 writes. Loading scatters them back the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launch import Topology, barrier
from trainer.atomic import atomic_write
from trainer.checkpoint import (
    CKPT_FORMAT,
    EpochCheckpoints,
    TrainingState,
    epoch_name,
    load_checkpoint_file,
    unwrap_model,
)
from trainer.ema import EMA
from trainer.errors import UserError

ADAM_STATES = ("exp_avg", "exp_avg_sq")


class AdapterCheckpointManager(EpochCheckpoints):
    payload_key = "lora_state_dict"

    def __init__(self, run_dir: Path, topo: Topology, *, keep_last_n: int, config: dict[str, Any]) -> None:
        super().__init__(
            run_dir, run_dir / "lora_weights", topo, keep_last_n=keep_last_n, config=config, kind="lora"
        )

    def _leftover_folders(self) -> list[Path]:
        return [self.dir, self.run_dir]  # the run folder: a half-written adapter/ export

    def save(
        self,
        *,
        model: Any,
        optimizer: Any,
        ema: EMA,
        noise_generator: torch.Generator,
        state: TrainingState,
        metrics: dict[str, float],
        is_best: bool,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        module = unwrap_model(model)
        weights = gather_trainable(module, self.topo)
        optim = gather_optimizer_state(model, optimizer, module, self.topo)
        ema_full = ema.full_state()
        rng = _all_rng_states(noise_generator, self.topo)
        info: dict[str, Any] = {}
        if self.topo.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            ckpt = self.dir / f"{epoch_name(state.epoch)}.ckpt"
            payload = {
                "format": CKPT_FORMAT,
                "kind": "lora",
                "lora_state_dict": weights,
                "ema_state_dict": {k: v.cpu() for k, v in ema_full.items()},
                "optimizer": optim,
                "rng": rng,
                "epoch": state.epoch,
                "global_step": state.global_step,
                "history": state.history or [],
                "best": state.best,
                "metrics": dict(metrics),
                "world_size": self.topo.world_size,
                "distributed": self.topo.distributed,
                "config": self.config,
            }
            atomic_write(ckpt, lambda f: torch.save(payload, f))
            self.publish(ckpt, is_best=is_best, best_epoch=(state.best or {}).get("epoch"))
            info = {"file": str(ckpt), "bytes": ckpt.stat().st_size, "seconds": time.perf_counter() - start}
        barrier(self.topo)
        return info

    def load(
        self, epoch: int, *, model: Any, optimizer: Any, ema: EMA, noise_generator: torch.Generator
    ) -> TrainingState:
        """Restore epoch ``epoch`` on every rank (each reads the file; only rank 0 ever writes it)."""
        ckpt = load_checkpoint_file(self.dir / f"{epoch_name(epoch)}.ckpt", key=self.payload_key)
        module = unwrap_model(model)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        if set(ckpt["lora_state_dict"]) != trainable:
            raise UserError(
                f"the LoRA checkpoint of epoch {epoch} does not fit the adapters configured now "
                f"({len(set(ckpt['lora_state_dict']) ^ trainable)} tensors differ); resume with the run's own "
                "LoRA config"
            )
        if ckpt["world_size"] != self.topo.world_size or ckpt["distributed"] != self.topo.distributed:
            raise UserError(
                f"run was saved with {ckpt['world_size']} process(es) ({ckpt['distributed']}) and is resumed "
                f"with {self.topo.world_size} ({self.topo.distributed}); launch it with the same accelerate "
                "config as before"
            )
        scatter_trainable(module, ckpt["lora_state_dict"], self.topo)
        scatter_optimizer_state(model, optimizer, module, ckpt["optimizer"], self.topo)
        ema.from_full(ckpt["ema_state_dict"])
        rng = ckpt["rng"][self.topo.rank]
        torch.set_rng_state(rng["torch"])
        noise_generator.set_state(rng["noise"])
        barrier(self.topo)
        return TrainingState(
            epoch=ckpt["epoch"], global_step=ckpt["global_step"], history=ckpt["history"], best=ckpt["best"]
        )


# --------------------------------------------------------------------------------------------------
# Gathering and scattering the trainable state
# --------------------------------------------------------------------------------------------------


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def gather_trainable(module: nn.Module, topo: Topology) -> dict[str, torch.Tensor]:
    """Full fp32 trainable tensors (collective under DeepSpeed: call on every rank)."""
    if topo.deepspeed_stage is None:
        return {n: p.detach().float().cpu().clone() for n, p in _trainable(module)}
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in _trainable(module)}


def gather_optimizer_state(model: Any, optimizer: Any, module: nn.Module, topo: Topology) -> dict[str, Any]:
    """Adam moments of the trainable parameters, by name, plus the step counters (collective)."""
    if topo.deepspeed_stage is None:
        return {"torch": optimizer.state_dict()}
    from deepspeed.utils import safe_get_full_optimizer_state

    moments = {
        key: {n: safe_get_full_optimizer_state(p, key).detach().cpu().clone() for n, p in _trainable(module)}
        for key in ADAM_STATES
    }
    steps = [state["step"].clone() for state in _base_optimizer(model).state.values()]
    return {"moments": moments, "steps": steps}


def scatter_trainable(module: nn.Module, weights: dict[str, torch.Tensor], topo: Topology) -> None:
    """Load full trainable tensors into the live (possibly DeepSpeed-partitioned) model."""
    with torch.no_grad():
        for name, p in _trainable(module):
            value = weights[name]
            if topo.deepspeed_stage is None:
                p.copy_(value.to(p.dtype))
            elif topo.deepspeed_stage == 3:
                from deepspeed.utils import safe_set_local_fp32_param

                local = _local_slice(value, p, topo)
                safe_set_local_fp32_param(p, local)
                p.ds_tensor.copy_(local.to(p.ds_tensor.dtype))  # type: ignore[attr-defined]
            else:
                from deepspeed.utils import safe_set_full_fp32_param

                safe_set_full_fp32_param(p, value)
                p.copy_(value.to(p.dtype))  # the working copy the next forward uses


def scatter_optimizer_state(
    model: Any, optimizer: Any, module: nn.Module, saved: dict[str, Any], topo: Topology
) -> None:
    if topo.deepspeed_stage is None:
        optimizer.load_state_dict(saved["torch"])
        return
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

    _materialize_adam_state(model)
    for key in ADAM_STATES:
        for name, p in _trainable(module):
            value = saved["moments"][key][name]
            if topo.deepspeed_stage == 3:
                # set_full_hp_param of DeepSpeed 0.19 fails for parameters smaller than the world size;
                # the local slice is the same data, cut with ZeRO-3's own layout.
                safe_set_local_optimizer_state(p, _local_slice(value, p, topo), key)
            else:
                safe_set_full_optimizer_state(p, value, key)
    for state, step in zip(_base_optimizer(model).state.values(), saved["steps"]):
        state["step"] = step.clone()


def _materialize_adam_state(model: Any) -> None:
    """Create Adam's state before the first step, so a resume can write into it.

    torch's AdamW creates its state lazily at the first step, and DeepSpeed links the parameters'
    optimizer-state fragments only to state that exists; a fresh engine has neither. The zeros made here
    are overwritten by the checkpoint's values right after.
    """
    zero_optimizer = model.optimizer
    base = zero_optimizer.optimizer
    for group in base.param_groups:
        for flat in group["params"]:
            if not base.state.get(flat):
                base.state[flat] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the fragments
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _local_slice(full: torch.Tensor, param: Any, topo: Topology) -> torch.Tensor:
    """This rank's part of a full tensor under ZeRO-3: padded to world_size × slice and cut evenly."""
    per_rank = param.ds_tensor.numel()  # param: a ZeRO-3 parameter (typed Any)
    flat = torch.zeros(per_rank * topo.world_size, dtype=torch.float32)
    flat[: full.numel()] = full.reshape(-1).float()
    return flat[topo.rank * per_rank : (topo.rank + 1) * per_rank].to(param.ds_tensor.device)


def _base_optimizer(model: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO optimizer (holds Adam's per-group step counters)."""
    return model.optimizer.optimizer


def _all_rng_states(noise_generator: torch.Generator, topo: Topology) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG state, gathered to every rank (a few KB)."""
    mine = {"torch": torch.get_rng_state(), "noise": noise_generator.get_state()}
    if topo.world_size == 1:
        return [mine]
    everyone: list[Any] = [None] * topo.world_size
    torch.distributed.all_gather_object(everyone, mine)
    return everyone
