"""Which committed checkpoints a run keeps: a pure decision, applied by the commit protocol.

A checkpoint survives if any rule keeps it, and each kept one says why:
  ``last N``   the newest ``keep_last_n`` epoch checkpoints (0: every epoch);
  ``best``     the best epoch's checkpoint, always;
  ``newest``   a step checkpoint that is the newest checkpoint of all (what a resume continues from);
older step checkpoints are dropped once a newer checkpoint exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.checkpoint.manifest import Manifest


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last_n: int = 3
    """Newest epoch checkpoints kept besides the best one; 0 keeps every epoch."""


@dataclass
class RetentionPlan:
    keep: dict[str, list[str]]
    """Tag → the rules that keep it."""
    drop: list[str]
    """Tags to remove, oldest first."""


def plan_retention(
    committed: list[Manifest], policy: RetentionPolicy, best_epoch: int | None
) -> RetentionPlan:
    """Apply ``policy`` to ``committed`` (oldest first, as ``read_manifests`` returns them)."""
    keep: dict[str, list[str]] = {}
    epochs = [m for m in committed if m.is_epoch]
    last = epochs[-policy.keep_last_n :] if policy.keep_last_n else epochs
    for m in last:
        keep.setdefault(m.tag, []).append(f"last {policy.keep_last_n}" if policy.keep_last_n else "keep all")
    for m in epochs:
        if m.epoch == best_epoch:
            keep.setdefault(m.tag, []).append("best")
    if committed and not committed[-1].is_epoch:
        keep.setdefault(committed[-1].tag, []).append("newest")
    drop = [m.tag for m in committed if m.tag not in keep]
    return RetentionPlan(keep, drop)
