"""The Python API: load a trained model for inference, list runs as plain dataclasses.

from trainer import load_model, list_runs
model = load_model("checkpoints/base_training/run_001")          # best epoch, EMA weights
rows = list_runs("checkpoints")                                    # [RunSummary(...), ...]
"""

from __future__ import annotations

from pathlib import Path

import torch

from model import DiffiT
from trainer.checkpoint import epoch_name, load_checkpoint_file
from trainer.config import TrainConfig, from_dict
from trainer.errors import UserError
from trainer.factory import build_model, load_weights
from trainer.runs import RunSummary, kind_root
from trainer.runs import list_runs as _list_runs


def checkpoint_path(path: str | Path, which: str | int = "best") -> Path:
    """A ``.ckpt`` file as given, or the ``best``/``last``/epoch-N checkpoint of a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    name = epoch_name(which) if isinstance(which, int) else str(which)
    if name not in ("best", "last") and not name.startswith("epoch_"):
        raise UserError(f"which must be 'best', 'last' or an epoch number, got {which!r}")
    candidate = path / "checkpoints" / f"{name}.ckpt"
    if not candidate.is_file():
        raise UserError(f"no {name}.ckpt in {path / 'checkpoints'} (is {path} a run folder?)")
    return candidate


def load_model(
    path: str | Path, which: str | int = "best", *, ema: bool = True, device: str | torch.device = "cpu"
) -> DiffiT:
    """The DiffiT of a run folder or checkpoint file, in eval mode; EMA weights unless ``ema=False``.

    Every parameter must arrive: a checkpoint of another architecture is refused, never half-loaded.
    """
    ckpt = load_checkpoint_file(checkpoint_path(path, which))
    model = build_model(from_dict(TrainConfig, ckpt["config"]))
    load_weights(model, ckpt["state_dict"])
    if ema:
        load_weights(model, {**ckpt["state_dict"], **ckpt["ema_state_dict"]})
    return model.to(device).eval()


def list_runs(checkpoint_root: str | Path = "checkpoints", kind: str = "base") -> list[RunSummary]:
    """Every run of ``kind`` under the checkpoint root, in run-number order, the best one marked."""
    return _list_runs(kind_root(Path(checkpoint_root), kind))
