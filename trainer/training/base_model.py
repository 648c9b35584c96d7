"""The base model of a LoRA run: which file to fine-tune, loaded and checked, and the copy a run stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.checkpoint.formats import load_checkpoint_file
from trainer.checkpoint.manifest import read_manifests
from trainer.config.schema import ModelConfig, TrainConfig, from_dict
from trainer.errors import UserError
from trainer.runs.layout import DEFAULT_BASE, RunLayout, kind_root
from trainer.runs.listing import list_runs
from trainer.runs.metadata import read_metadata
from trainer.storage.checksums import file_digest, recorded, sha256_file


def resolve_base_checkpoint(given: str | None, checkpoint_root: Path) -> tuple[Path, str]:
    """(the base file, why it is that one): ``--base-checkpoint`` (a file, or a base run folder: its best),
    else the hand-off file, else the best checkpoint of the newest completed base run."""
    if given is not None:
        path = Path(given)
        if path.is_dir():
            detected = RunLayout.detect(path)
            if detected is not None and detected.kind == "lora":
                raise UserError(
                    f"--base-checkpoint {given} is a LoRA run; give a base run folder (base_training/run_NNN) "
                    "or a base model .ckpt"
                )
            path = RunLayout(path, "base").ckpt("best")
            if not path.is_file():
                raise UserError(
                    f"base checkpoint not found: {path} (the base run {given} has no best checkpoint)"
                )
            return path, f"the best checkpoint of the base run given with --base-checkpoint {given}"
        if not path.is_file():
            raise UserError(f"base checkpoint not found: {path}")
        return path, "given with --base-checkpoint"
    default = checkpoint_root / DEFAULT_BASE
    if default.is_file():
        return default, f"the hand-off file {DEFAULT_BASE}, found without --base-checkpoint"
    for row in reversed(list_runs(kind_root(checkpoint_root, "base"))):
        best = RunLayout(Path(row.path), "base").ckpt("best")
        if row.status == "completed" and best.is_file():
            return best, f"the best checkpoint of base run {row.number:03d}, the newest completed one"
    raise UserError(
        f"no base model to fine-tune: neither {default} nor a completed base run under "
        f"{kind_root(checkpoint_root, 'base')}. Train one first (python scripts/train_base.py) or pass "
        "--base-checkpoint PATH"
    )


def load_base_checkpoint(path: Path, *, verified: bool = False) -> dict[str, Any]:
    """A base model ``.ckpt`` of this trainer (its weights, EMA and config), weights-only; checked against its
    manifest when it is a file of a run (``load_checkpoint_file``), unless the caller ``verified`` it."""
    try:
        ckpt = load_checkpoint_file(path, verified=verified)
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
    """The base a LoRA run was started from, checked against the checksum its newest checkpoint's manifest
    recorded (``Manifest.references``), or where it has none yet (or was written before), the sha256 in its
    metadata."""
    stored = layout.stored_base
    if not stored.is_file():
        raise UserError(
            f"the stored base model of {layout.path.name} is gone ({stored}); {_restore_hint(layout)}"
        )
    key = stored.relative_to(layout.path).as_posix()
    entries = [m.references[key] for m in read_manifests(layout.checkpoints) if key in m.references]
    if entries:
        reason = _mismatch(stored, entries[-1])
        where = "its checkpoints' manifests"
    else:
        record = read_metadata(layout.path).get("base_checkpoint") or {}
        reason = None if record.get("sha256") == sha256_file(stored) else "its sha256 differs"
        where = "metadata.json's base_checkpoint"
    if reason is not None:
        raise UserError(
            f"the stored base model of {layout.path.name} ({stored}) changed since the run started ({reason}, against "
            f"{where}): the adapters would apply to another model than the one they were trained on. Restore the "
            "original file, or start a new run"
        )
    return load_base_checkpoint(stored, verified=True)


def _restore_hint(layout: RunLayout) -> str:
    """How to get a LoRA run's stored base back: the file it was copied from, as metadata.json recorded it."""
    try:
        record = read_metadata(layout.path).get("base_checkpoint") or {}
    except (OSError, ValueError):
        record = {}
    if not isinstance(record.get("source"), str):
        return "this run cannot be resumed without it"
    return (f"it was a copy of {record['source']} (sha256 {record.get('sha256')}): put that file back at "
            f"{layout.stored_base} to resume the run")  # fmt: skip


def _mismatch(path: Path, entry: dict[str, Any]) -> str | None:
    """Why ``path`` does not match its manifest ``entry``, or None."""
    try:
        algorithm, digest = recorded(entry)
    except KeyError:
        return "its record has no checksum"
    if path.stat().st_size != entry.get("bytes"):
        return f"it has {path.stat().st_size} bytes, {entry.get('bytes')} were recorded"
    return None if file_digest(path, algorithm) == digest else f"its {algorithm} differs"


def load_init_weights(path: Path, config: TrainConfig) -> dict[str, Any]:
    """The base checkpoint a new run starts from, refused when its architecture differs from the run's."""
    ckpt = load_base_checkpoint(path)
    saved = from_dict(ModelConfig, ckpt["config"]["model"], "model.").architecture()
    if saved["augment_dim"] is None:  # recorded before the key existed: no augment_embed
        saved["augment_dim"] = 0
    now = config.model.architecture()
    differing = [key for key in now if saved.get(key) != now[key]]
    if differing:
        listed = ", ".join(f"{k} ({saved.get(k)!r} there, {now[k]!r} here)" for k in differing)
        raise UserError(
            f"--init-from {path} has another architecture: {listed}; pass --model (or --set model.KEY=VALUE) "
            "to match it"
        )
    return ckpt
