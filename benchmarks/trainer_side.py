"""The trainer's checkpointing inside a benchmark's own launched script: the model and optimizer prepared by
Accelerate and DeepSpeed as the trainer prepares them, the trainer's EMA, counters and RNG registered in
its ``TrainingStates``, and its ``CheckpointManager`` and ``BaseFormat``, built as ``trainer/training/loop.py``
builds them (``TrainerSide``). Used by ``peer_timings.py`` and ``scale_timings.py``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.hand_loop import batch_loss, prepare

EPOCH_END = {"metrics": {"train_loss": 1.0}, "is_best": False}
"""What the trainer's loop passes to ``maybe_save`` at an epoch's end (no validation here)."""


class TrainerSide:
    """One launch's trainer state, after ``train_step``s; ``times`` collects what ``timed`` measured.
    Without ``with_engine``, only the data and the accelerator (its processes) are built: ``engine``,
    ``ema`` and ``states`` are None, for a launch that times something else on the same batches."""

    def __init__(
        self, data_root: Path, work: Path, *, batch: int, model: str, overrides: list[tuple[str, Any]] | None = None,
        deepspeed: dict[str, Any] | None = None, with_engine: bool = True,
    ) -> None:  # fmt: skip
        from launch import topology
        from trainer.checkpoint.states import RNGState, TrainingStates, TrainState, unwrap_model
        from trainer.training.ema import EMA

        self.config, self.splits, self.accelerator, self.engine, optimizer = prepare(
            data_root, batch=batch, steps=1, epochs=1, model_name=model, model_overrides=overrides,
            deepspeed=deepspeed, with_model=with_engine,
        )  # fmt: skip
        acc, config = self.accelerator, self.config
        self.rank, self.world, self.batch = acc.process_index, acc.num_processes, batch
        self.is_main, self.work = acc.is_main_process, work
        self.topo = topology(acc)
        self.times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.ema: Any = None
        self.states: Any = None
        if not with_engine:
            return
        module = unwrap_model(self.engine)
        self.ema = EMA(module.named_parameters(), halflife_kimg=config.ema_halflife_kimg,
                       rampup_ratio=config.ema_rampup_ratio, rank=self.rank, world_size=self.world)  # fmt: skip
        self.states = TrainingStates(self.engine, optimizer, self.ema, TrainState(), RNGState(config.seed))

    def batch_of(self, step: int) -> tuple[Any, Any]:
        """This rank's share of the global batch ``step`` of epoch 1."""
        from data.order import epoch_order

        config, device = self.config, self.accelerator.device
        order = epoch_order(len(self.splits.train), self.batch, seed=config.seed, epoch=1, random_flip=False)
        images, labels = self.splits.train.batch(*order.for_rank(step % order.steps, self.rank, self.world))
        return images.to(device), labels.to(device)

    def train_step(self, step: int = 0) -> None:
        """One optimizer step and EMA update of the trainer's model."""
        import torch

        images, labels = self.batch_of(step)
        generator = torch.Generator(self.accelerator.device).manual_seed(step)
        loss = batch_loss(self.config, self.engine, images, labels, generator, (self.rank, self.world))
        self.accelerator.backward(loss)
        self.states.optimizer.step()
        self.states.optimizer.zero_grad(set_to_none=True)
        self.ema.update(images_seen=(step + 1) * self.batch, batch_size=self.batch)

    def next_epoch(self) -> None:
        """Move the counters on by an epoch, as the loop does before its epoch-end save."""
        progress = self.states.progress
        progress.global_step += 1
        progress.end_epoch({"epoch": progress.epoch + 1, "train_loss": 1.0, "checkpoint": None})

    def layout(self, name: str) -> Any:
        """The run the trainer's checkpoint manager of ``name`` saves (``WORK/<name>/base_training/run_001``)."""
        from trainer.runs.layout import RunLayout

        return RunLayout.of(self.work / name, "base", 1)

    def manager(self, name: str, *, async_save: bool) -> Any:
        """The trainer's checkpoint manager of a run of its own (``WORK/<name>/base_training/run_001``)."""
        from trainer.checkpoint.formats.base import BaseFormat
        from trainer.checkpoint.manager import CheckpointManager
        from trainer.config.schema import CheckpointConfig
        from trainer.runs.metadata import RunHandle, new_metadata, write_metadata
        from trainer.training.trackers import Trackers

        layout = self.layout(name)
        if self.is_main and not layout.metadata.is_file():
            for folder in layout.new_folders():
                folder.mkdir(parents=True, exist_ok=True)
            write_metadata(layout.path, new_metadata(number=1, kind="base", experiment=name, dataset="cifar10",
                           num_classes=10, world_size=self.world, distributed=self.topo.distributed,
                           precision=self.topo.precision))  # fmt: skip
        self.accelerator.wait_for_everyone()
        fmt = BaseFormat(layout.checkpoint_folder, self.topo, self.config.to_dict())
        policy = CheckpointConfig(async_save=async_save, keep_last_n=1).policy()
        run = RunHandle(layout, is_main=self.is_main)
        return CheckpointManager(layout.checkpoint_folder, fmt, self.topo, self.states, policy, journal=run,
                                 metrics=Trackers())  # fmt: skip

    def timed(self, kind: str, name: str, action: Callable[[], Any]) -> Any:
        """``action()`` between two barriers of every process; this process's seconds are recorded."""
        self.accelerator.wait_for_everyone()
        start = time.perf_counter()
        result = action()
        self.accelerator.wait_for_everyone()
        self.times[kind][name].append(time.perf_counter() - start)
        return result

    def record(self, name: str, *, every_rank: bool = False, **extra: Any) -> None:
        """Write ``times`` and ``extra`` to WORK/<name>.json (rank 0), or WORK/<name>_rank<R>.json (each)."""
        if self.is_main or every_rank:
            times = {kind: dict(sides) for kind, sides in self.times.items()}
            out = {"world_size": self.world, "distributed": self.topo.distributed, "times": times, **extra}
            path = self.work / (f"{name}_rank{self.rank}.json" if every_rank else f"{name}.json")
            path.write_text(json.dumps(out, indent=1))


def measured_memory(action: Callable[[], Any], into: list[dict[str, int]]) -> Callable[[], Any]:
    """``action``, recording into ``into`` this process's resident memory before it and its peak during it
    (Linux: the peak is reset first through ``/proc/self/clear_refs``)."""

    def run() -> Any:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident memory starts again from the current
        before = status_bytes("VmRSS")
        result = action()
        into.append({"rss_before": before, "peak": status_bytes("VmHWM")})
        return result

    return run


def status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status``, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def local(tensor: Any) -> Any:
    """The part of a tensor this process holds (an FSDP2 DTensor's shard, or the tensor)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_tensors(model: Any) -> list[Any]:
    """The weights this process holds: ZeRO-3 slices, FSDP2 shards, or whole tensors."""
    from trainer.checkpoint.deepspeed_compat import zero3_slice

    out = []
    for p in model.parameters():
        if zero3_slice(p) is not None:
            out.append(zero3_slice(p))
        elif hasattr(p, "to_local"):
            out.append(p.to_local())
        else:
            out.append(p.data)
    return out


def full_sum(model: Any, stage: int | None) -> float:
    """The sum of ``model``'s whole weights, gathered where ZeRO-3 (``stage`` 3) or FSDP2 shards them."""
    import contextlib

    params = list(model.parameters())
    gather: Any = contextlib.nullcontext()
    if stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p.data for p in params]
        return float(sum(t.double().sum().item() for t in full))
