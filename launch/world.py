"""Where this process sits in the launch, read once from the Accelerator, with the collectives to reach
the other processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

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
    timeout: timedelta = DEFAULT_TIMEOUT
    """How long any collective (the trainer's, DeepSpeed's, torch's) waits for a peer before failing."""
    comm: Collectives = field(default_factory=SingleProcess, compare=False, repr=False)
    """The trainer's own collectives (``launch/collectives.py``); a fake world in unit tests."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> str:
        """``deepspeed-zero2``, ``ddp`` or ``single``: what ``metadata.json`` records."""
        if self.deepspeed_stage is not None:
            return f"deepspeed-zero{self.deepspeed_stage}"
        return "ddp" if self.world_size > 1 else "single"


def topology(accelerator: Any, timeout: timedelta = DEFAULT_TIMEOUT) -> Topology:
    """This process's place in ``accelerator``'s launch; with several processes, creates the trainer's
    collectives (collective: every process calls it at the same point)."""
    stage = None
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        stage = int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))
    rank, world_size = accelerator.process_index, accelerator.num_processes
    precision = str(accelerator.mixed_precision)
    comm = ProcessGroupCollectives(rank, world_size, timeout) if world_size > 1 else SingleProcess()
    return Topology(
        rank=rank,
        world_size=world_size,
        local_rank=accelerator.local_process_index,
        deepspeed_stage=stage,
        device=accelerator.device,
        precision="fp32" if precision == "no" else precision,
        timeout=timeout,
        comm=comm,
    )
