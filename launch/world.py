"""Where this process sits in the launch, read once from the Accelerator, with the collectives to reach
the other processes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from launch.accelerator import LaunchAsks, launch_asks
from launch.collectives import DEFAULT_TIMEOUT, Collectives, ProcessGroupCollectives, SingleProcess


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    deepspeed_stage: int | None
    """ZeRO stage when DeepSpeed drives the run, else None."""
    device: torch.device
    precision: str = "fp32"
    """What the model computes in: ``fp32``, ``bf16`` or ``fp16`` (mixed precision; the optimizer's master
    weights stay fp32)."""
    machines: int = 1
    backend: str = "none"
    """The default process group's backend (``nccl``, ``gloo``), ``none`` for one process."""
    offload: str = "none"
    """Where DeepSpeed offloads the optimizer state and the parameters to (``cpu``, ``nvme``), if anywhere."""
    asks: LaunchAsks = field(default_factory=LaunchAsks)
    """The gradient accumulation and clipping the launch config gives."""
    timeout: timedelta = DEFAULT_TIMEOUT
    """How long any collective (the trainer's, DeepSpeed's, torch's) waits for a peer before failing."""
    comm: Collectives = field(default_factory=SingleProcess, compare=False, repr=False)
    """The trainer's own collectives (``launch/collectives.py``); a fake world in unit tests."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def record(self, micro_batch: int, accumulation: int = 1) -> dict[str, Any]:
        """What the launch is, as ``metadata.json`` records it."""
        return {
            "processes": self.world_size, "machines": self.machines, "device": self.device.type,
            "backend": self.backend, "distributed": self.distributed, "precision": self.precision,
            "offload": self.offload, "micro_batch": micro_batch, "accumulation": accumulation,
            "global_batch": micro_batch * accumulation * self.world_size,
        }  # fmt: skip

    def describe(self, micro_batch: int, accumulation: int = 1) -> str:
        """The launch in one line, said once before training."""
        how = {"single": "no DeepSpeed", "ddp": "DDP"}.get(
            self.distributed, f"DeepSpeed ZeRO-{self.deepspeed_stage}"
        )
        offload = f" offloading to {self.offload}" if self.offload != "none" else ""
        backend = f" ({self.backend})" if self.backend != "none" else ""
        return (
            f"Launch: {_count(self.world_size, 'process')} on {_count(self.machines, 'machine')}, "
            f"{self.device.type}{backend}, {how}{offload}, {self.precision}; batch {micro_batch} per process x "
            f"{_count(accumulation, 'micro-batch')} per step x {_count(self.world_size, 'process')} = "
            f"{micro_batch * accumulation * self.world_size}"
        )

    @property
    def distributed(self) -> str:
        """``deepspeed-zero2``, ``ddp`` or ``single``: what ``metadata.json`` records."""
        if self.deepspeed_stage is not None:
            return f"deepspeed-zero{self.deepspeed_stage}"
        return "ddp" if self.world_size > 1 else "single"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}{'es' if what.endswith(('s', 'ch')) else 's'}"


def topology(accelerator: Any, timeout: timedelta = DEFAULT_TIMEOUT) -> Topology:
    """This process's place in ``accelerator``'s launch; with several processes, creates the trainer's
    collectives (collective: every process calls it at the same point)."""
    stage = None
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        stage = int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))
    rank, world_size = accelerator.process_index, accelerator.num_processes
    precision = str(accelerator.mixed_precision)
    offload = "none"
    if plugin is not None:
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        places = {
            str((zero.get(key) or {}).get("device", "none")) for key in ("offload_optimizer", "offload_param")
        }
        offload = "+".join(sorted(places - {"none"})) or "none"
    import torch.distributed as dist

    backend = str(dist.get_backend()) if world_size > 1 and dist.is_initialized() else "none"
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    comm = ProcessGroupCollectives(rank, world_size, timeout) if world_size > 1 else SingleProcess()
    return Topology(
        rank=rank,
        world_size=world_size,
        local_rank=accelerator.local_process_index,
        deepspeed_stage=stage,
        device=accelerator.device,
        precision="fp32" if precision == "no" else precision,
        machines=max(1, world_size // max(per_machine, 1)),
        backend=backend,
        offload=offload,
        asks=launch_asks(),
        timeout=timeout,
        comm=comm,
    )
