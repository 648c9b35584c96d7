"""The base model of a LoRA run: which file to fine-tune, loaded and checked, and the copy a run stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.checkpoint.formats import load_checkpoint_file
from trainer.checkpoint.manifest import sha256_file
from trainer.errors import UserError
from trainer.runs.layout import DEFAULT_BASE, RunLayout, kind_root
from trainer.runs.listing import list_runs
from trainer.runs.metadata import read_metadata


def resolve_base_checkpoint(given: str | None, checkpoint_root: Path) -> Path:
    """``--base-checkpoint`` (file or base run folder), else the default file, else the newest base run's best."""
    if given is not None:
        path = Path(given)
        if path.is_dir():
            path = RunLayout(path, "base").ckpt("best")
        if not path.is_file():
            raise UserError(f"base checkpoint not found: {path}")
        return path
    default = checkpoint_root / DEFAULT_BASE
    if default.is_file():
        return default
    for row in reversed(list_runs(kind_root(checkpoint_root, "base"))):
        best = RunLayout(Path(row.path), "base").ckpt("best")
        if row.status == "completed" and best.is_file():
            return best
    raise UserError(
        f"no base model to fine-tune: neither {default} nor a completed base run under "
        f"{kind_root(checkpoint_root, 'base')}. Train one first (python scripts/train_base.py) or pass "
        "--base-checkpoint PATH"
    )


def load_base_checkpoint(path: Path) -> dict[str, Any]:
    """A base model ``.ckpt`` of this trainer (its weights, EMA and config), weights-only."""
    try:
        ckpt = load_checkpoint_file(path)
    except UserError as e:
        raise UserError(f"{e}; --base-checkpoint takes a base model .ckpt or a base run folder") from None
    if (
        ckpt.get("kind") != "base"
        or not isinstance(ckpt.get("config"), dict)
        or "model" not in ckpt["config"]
    ):
        raise UserError(f"{path} is not a base model checkpoint of this trainer (kind {ckpt.get('kind')!r})")
    return ckpt


def load_stored_base(layout: RunLayout) -> dict[str, Any]:
    """The base a LoRA run was started from, checked against the sha256 its metadata recorded."""
    stored = layout.stored_base
    record = read_metadata(layout.path).get("base_checkpoint") or {}
    if not stored.is_file():
        raise UserError(
            f"the stored base model of {layout.path.name} is gone ({stored}); this run cannot be resumed"
        )
    if record.get("sha256") != sha256_file(stored):
        raise UserError(
            f"the stored base model of {layout.path.name} changed since the run started (sha256 differs from "
            "metadata.json); resuming would adapt a different model. Restore the original file or start a new run"
        )
    return load_base_checkpoint(stored)
