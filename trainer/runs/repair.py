"""Before a resume (global rank 0): a run whose ``metadata.json`` or ``config.json`` is damaged or missing
gets them back from its checkpoints, which hold the config and the trainer's counters.

The damaged file is moved to ``damaged/`` (never deleted), one warning line says so, and the repair is
recorded as an event. The config comes from the newest intact checkpoint file that holds it (a base run's
merged epoch file, or any LoRA checkpoint); the metadata from that config and the newest intact
checkpoint's manifest and trainer state. The resume then rewrites history, best and counters as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer.checkpoint.manifest import Manifest, read_manifests, verify
from trainer.runs.layout import RunLayout
from trainer.runs.metadata import MalformedMetadata, new_metadata, now, read_metadata, write_metadata
from trainer.runs.store import ConfigMismatch, RunError, read_config, write_config
from trainer.storage.checksums import sha256_file
from trainer.storage.paths import real_folder


def repair_run(layout: RunLayout) -> list[str]:
    """Rebuild what is damaged of ``metadata.json`` and ``config.json``; returns one warning per repair."""
    config_damage = _damage(layout.config, read_config)
    meta_damage = _damage(layout.metadata, lambda path: read_metadata(path.parent))
    if config_damage is None and meta_damage is None:
        return []
    found = _newest_config(layout)
    if found is None:
        what = ", ".join(
            f.name for f, d in ((layout.config, config_damage), (layout.metadata, meta_damage)) if d
        )
        raise RunError(
            f"run {layout.number:03d}: {what} is damaged or missing and no intact checkpoint holds the config to "
            "rebuild it from; this run cannot be resumed, start a new one"
        )
    config, source = found
    warnings, events = [], []
    for path, damage, rebuild in (
        (layout.config, config_damage, lambda: write_config(layout.config, config)),
        (layout.metadata, meta_damage, lambda: write_metadata(layout.path, _metadata(layout, config))),
    ):
        if damage is None:
            continue
        moved = _move_aside(layout, path)
        rebuild()
        events.append({"at": now(), "kind": "repaired", "file": path.name, "reason": damage,
                       "moved_to": moved, "from_checkpoint": source})  # fmt: skip
        warnings.append(f"{path} was {damage}: rebuilt from checkpoint {source}; the old file is in {moved}")
    meta = read_metadata(layout.path)
    meta["events"] = [*meta.get("events", []), *events]
    write_metadata(layout.path, meta)
    return warnings


def _damage(path: Path, read: Any) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        read(path)
    except ConfigMismatch:
        return "edited or damaged (it does not match the checksum it holds)"
    except MalformedMetadata as e:
        return f"malformed ({e})"
    except (OSError, ValueError, RunError) as e:
        return f"unreadable ({e})"
    return None


def _newest_config(layout: RunLayout) -> tuple[dict[str, Any], str] | None:
    """(the config, the tag it came from) of the newest intact checkpoint file that holds one."""
    from trainer.checkpoint.formats import load_checkpoint_file
    from trainer.errors import UserError

    for manifest in reversed(read_manifests(layout.checkpoints)):
        ckpt = layout.ckpt(manifest.tag)
        if not ckpt.is_file() or verify(layout.checkpoints, manifest) is not None:
            continue
        try:
            data = load_checkpoint_file(ckpt, key="config")
        except UserError:
            continue
        if isinstance(data.get("config"), dict):
            return data["config"], manifest.tag
    return None


def _metadata(layout: RunLayout, config: dict[str, Any]) -> dict[str, Any]:
    """A run's metadata as far as its config and newest intact checkpoint tell (the resume fills the rest)."""
    committed = read_manifests(layout.checkpoints)  # the resume verifies the one it loads, and falls back
    newest: Manifest | None = committed[-1] if committed else None
    lora = config.get("lora") or {}
    classes = lora.get("num_classes") if layout.kind == "lora" else config["model"].get("num_classes")
    meta = new_metadata(
        number=layout.number, kind=layout.kind, experiment=str(config.get("experiment")),
        dataset=str(config.get("data", {}).get("name")), num_classes=int(classes or 0),
        world_size=newest.world_size if newest else 1, distributed=newest.distributed if newest else "single",
        precision=newest.precision if newest else None,
    )  # fmt: skip
    meta.update(
        status="interrupted",
        epochs_total=config.get("epochs"),
        epochs_completed=newest.epoch if newest else 0,
        global_step=newest.global_step if newest else 0,
        best=newest.best if newest else None,
        checkpoints=sorted(m.epoch for m in committed if m.is_epoch),
        config_summary={
            "learning_rate": config.get("learning_rate"),
            "batch_size": config.get("batch_size"),
            "model": config["model"].get("name"),
            "seed": config.get("seed"),
        },
    )
    if layout.kind == "lora" and layout.stored_base.is_file():
        # The stored base as it is now: its original sha256 was in the lost metadata.
        stored = {"source": config.get("base_checkpoint"), "sha256": sha256_file(layout.stored_base)}
        meta["base_checkpoint"] = {**stored, "rebuilt": True}
    return meta


def _move_aside(layout: RunLayout, path: Path) -> str:
    """Move a damaged file into ``damaged/`` (``NAME``, ``NAME-2``, ...), a real folder of the run; returns
    where, relative to the run."""
    if not path.exists():
        return "(missing)"
    damaged = real_folder(layout.damaged, layout.path)
    target, n = damaged / path.name, 1
    while target.exists() or target.is_symlink():
        n += 1
        target = damaged / f"{path.name}-{n}"
    os.replace(path, target)
    return str(target.relative_to(layout.path))
