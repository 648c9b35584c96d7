"""Validation: the mean EDM loss on the held-out split, with the same noise every epoch so epochs compare."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from data import ImageDataset
from launch import Topology


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    val: ImageDataset | None,
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor],
    *,
    topo: Topology,
    micro_batch: int,
    seed: int,
) -> float | None:
    """``loss(images, labels, generator)`` averaged over ``val`` (None without a validation split).

    Every rank runs the same number of forwards (ZeRO-3 forwards are collective); a rank whose share runs
    out early evaluates a placeholder batch with weight 0.
    """
    if val is None or len(val) == 0:
        return None
    model.eval()
    generator = torch.Generator(topo.device).manual_seed(seed + 7919 * (topo.rank + 1))
    mine = torch.arange(topo.rank, len(val), topo.world_size)
    batches = math.ceil(math.ceil(len(val) / topo.world_size) / micro_batch)
    total = count = 0.0
    for b in range(batches):
        chunk = mine[b * micro_batch : (b + 1) * micro_batch]
        weight = len(chunk)
        images, labels = val.batch(chunk if weight else torch.zeros(1, dtype=torch.long))
        total += loss(images, labels, generator).item() * weight
        count += weight
    model.train()
    total, count = topo.comm.all_reduce_sum([total, count], what="the validation loss")
    return total / count
