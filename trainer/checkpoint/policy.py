"""When the checkpoint engine saves and what it keeps: the policy it is given (``config/schema.py``'s
``CheckpointConfig.policy()`` builds it from a run's config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trainer.checkpoint.retention import RetentionPolicy


@dataclass(frozen=True)
class CheckpointPolicy:
    save_every_n_epochs: int = 1
    save_every_n_steps: int = 0
    """0: no step checkpoints."""
    save_every_n_minutes: float = 0.0
    """0: no checkpoints by the clock (global rank 0's decides)."""
    async_save: bool = True
    """Training waits only for the host-memory snapshot; the files are written in the background."""
    on_save_error: Literal["continue", "fail"] = "fail"
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
