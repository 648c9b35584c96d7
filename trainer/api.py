"""The Python API: load a trained model for inference, list runs as plain dataclasses.

from trainer import load_model, list_runs
model = load_model("checkpoints/base_training/run_001")          # best epoch, EMA weights
rows = list_runs("checkpoints")                                    # [RunSummary(...), ...]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.lora import base_diffit
from trainer.checkpoint.folder import epoch_tag, is_tag
from trainer.checkpoint.formats import load_checkpoint_file
from trainer.config.schema import TrainConfig, from_dict
from trainer.errors import UserError
from trainer.runs.layout import RunLayout, kind_root
from trainer.runs.listing import RunSummary
from trainer.runs.listing import list_runs as _list_runs
from trainer.training.base_model import load_stored_base
from trainer.training.factory import base_weights, build_lora_model, build_model, load_trainable, load_weights


def checkpoint_path(path: str | Path, which: str | int = "best") -> Path:
    """A ``.ckpt`` file as given, or a checkpoint of a base or LoRA run folder: ``best``, ``last``, an epoch
    number or a tag (``epoch_005``; a LoRA run's ``step_0000120`` too)."""
    path = Path(path)
    if path.is_file():
        return path
    name = epoch_tag(int(which)) if isinstance(which, int) or str(which).isdigit() else str(which)
    if name not in ("best", "last") and not is_tag(name):
        raise UserError(f"which must be 'best', 'last', an epoch number or a tag, got {which!r}")
    layout = RunLayout.detect(path)
    candidate = (layout or RunLayout(path, "base")).ckpt(name)
    if not candidate.is_file():
        if layout is None:
            raise UserError(f"no {name}.ckpt in {candidate.parent} (is {path} a run folder?)")
        raise UserError(layout.missing_checkpoint(name))
    return candidate


def load_model(
    path: str | Path, which: str | int = "best", *, ema: bool = True, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The model of a base or LoRA run folder, or of a ``.ckpt`` file, in eval mode.

    Base: a ``DiffiT``. LoRA: the run's stored base with its adapters (a peft model). EMA weights unless
    ``ema=False``. Every tensor must arrive: a checkpoint of another architecture is refused, never
    half-loaded (loading a base ``state_dict`` into a peft model with ``strict=False`` would load nothing).
    """
    file = checkpoint_path(path, which)
    ckpt = load_checkpoint_file(file, key=("state_dict", "lora_state_dict"))
    if "lora_state_dict" in ckpt:
        return _load_lora(file, ckpt, ema=ema).to(device).eval()
    model = build_model(from_dict(TrainConfig, ckpt["config"]))
    load_weights(model, ckpt["state_dict"])
    if ema:
        load_weights(model, {**ckpt["state_dict"], **ckpt["ema_state_dict"]})
    return model.to(device).eval()


def _load_lora(file: Path, ckpt: dict[str, Any], *, ema: bool) -> torch.nn.Module:
    """A LoRA checkpoint on top of the base stored in its run, checked against the run's record of it."""
    run = RunLayout(file.parent.parent, "lora")
    config = from_dict(TrainConfig, ckpt["config"])
    model = build_lora_model(config, base_weights(load_stored_base(run)))
    load_trainable(model, ckpt["ema_state_dict"] if ema else ckpt["lora_state_dict"])
    return model


def merge_lora(path: str | Path, which: str | int = "best", *, ema: bool = True) -> dict[str, Any]:
    """A standalone base-format checkpoint of a LoRA run: adapters (EMA unless ``ema=False``) merged into
    the weights.

    ``load_model`` (and ``torch.load`` + ``build_model``) load the result like any base checkpoint.
    """
    file = checkpoint_path(path, which)
    ckpt = load_checkpoint_file(file, key="lora_state_dict")
    merged = _load_lora(file, ckpt, ema=ema).merge_and_unload()  # type: ignore[operator]
    net = base_diffit(merged)
    config = dict(ckpt["config"])
    config["model"] = {**config["model"], "num_classes": net.num_classes}
    config["lora"] = None
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return {
        "format": ckpt["format"],
        "kind": "base",
        "state_dict": state,
        "ema_state_dict": {k: state[k] for k, _ in net.named_parameters()},
        "epoch": ckpt["epoch"],
        "global_step": ckpt["global_step"],
        "metrics": ckpt["metrics"],
        "config": config,
        "merged_from": str(file),
    }


def list_runs(checkpoint_root: str | Path = "checkpoints", kind: str = "base") -> list[RunSummary]:
    """Every run of ``kind`` (``base`` or ``lora``) under the checkpoint root, in run-number order."""
    return _list_runs(kind_root(Path(checkpoint_root), kind))
