"""A fake world of N ranks in one process, one thread per rank, and a checkpoint manager to put in it.

``ThreadWorld`` implements ``launch.Collectives`` with real rendezvous between threads (a barrier per
group), so the checkpoint manager's rank rules run for real in milliseconds, the way torchtitan tests its
checkpointer with the rank patched. ``tiny_manager`` builds a manager of a base run around a small
``nn.Sequential`` (no DeepSpeed: ranks other than 0 write only their RNG state, as under DDP).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launch import Topology
from trainer.checkpoint.formats import CheckpointFormat
from trainer.checkpoint.formats.base import BaseFormat
from trainer.checkpoint.manager import CheckpointManager
from trainer.checkpoint.states import RNGState, TrainingStates, TrainState
from trainer.config.schema import CheckpointConfig
from trainer.faults import NO_FAULTS, Faults
from trainer.runs.layout import RunLayout
from trainer.runs.metadata import RunHandle, new_metadata, write_metadata
from trainer.training.ema import EMA
from trainer.training.trackers import Trackers

TIMEOUT = 20.0


class _Group:
    def __init__(self, size: int) -> None:
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return values


class ThreadWorld:
    """``size`` ranks, each a thread calling ``comm(rank)``'s collectives."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.main, self.background = _Group(size), _Group(size)

    def comm(self, rank: int) -> ThreadCollectives:
        return ThreadCollectives(self, rank)

    def topology(self, rank: int) -> Topology:
        return Topology(rank=rank, world_size=self.size, local_rank=rank, deepspeed_stage=None,
                        device=torch.device("cpu"), comm=self.comm(rank))  # fmt: skip

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """``fn(rank)`` on every rank at once; their results in rank order (an exception is re-raised)."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def body(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as e:
                errors.append(e)
                self.main.barrier.abort()
                self.background.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 3)
        if errors:
            raise errors[0]
        return results


class ThreadCollectives:
    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world, self.rank = world, rank

    def broadcast(self, value: Any, *, what: str) -> Any:
        return self.world.main.exchange(self.rank, value)[0]

    def all_reduce_sum(self, values: list[float], *, what: str) -> list[float]:
        everyone = self.world.main.exchange(self.rank, list(values))
        return [float(sum(column)) for column in zip(*everyone)]

    def all_gather(self, value: Any, *, what: str) -> list[Any]:
        return self.world.main.exchange(self.rank, value)

    def barrier(self, *, what: str) -> None:
        self.world.main.exchange(self.rank, None)

    def background_exchange(self, value: Any, *, what: str) -> list[Any] | None:
        everyone = self.world.background.exchange(self.rank, value)
        return everyone if self.rank == 0 else None

    def background_broadcast(self, value: Any, *, what: str) -> Any:
        return self.world.background.exchange(self.rank, value)[0]


def tiny_states(seed: int = 0) -> TrainingStates:
    """A trained two-layer model, its AdamW state and EMA, and fresh counters."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    ema = EMA(model.named_parameters(), halflife_kimg=0.001, rampup_ratio=None)
    for _ in range(2):
        model(torch.randn(3, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(images_seen=3, batch_size=3)
    return TrainingStates(model, optimizer, ema, TrainState(), RNGState(seed))


def new_run(path: Path, kind: str = "base") -> RunLayout:
    """A run folder as ``create_run`` leaves it: folders and metadata.json."""
    layout = RunLayout(path, kind)
    for folder in layout.new_folders():
        folder.mkdir(parents=True, exist_ok=True)
    write_metadata(path, new_metadata(number=1, kind=kind, experiment="test", dataset="fake", num_classes=2,
                                      world_size=1, distributed="single"))  # fmt: skip
    return layout


def tiny_manager(
    layout: RunLayout,
    topo: Topology,
    states: TrainingStates,
    fmt: CheckpointFormat | None = None,
    faults: Faults = NO_FAULTS,
    **policy: Any,
) -> CheckpointManager:
    """A manager of the run at ``layout`` (``policy``: ``CheckpointConfig`` fields), by default of a base run."""
    run = RunHandle(layout, is_main=topo.is_main)
    fmt = fmt or BaseFormat(layout.checkpoint_folder, topo, config={"lr": 0.1})
    return CheckpointManager(layout.checkpoint_folder, fmt, topo, states, CheckpointConfig(**policy).policy(),
                             journal=run, metrics=Trackers(), faults=faults)  # fmt: skip


def end_epoch(states: TrainingStates, epoch: int, steps_per_epoch: int = 2, loss: float = 0.5) -> None:
    """Move the counters to the end of ``epoch`` as the loop does, ``loss`` as its train and val loss."""
    progress = states.progress
    progress.global_step = epoch * steps_per_epoch
    progress.end_epoch({"epoch": epoch, "train_loss": loss, "val_loss": loss, "checkpoint": None})
