"""Validation: the mean EDM loss on the held-out split, each image with noise of its own that is the same every
epoch and on any number of processes, so epochs, and runs on different world sizes, compare."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch

from data import ImageDataset
from launch import Topology, agree_on_signal


class ValidationStopped(Exception):
    """A stop signal, agreed by every rank, ended validation between two batches."""

    def __init__(self, signal: int) -> None:
        super().__init__(f"signal {signal}")
        self.signal = signal


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    val: ImageDataset | None,
    loss: Callable[[torch.Tensor, torch.Tensor, list[torch.Generator]], torch.Tensor],
    *,
    topo: Topology,
    micro_batch: int,
    seed: int,
    stop_signal: Callable[[int], int | None] = lambda batch: None,
) -> float | None:
    """``loss(images, labels, generators)`` averaged over ``val`` (None without a validation split); image ``i``
    draws its noise from a generator seeded with (``seed``, ``i``).

    Every rank runs the same number of forwards (ZeRO-3 forwards are collective); a rank whose share runs
    out early evaluates a placeholder batch with weight 0. Before each batch ``b`` (from 1) the ranks agree
    whether any of them has a ``stop_signal(b)``; if one has, ``ValidationStopped`` ends validation on every
    rank at once.
    """
    if val is None or len(val) == 0:
        return None
    model.eval()
    mine = torch.arange(topo.rank, len(val), topo.world_size)
    batches = math.ceil(math.ceil(len(val) / topo.world_size) / micro_batch)
    total = count = 0.0
    for b in range(batches):
        stop, _ = agree_on_signal(topo.comm, topo.rank, topo.world_size, stop_signal(b + 1),
                                  what=f"the stop check before validation batch {b + 1}")  # fmt: skip
        if stop is not None:
            raise ValidationStopped(stop)
        chunk = mine[b * micro_batch : (b + 1) * micro_batch]
        weight = len(chunk)
        chunk = chunk if weight else torch.zeros(1, dtype=torch.long)
        images, labels = val.batch(chunk)
        generators = [torch.Generator(topo.device).manual_seed(image_seed(seed, int(i))) for i in chunk]
        total += loss(images, labels, generators).item() * weight
        count += weight
    model.train()
    total, count = topo.comm.all_reduce_sum([total, count], what="the validation loss")
    return total / count


def image_seed(seed: int, index: int) -> int:
    """The seed of validation image ``index``'s noise in a run seeded ``seed``: a hash, so that it shares no
    seed with the training steps' noise (``seed * 1_000_003 + step``)."""
    digest = hashlib.blake2b(f"validation {seed} {index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
