"""What a resume may change of a run's config, decided key by key, and the record of each change.

A run's config is what its checkpoints were trained with. A resume may change how training goes on from
here (more epochs, another learning rate, checkpoint and logging policy); it may not change what the run
is (data, seed, noise distribution, model, adapters), which would make its history mean something else.
The batch size and the steps per epoch cut the data order into steps: they may change only where the
checkpoint is at an epoch's start, so the data position stays exact. Every accepted change is printed and
recorded as an event (``RunHandle.record_changes``) with its old and new value and the step it takes effect at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.config.files import diff_keys
from trainer.config.schema import ConfigError

FREE = ("epochs", "learning_rate", "weight_decay", "warmup_steps", "lr_schedule", "grad_clip", "experiment",
        "ema_halflife_kimg", "ema_rampup_ratio", "checkpoint.", "evaluation.", "logging.", "distributed.")  # fmt: skip
"""Keys (or prefixes) a resume may change: how training goes on from here."""
AT_EPOCH_START = ("batch_size", "max_steps_per_epoch")
"""Keys a resume may change only from a checkpoint at an epoch's start: they cut the epoch into steps."""
ADDED = {"data.augment_p": 0.0, "model.augment_dim": 0}
"""Keys added to the config after runs were recorded without them, with the value such a run trained with:
a stored config that lacks one compares as if it held that value."""


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any


def config_changes(stored: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every key ``new`` changes of ``stored`` (a key ``stored`` lacks was added to the trainer after the run
    started: its default is no change, and so is the value of ``ADDED`` it stands for)."""
    stored = with_added_keys(stored)
    keys = [key for key in diff_keys(stored, new) if _present(stored, key)]
    return [Change(key, _lookup(stored, key), _lookup(new, key)) for key in keys]


def resume_changes(stored: dict[str, Any], new: dict[str, Any], set_keys: set[str]) -> list[Change]:
    """The changes a resume with config ``new`` makes to the run's ``stored`` config; refuses any a resume
    may not make, naming the keys. ``model.*`` keys given on purpose with ``--set`` pass (the checkpoint's
    shapes are still checked when it loads)."""
    changes = config_changes(stored, new)
    refused = [
        c for c in changes
        if not c.key.startswith(FREE) and c.key not in AT_EPOCH_START
        and not (c.key.startswith("model.") and c.key in set_keys)
    ]  # fmt: skip
    if refused:
        listed = ", ".join(f"{c.key} ({c.old!r} -> {c.new!r})" for c in refused)
        raise ConfigError(
            f"a resume cannot change {listed}: it would make the run's history mean something else. Drop the "
            "flag, or start a new run (the run's config.json has its values)"
        )
    return changes


def refuse_inexact(changes: list[Change], *, step_in_epoch: int, epochs_trained: int, tag: str) -> None:
    """Once the checkpoint to resume from is known: the batch size and steps per epoch change only at an
    epoch's start, and ``epochs`` never drops below what is already trained."""
    for c in changes:
        if c.key in AT_EPOCH_START and step_in_epoch:
            raise ConfigError(
                f"{c.key} cannot change from {c.old} to {c.new} on this resume: checkpoint {tag} is {step_in_epoch} "
                f"steps into an epoch, and a new {c.key} would cut that epoch's data differently. Resume once "
                f"without it (the epoch then ends), then change it"
            )
        if c.key == "epochs" and int(c.new) < epochs_trained:
            raise ConfigError(
                f"--epochs {c.new} is fewer than the {epochs_trained} epochs this run has already trained; pass "
                f"--epochs above {epochs_trained} to train on"
            )


def with_added_keys(stored: dict[str, Any]) -> dict[str, Any]:
    """``stored`` (a recorded config) with each key of ``ADDED`` it lacks set to the value it trained with."""
    filled = {k: dict(v) if isinstance(v, dict) else v for k, v in stored.items()}
    for dotted, value in ADDED.items():
        section, key = dotted.split(".")
        if isinstance(filled.get(section), dict):
            filled[section].setdefault(key, value)
    return filled


def _present(data: dict[str, Any], dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.get(part) if isinstance(data, dict) else None  # type: ignore[assignment]
    return isinstance(data, dict) and last in data


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
