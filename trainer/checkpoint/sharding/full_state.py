"""The training state by parameter name, independent of how it is sharded: gather it, scatter it back.

``FullState`` holds full fp32 tensors of the trained parameters, Adam's two moments for each, and Adam's step,
all keyed by parameter name. It is the same whether the run used one process, DDP, ZeRO-2 or ZeRO-3, which
makes it the format of LoRA checkpoints (small: only the trained tensors) and the bridge that lets a base run
resume on a different number of processes or ZeRO stage (``checkpoint.read_full_state`` builds it from the
shards on disk).

Under DeepSpeed the trained tensors live in the optimizer's fp32 partitions (under ZeRO-3 the parameters
themselves are partitioned), so both directions use DeepSpeed's tensor-fragment API on every rank: a gather
or scatter on one rank alone would hang.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from launch import Topology
from trainer.checkpoint import deepspeed_compat as compat

ADAM_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class FullState:
    params: dict[str, torch.Tensor]
    """Full fp32 value of every trained parameter."""
    moments: dict[str, dict[str, torch.Tensor]]
    """``{"exp_avg": {name: tensor}, "exp_avg_sq": {name: tensor}}``."""
    steps: dict[str, float]
    """Adam's step count per parameter (one value per group under DeepSpeed, repeated for its members)."""

    def optimizer_dict(self) -> dict[str, Any]:
        return {"moments": self.moments, "steps": self.steps}


def trained(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def gather_full_state(model: Any, optimizer: Any, module: nn.Module, topo: Topology) -> FullState:
    """The trained parameters and their Adam state, full-sized on every rank (collective under DeepSpeed)."""
    named = trained(module)
    if topo.deepspeed_stage is None:
        params = {n: p.detach().float().cpu().clone() for n, p in named}
        moments: dict[str, dict[str, torch.Tensor]] = {key: {} for key in ADAM_STATES}
        steps = {}
        for n, p in named:
            state = optimizer.state.get(p) or {}
            for key in ADAM_STATES:
                moments[key][n] = (
                    state[key].detach().cpu().clone() if key in state else torch.zeros_like(params[n])
                )
            steps[n] = float(state.get("step", 0.0))
        return FullState(params, moments, steps)

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in named}
    moments = {
        key: {n: safe_get_full_optimizer_state(p, key).detach().cpu().clone() for n, p in named}
        for key in ADAM_STATES
    }
    step = compat.optimizer_step(model)
    return FullState(params, moments, {n: step for n, _ in named})


def scatter_full_state(
    model: Any, optimizer: Any, module: nn.Module, full: FullState, topo: Topology
) -> None:
    """Load a ``FullState`` into the live model and optimizer, however they are sharded now."""
    named = trained(module)
    missing = [n for n, _ in named if n not in full.params]
    if missing:
        raise KeyError(f"the saved state lacks {len(missing)} trained parameters, e.g. {missing[0]}")
    if topo.deepspeed_stage is None:
        with torch.no_grad():
            for n, p in named:
                p.copy_(full.params[n].to(p.dtype))
                optimizer.state[p] = {
                    "step": torch.tensor(full.steps[n], dtype=torch.float32),
                    **{key: full.moments[key][n].to(p.device, torch.float32).clone() for key in ADAM_STATES},
                }
        return
    _scatter_params(named, full.params, topo)
    _scatter_moments(model, named, full, topo)


def _scatter_params(
    named: list[tuple[str, nn.Parameter]], values: dict[str, torch.Tensor], topo: Topology
) -> None:
    with torch.no_grad():
        for name, p in named:
            value = values[name]
            if topo.deepspeed_stage == 3:
                from deepspeed.utils import safe_set_local_fp32_param

                local = _local_slice(value, p, topo)
                safe_set_local_fp32_param(p, local)
                part = compat.zero3_slice(p)
                assert part is not None
                part.copy_(local.to(part.dtype))
            else:
                from deepspeed.utils import safe_set_full_fp32_param

                safe_set_full_fp32_param(p, value)
                p.copy_(value.to(p.dtype))  # the working copy the next forward uses


def _scatter_moments(
    model: Any, named: list[tuple[str, nn.Parameter]], full: FullState, topo: Topology
) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

    compat.create_adam_state(model)
    for key in ADAM_STATES:
        for name, p in named:
            value = full.moments[key][name]
            if topo.deepspeed_stage == 3:
                # set_full_hp_param of DeepSpeed 0.19 fails for parameters smaller than the world size;
                # the local slice is the same data, cut with ZeRO-3's own layout.
                safe_set_local_optimizer_state(p, _local_slice(value, p, topo), key)
            else:
                safe_set_full_optimizer_state(p, value, key)
    compat.set_optimizer_step(model, max(full.steps.values(), default=0.0))  # one group, one count


def _local_slice(full: torch.Tensor, param: Any, topo: Topology) -> torch.Tensor:
    """This rank's part of a full tensor under ZeRO-3: padded to world_size × slice and cut evenly."""
    part = compat.zero3_slice(param)
    assert part is not None, "not a ZeRO-3 parameter"
    per_rank = part.numel()
    flat = torch.zeros(per_rank * topo.world_size, dtype=torch.float32)
    flat[: full.numel()] = full.reshape(-1).float()
    return flat[topo.rank * per_rank : (topo.rank + 1) * per_rank].to(part.device)


def full_from_slices(slices: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Reassemble a ZeRO-3-partitioned tensor from every rank's slice (rank order)."""
    numel = math.prod(shape)
    return torch.cat([s.reshape(-1) for s in slices])[:numel].reshape(shape).clone()
