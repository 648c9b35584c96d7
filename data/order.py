"""The order in which a run visits its training data: a pure function of (seed, epoch).

A generator whose state lives inside a DataLoader is lost or mis-restored on resume (DEVELOPERS.md: resumed
weights then differ), so each epoch's permutation is recomputed from the seed and the epoch number. The
permutation is cut into *global* batches; each rank takes its contiguous share of every global batch, so the
samples of a step are the same whether the run has one process or eight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EpochOrder:
    indices: torch.Tensor
    """int64 (steps, global_batch): dataset indices of every global batch of the epoch."""
    flips: torch.Tensor
    """bool (steps, global_batch): which of those images are mirrored (all False without augmentation)."""

    @property
    def steps(self) -> int:
        return self.indices.shape[0]

    def for_rank(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch ``step``."""
        per_rank = self.indices.shape[1] // world_size
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        return self.indices[step, part], self.flips[step, part]


def epoch_order(num_items: int, global_batch: int, *, seed: int, epoch: int, random_flip: bool) -> EpochOrder:
    """Shuffled global batches of epoch ``epoch`` (1-based); the incomplete last batch is dropped."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    permutation = torch.randperm(num_items, generator=generator)
    flips = (
        torch.rand(num_items, generator=generator) < 0.5
        if random_flip
        else torch.zeros(num_items, dtype=torch.bool)
    )
    steps = num_items // global_batch
    used = steps * global_batch
    return EpochOrder(
        permutation[:used].view(steps, global_batch), flips[permutation[:used]].view(steps, global_batch)
    )
