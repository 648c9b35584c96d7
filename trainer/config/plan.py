"""How a run's steps are laid out: the per-process micro batch, optimizer steps per epoch, and the learning
rate of every step."""

from __future__ import annotations

import math

from trainer.config.schema import TrainConfig
from trainer.errors import UserError


def plan_steps(config: TrainConfig, num_train: int, world_size: int) -> tuple[int, int]:
    """(per-process micro batch, optimizer steps per epoch); refuses batch sizes that cannot work."""
    if config.batch_size % world_size:
        raise UserError(
            f"batch size {config.batch_size} is not divisible by the {world_size} processes of this launch; "
            f"choose a multiple of {world_size} (--batch-size) or change --num_processes"
        )
    steps = num_train // config.batch_size
    if steps == 0:
        raise UserError(
            f"batch size {config.batch_size} is larger than the {num_train} training images; "
            "choose a smaller --batch-size"
        )
    if config.max_steps_per_epoch is not None:
        steps = min(steps, config.max_steps_per_epoch)
    return config.batch_size // world_size, steps


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    base = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base
