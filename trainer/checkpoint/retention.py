"""Which committed checkpoints a run keeps: a pure decision, applied by the commit protocol.

Rules combine as Orbax's do: a checkpoint survives if any rule keeps it, and each kept one says why.
  ``last N``      the newest ``keep_last_n`` epoch checkpoints (``keep_last_n: 0``: every epoch, ``keep all``);
  ``best``        the best epoch's checkpoint, always;
  ``best N``      the ``keep_best_n`` best epochs by the monitored metric;
  ``every N``     every ``keep_every_n_epochs``-th epoch, forever (Orbax's ``keep_period``);
  ``newest``      a step checkpoint that is the newest checkpoint of all (what a resume continues from).
Older step checkpoints are dropped once a newer checkpoint exists. Checkpoints a run went back past
(``superseded/``) are outside the checkpoint folder: no rule counts or drops them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.checkpoint.manifest import Manifest


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last_n: int = 3
    """Newest epoch checkpoints kept besides the best one; 0 keeps every epoch."""
    keep_best_n: int = 0
    """The best N epochs by the monitored metric (0: only the best)."""
    keep_every_n_epochs: int = 0
    """Every N-th epoch kept forever (0: off)."""


@dataclass
class RetentionPlan:
    keep: dict[str, list[str]]
    """Tag → the rules that keep it."""
    drop: list[str]
    """Tags to remove, oldest first."""


@dataclass
class Scores:
    """The monitored metric of each epoch (from the run's history) and which way is better."""

    values: dict[int, float] = field(default_factory=dict)
    mode: str = "min"

    @classmethod
    def from_history(cls, history: list[dict[str, Any]], best: dict[str, Any] | None) -> Scores:
        metric = str((best or {}).get("metric") or "val_loss")
        values = {
            int(entry["epoch"]): float(entry[metric])
            for entry in history
            if isinstance(entry.get(metric), int | float) and isinstance(entry.get("epoch"), int)
        }
        return cls(values, str((best or {}).get("mode") or "min"))


def plan_retention(
    committed: list[Manifest], policy: RetentionPolicy, best_epoch: int | None, scores: Scores | None = None
) -> RetentionPlan:
    """Apply ``policy`` to ``committed`` (oldest first, as ``read_manifests`` returns them)."""
    keep: dict[str, list[str]] = {}

    def reason(manifest: Manifest, why: str) -> None:
        keep.setdefault(manifest.tag, []).append(why)

    epochs = [m for m in committed if m.is_epoch]
    for m in epochs[-policy.keep_last_n :] if policy.keep_last_n else epochs:
        reason(m, f"last {policy.keep_last_n}" if policy.keep_last_n else "keep all")
    for m in epochs:
        if m.epoch == best_epoch:
            reason(m, "best")
        if policy.keep_every_n_epochs and m.epoch % policy.keep_every_n_epochs == 0:
            reason(m, f"every {policy.keep_every_n_epochs}")
    if policy.keep_best_n and scores is not None:
        scored = [m for m in epochs if m.epoch in scores.values]
        ranked = sorted(scored, key=lambda m: scores.values[m.epoch], reverse=scores.mode == "max")
        for m in ranked[: policy.keep_best_n]:
            reason(m, f"best {policy.keep_best_n}")
    if committed and not committed[-1].is_epoch:
        reason(committed[-1], "newest")
    return RetentionPlan(keep, [m.tag for m in committed if m.tag not in keep])
