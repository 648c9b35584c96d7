"""How a run's steps are laid out: the global batch cut into micro-batches (per process, per accumulation
step), optimizer steps per epoch, and the learning rate of every step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainer.config.schema import TrainConfig
from trainer.errors import UserError

if TYPE_CHECKING:
    from launch.accelerator import LaunchAsks


@dataclass(frozen=True)
class StepPlan:
    micro_batch: int
    """Images per process per forward pass."""
    accumulation: int
    """Micro-batches each process sums per optimizer step."""
    steps_per_epoch: int
    """Optimizer steps per epoch."""


def accumulation_steps(config: TrainConfig, asks: LaunchAsks | None) -> int:
    """The run's gradient accumulation: its config's (``--gradient-accumulation-steps``), else the launch
    config's, else 1. Both given and different: refused, naming both (neither silently wins)."""
    own = config.distributed.gradient_accumulation_steps
    launch = asks.accumulation if asks is not None else None
    if own is not None and launch is not None and own != launch:
        assert asks is not None
        raise UserError(
            f"gradient accumulation is {own} in this run's config (--gradient-accumulation-steps, or "
            f"distributed.gradient_accumulation_steps) but {launch} in {asks.source}: give it in one place, "
            "or the same value in both"
        )
    return own or launch or 1


def check_clipping(config: TrainConfig, asks: LaunchAsks | None) -> None:
    """The launch config's gradient clipping, where it gives one, must be the run's ``grad_clip``."""
    if asks is not None and asks.clipping is not None and asks.clipping != config.grad_clip:
        raise UserError(
            f"{asks.source} clips gradients at {asks.clipping:g} but this run's grad_clip is "
            f"{config.grad_clip:g}: pass --set grad_clip={asks.clipping:g}, or set gradient_clipping to "
            '"auto" there'
        )


def plan_steps(
    config: TrainConfig, num_train: int, world_size: int, asks: LaunchAsks | None = None
) -> StepPlan:
    """The run's steps on ``world_size`` processes; refuses batch sizes and launch settings that cannot work."""
    accumulation = accumulation_steps(config, asks)
    check_clipping(config, asks)
    split = world_size * accumulation
    if config.batch_size % split:
        how = f"the {world_size} processes of this launch"
        if accumulation > 1:
            how += f" x {accumulation} accumulated micro-batches"
        raise UserError(
            f"batch size {config.batch_size} is not divisible by {how}; choose a multiple of {split} "
            "(--batch-size), or change --num_processes or --gradient-accumulation-steps"
        )
    steps = num_train // config.batch_size
    if steps == 0:
        raise UserError(
            f"batch size {config.batch_size} is larger than the {num_train} training images; "
            "choose a smaller --batch-size"
        )
    if config.max_steps_per_epoch is not None:
        steps = min(steps, config.max_steps_per_epoch)
    return StepPlan(config.batch_size // split, accumulation, steps)


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    base = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base
