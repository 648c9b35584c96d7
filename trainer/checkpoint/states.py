"""What a checkpoint holds: the training states the trainer registers once, each a ``state_dict`` /
``load_state_dict`` object (torchtitan's "Stateful").

``TrainingStates`` names them: the model and optimizer (saved in the format's own layout: ZeRO shards, or
the trained tensors by name), the EMA (this rank's slice), ``TrainState`` (the trainer's counters, history,
best and data position: ``trainer_state.json``), ``RNGState`` (this rank's generators) and ``extra``, any
further replicated, JSON-compatible state (an LR scheduler, say): registering it there is all it takes for
every checkpoint to save and every resume to restore it.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from trainer.checkpoint.folder import epoch_tag, step_tag


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardedState(Protocol):
    """A state kept per rank that also has a full form (the EMA: ZeRO-3 slices, or whole tensors)."""

    partitioned: bool
    """Whether each rank holds only its slice (ZeRO-3); else every rank holds the same whole tensors."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def full_state(self) -> dict[str, torch.Tensor]:
        """Whole tensors on every rank (collective when partitioned)."""
        ...

    def from_full(self, full: dict[str, torch.Tensor]) -> None: ...

    def shapes(self) -> dict[str, torch.Size]: ...


@dataclass
class TrainState:
    """The trainer's own counters, saved with every checkpoint as ``trainer_state.json``'s keys.

    They are also the data position: epoch ``epoch + 1`` draws its order from (seed, epoch) and continues
    at step ``step_in_epoch``, so a resume needs nothing else to feed the same batches.
    """

    epoch: int = 0
    """Epochs fully completed."""
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per completed epoch: metrics, lr, seconds, images/s, its checkpoint file (or None)."""
    best: dict[str, Any] | None = None
    """``{epoch, metric, value, mode}`` of the best epoch so far."""
    step_in_epoch: int = 0
    """Steps of epoch ``epoch + 1`` already trained (a checkpoint taken inside an epoch)."""
    epoch_loss_sum: float = 0.0
    """Sum over those steps of the step loss averaged over ranks, so the epoch's mean survives a resume."""

    KEYS: ClassVar = ("epoch", "global_step", "history", "best", "step_in_epoch", "epoch_loss_sum")

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy({key: getattr(self, key) for key in self.KEYS})

    @classmethod
    def check(cls, state: Any) -> None:
        """``state``, read from a checkpoint (data from someone else), holds what ``load_state_dict`` takes:
        ``ValueError`` saying what does not."""
        if not isinstance(state, dict):
            raise ValueError("the trainer's state is not an object")
        for key in ("epoch", "global_step", "step_in_epoch"):
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} is {value!r}, not a count")
        if not _is_number(state.get("epoch_loss_sum", 0.0)):
            raise ValueError("epoch_loss_sum is not a number")
        history = state.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("history is not a list of epochs")
        best = state.get("best")
        if best is not None and not (
            isinstance(best, dict)
            and _is_number(best.get("value"))
            and isinstance(best.get("epoch"), int)
            and best.get("mode", "min") in ("min", "max")
        ):
            raise ValueError("best is not an epoch's record")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = copy.deepcopy(state.get("history") or [])
        self.best = copy.deepcopy(state.get("best"))
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))

    @property
    def tag(self) -> str:
        """The name of a checkpoint taken now: ``epoch_NNN`` between epochs, ``step_NNNNNNN`` inside one."""
        return epoch_tag(self.epoch) if self.step_in_epoch == 0 else step_tag(self.global_step)

    def end_epoch(self, entry: dict[str, Any]) -> None:
        """Epoch ``entry["epoch"]`` is complete: its history entry is added and the position moves on."""
        self.epoch, self.step_in_epoch, self.epoch_loss_sum = int(entry["epoch"]), 0, 0.0
        self.history.append(entry)

    def update_best(self, epoch: int, metrics: dict[str, float], monitor: str, mode: str) -> bool:
        """Whether ``metrics`` of ``epoch`` beat the best so far by ``monitor`` (val_loss: train_loss when the
        data has no validation split); if so they become the best. An epoch without the metric (no FID
        computed) does not compete."""
        if monitor not in metrics:
            if monitor != "val_loss":
                return False
            monitor = "train_loss"
        value = metrics[monitor]
        best = self.best
        better = best is None or (value < best["value"] if mode == "min" else value > best["value"])
        if better:
            self.best = {"epoch": epoch, "metric": monitor, "value": value, "mode": mode}
        return better

    def set_checkpoint(self, epoch: int, file: str | None) -> None:
        """Record (or, after a failed save, clear) the checkpoint file of ``epoch`` in its history entry."""
        for entry in self.history:
            if entry.get("epoch") == epoch:
                entry["checkpoint"] = file


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class RNGState:
    """This rank's random number generators: torch's global one and, on GPUs, CUDA's.

    (The EDM noise of each step comes from a generator re-seeded from (seed, step), which needs no saving.)
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def reseed(self, rank: int, global_step: int) -> None:
        """For a rank the checkpoint did not have (more processes now): seeded from (seed, rank, step), so
        the continuation is still reproducible."""
        digest = hashlib.sha256(f"{self.seed}/{rank}/{global_step}".encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass
class TrainingStates:
    """Everything a checkpoint saves and a resume restores, registered once by the trainer."""

    model: Any
    """The prepared model: a DeepSpeed engine, a DDP wrapper or the module."""
    optimizer: Any
    ema: ShardedState
    progress: TrainState
    rng: RNGState
    extra: dict[str, Stateful] = field(default_factory=dict)
    """Further replicated state, JSON-compatible: saved under ``extra`` by name, restored when present."""

    def extra_state(self) -> dict[str, Any]:
        return {name: state.state_dict() for name, state in self.extra.items()}

    def load_extra(self, saved: dict[str, Any]) -> None:
        for name, state in self.extra.items():
            if name in saved:
                state.load_state_dict(saved[name])


def unwrap_model(model: Any) -> torch.nn.Module:
    """The plain module inside a DeepSpeed engine or DDP wrapper."""
    return model.module if hasattr(model, "module") else model
