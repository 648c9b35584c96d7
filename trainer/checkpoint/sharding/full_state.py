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

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from launch import Topology

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
    step = max((float(s["step"]) for s in _base_optimizer(model).state.values() if "step" in s), default=0.0)
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
                p.ds_tensor.copy_(local.to(p.ds_tensor.dtype))  # type: ignore[attr-defined]
            else:
                from deepspeed.utils import safe_set_full_fp32_param

                safe_set_full_fp32_param(p, value)
                p.copy_(value.to(p.dtype))  # the working copy the next forward uses


def _scatter_moments(
    model: Any, named: list[tuple[str, nn.Parameter]], full: FullState, topo: Topology
) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

    _materialize_adam_state(model)
    for key in ADAM_STATES:
        for name, p in named:
            value = full.moments[key][name]
            if topo.deepspeed_stage == 3:
                # set_full_hp_param of DeepSpeed 0.19 fails for parameters smaller than the world size;
                # the local slice is the same data, cut with ZeRO-3's own layout.
                safe_set_local_optimizer_state(p, _local_slice(value, p, topo), key)
            else:
                safe_set_full_optimizer_state(p, value, key)
    step = max(full.steps.values(), default=0.0)  # one group: every member has the same count
    for state in _base_optimizer(model).state.values():
        state["step"] = torch.tensor(step, dtype=torch.float32)
    if hasattr(model, "global_steps"):
        model.global_steps = int(step)  # DeepSpeed's own counter, as its load_checkpoint would set it


def _materialize_adam_state(model: Any) -> None:
    """Create Adam's state before the first step, so a resume can write into it.

    torch's AdamW creates its state lazily at the first step, and DeepSpeed links the parameters'
    optimizer-state fragments only to state that exists; a fresh engine has neither. The zeros made here
    are overwritten by the checkpoint's values right after.
    """
    zero_optimizer = model.optimizer
    base = zero_optimizer.optimizer
    # ZeRO-3 hands its flat fp32 partitions to the torch optimizer only during a step.
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or [
        flat for group in base.param_groups for flat in group["params"]
    ]
    for flat in flats:
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


# --------------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------------


def rng_state(noise_generator: torch.Generator) -> dict[str, torch.Tensor]:
    """This rank's RNG states: torch's global one, the EDM noise generator's and (on GPUs) CUDA's."""
    state = {"torch": torch.get_rng_state(), "noise": noise_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(saved: dict[str, torch.Tensor] | None, noise_generator: torch.Generator, *, seed: int, rank: int,
                global_step: int) -> None:  # fmt: skip
    """Restore this rank's RNG states; a rank the checkpoint did not have (more processes now) is seeded
    from (seed, rank, step) instead, so the continuation is still reproducible."""
    if saved is None:
        digest = hashlib.sha256(f"{seed}/{rank}/{global_step}".encode()).digest()
        value = int.from_bytes(digest[:8], "little")
        torch.manual_seed(value)
        noise_generator.manual_seed(value + 1)
        return
    torch.set_rng_state(saved["torch"])
    noise_generator.set_state(saved["noise"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
