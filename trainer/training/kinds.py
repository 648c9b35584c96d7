"""The two kinds of run, each one object: base training and LoRA fine-tuning.

A kind says what differs between them: its default config and extra flags, how a new run's config is
completed (a LoRA run takes its model from the base checkpoint), how the trained module is built, which
checkpoint format it saves, and what happens when an epoch is the best so far (a LoRA run exports its
adapters for peft). Everything else (runs, checkpoints, the loop) is the same code for both.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config.schema import CONFIG_DIR, ConfigError, ModelConfig, TrainConfig, from_dict
from trainer.faults import Faults
from trainer.runs.layout import DEFAULT_BASE, RunLayout

if TYPE_CHECKING:  # torch is imported by the methods that need it: --list-runs and --help never do
    import torch

    from launch import Topology
    from trainer.checkpoint.formats import CheckpointFormat


class RunKind:
    name: str
    headline: str
    """Printed when a run of this kind starts."""
    title: str
    """Heads ``--list-runs``."""
    description: str
    """What ``--help`` says the script does."""
    default_config: Path
    exports_best = False
    """Whether ``on_new_best`` does anything (it needs the EMA weights gathered to rank 0)."""
    note: str | None = None
    """What ``prepare`` found that the user should read (a LoRA run: which base, and why)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The kind's own command-line flags."""

    def prepare(self, config: TrainConfig, args: argparse.Namespace, layout: RunLayout | None) -> Path | None:
        """Complete ``config`` before the data is loaded, for a new run (``layout`` None), or one that
        continues the run at ``layout`` (a resume or a fork). Returns a file a new run made from it stores
        (a LoRA run's base model), or None."""
        return None

    def complete(self, config: TrainConfig, num_classes: int) -> None:
        """Finish ``config`` against the data and build the module once, so that errors surface before
        anything is written."""
        self.build_module(config)

    def build_module(self, config: TrainConfig) -> torch.nn.Module:
        raise NotImplementedError

    def checkpoint_format(
        self, layout: RunLayout, topo: Topology, config: TrainConfig, faults: Faults
    ) -> CheckpointFormat:
        raise NotImplementedError

    def on_new_best(self, model: torch.nn.Module, layout: RunLayout) -> None:
        """Rank 0, after the checkpoint of a best epoch was started; ``model`` holds the EMA weights."""


class BaseKind(RunKind):
    name, headline, title = "base", "Base model training", "Base model training runs"
    description = "Train a DiffiT base model (EDM) with crash-proof run and checkpoint management."
    default_config = CONFIG_DIR / "training" / "base_training.yaml"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", help="model preset name (configs/model/) or YAML path")
        parser.add_argument("--init-from", metavar="RUN_OR_CKPT",
                            help="start a new run from the weights and EMA of a base run (its best checkpoint) or "
                            "a .ckpt, with a fresh optimizer, counters and schedule")  # fmt: skip

    def build_module(self, config: TrainConfig) -> torch.nn.Module:
        from trainer.training.factory import build_model

        return build_model(config)

    def checkpoint_format(
        self, layout: RunLayout, topo: Topology, config: TrainConfig, faults: Faults
    ) -> CheckpointFormat:
        from trainer.checkpoint.formats.base import BaseFormat

        return BaseFormat(layout.checkpoint_folder, topo, config.to_dict(), faults)


class LoraKind(RunKind):
    name, headline, title = "lora", "LoRA fine-tuning", "LoRA fine-tuning runs"
    description = (
        "Fine-tune a trained DiffiT base with LoRA adapters on a class subset; the model is the base's. The "
        "default data, CIFAR-100's trees, must be on disk (datasets/cifar-100-python/); --data digits_0_4 is "
        "bundled."
    )
    default_config = CONFIG_DIR / "training" / "lora_finetuning.yaml"
    exports_best = True

    def __init__(self) -> None:
        self._base: dict[str, Any] | None = None
        """The base checkpoint the adapters apply to, once ``prepare`` has found it."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--base-checkpoint",
            help="base .ckpt file or base run folder (its best.ckpt); default: <checkpoint-root>/"
            f"{DEFAULT_BASE}, else the best checkpoint of the newest completed base run",
        )
        parser.add_argument("--lora-config", help="LoRA preset name (configs/lora/) or YAML path")
        parser.add_argument("--model", help=argparse.SUPPRESS)  # not offered: refused with the reason below

    def prepare(self, config: TrainConfig, args: argparse.Namespace, layout: RunLayout | None) -> Path | None:
        from trainer.training.base_model import (
            load_base_checkpoint,
            load_stored_base,
            resolve_base_checkpoint,
        )

        if layout is not None:  # a resume, or a fork of this run: the base it stores
            self._base = load_stored_base(layout)
            self.note = (
                f"Base model: {layout.stored_base} (stored in run {layout.number:03d}, checksum checked)"
            )
            return layout.stored_base
        if args.model is not None:
            raise ConfigError("a LoRA run adapts the base checkpoint's model; drop --model")
        path, why = resolve_base_checkpoint(args.base_checkpoint, args.checkpoint_root)
        path = path.resolve()
        self._base = load_base_checkpoint(path)
        self.note = f"Base model: {path} ({why})"
        config.model = from_dict(ModelConfig, self._base["config"]["model"], "model.")
        if config.model.augment_dim is None:  # a base recorded before the key existed has no augment_embed
            config.model.augment_dim = 0
        config.base_checkpoint = str(path)
        return path

    def complete(self, config: TrainConfig, num_classes: int) -> None:
        if config.lora is None:
            raise ConfigError("a LoRA run needs a 'lora' section: pass --lora-config NAME|PATH")
        if config.lora.num_classes is None:
            config.lora.num_classes = num_classes
        self.build_module(config)

    def build_module(self, config: TrainConfig) -> torch.nn.Module:
        from trainer.training.factory import base_weights, build_lora_model

        assert self._base is not None, "prepare() finds the base first"
        return build_lora_model(config, base_weights(self._base))

    def checkpoint_format(
        self, layout: RunLayout, topo: Topology, config: TrainConfig, faults: Faults
    ) -> CheckpointFormat:
        from trainer.checkpoint.formats.lora import LoraFormat

        return LoraFormat(layout.checkpoint_folder, topo, config.to_dict(), base=layout.stored_base)

    def on_new_best(self, model: torch.nn.Module, layout: RunLayout) -> None:
        from trainer.checkpoint.formats.lora import export_adapter

        export_adapter(model, layout.adapter)


def run_kind(name: str) -> RunKind:
    """A fresh kind object of ``name`` (``base`` or ``lora``) for one launch."""
    return {"base": BaseKind, "lora": LoraKind}[name]()
