"""Export a checkpoint of any run for other tools: today's ``.ckpt``, or safetensors with the config as JSON.

A base run's checkpoint is its model file (``<tag>.ckpt``); a step checkpoint of an earlier version, which had
none, is merged from its resumable state. A LoRA
run is exported as its base with the adapters merged in (``--adapter``: the adapter tensors alone). EMA
weights unless ``raw``; any floating dtype. The safetensors file holds every tensor of the model's
``state_dict`` (buffers included), so ``load_state_dict(safetensors.torch.load_file(path), strict=True)``
fills a model built from the config beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.api import checkpoint_path, merge_lora
from trainer.checkpoint.formats import CKPT_FORMAT, load_checkpoint_file
from trainer.checkpoint.manifest import read_manifests, verify
from trainer.errors import UserError
from trainer.runs.layout import RunLayout
from trainer.runs.store import read_config
from trainer.storage.atomic import atomic_write, atomic_write_json
from trainer.storage.json_files import as_int, read_json_file
from trainer.storage.serialization import write_safetensors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def exported(path: Path, which: str, *, raw: bool, adapter: bool) -> dict[str, Any]:
    """The checkpoint to export, in base format (``state_dict``, ``ema_state_dict``, config and counters),
    or for ``adapter`` a LoRA run's adapter tensors as ``state_dict``."""
    layout = RunLayout.detect(path) if path.is_dir() else None
    if layout is not None and layout.kind == "base":
        return _base(layout, which)
    file = checkpoint_path(path, which)
    ckpt = load_checkpoint_file(file, key=("state_dict", "lora_state_dict"))
    if "state_dict" in ckpt:
        return ckpt
    if adapter:
        tensors = ckpt["lora_state_dict"] if raw else ckpt["ema_state_dict"]
        return {**ckpt, "state_dict": tensors, "ema_state_dict": tensors}
    return merge_lora(file, ema=not raw)


def _base(layout: RunLayout, which: str) -> dict[str, Any]:
    """A base run's checkpoint by tag: its model file, or (an earlier version's step checkpoint) merged from
    its state."""
    spec = f"epoch_{int(which):03d}" if which.isdigit() else which
    file = layout.ckpt(spec)
    if file.is_file():
        return load_checkpoint_file(file)
    folder = layout.checkpoint_folder.state_root / spec
    manifest = next((m for m in read_manifests(layout.checkpoints) if m.tag == spec), None)
    if manifest is None or not (folder / "trainer_state.json").is_file():
        raise UserError(layout.missing_checkpoint(spec))
    reason = verify(layout.checkpoints, manifest)
    if reason is not None:
        raise UserError(f"checkpoint {spec} of run {layout.path.name} is damaged: {reason}")
    from trainer.checkpoint.formats.legacy import read_full_ema, read_model_state

    try:
        saved = read_json_file(folder / "trainer_state.json")
        epoch, step = as_int(saved["epoch"], "epoch"), as_int(saved["global_step"], "global_step")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {folder / 'trainer_state.json'}: {e}") from None
    config = read_config(layout.config)
    return {"format": CKPT_FORMAT, "kind": "base", "state_dict": read_model_state(folder),
            "ema_state_dict": read_full_ema(folder), "epoch": epoch, "global_step": step,
            "metrics": {}, "config": config}  # fmt: skip


def write_export(ckpt: dict[str, Any], out: Path, *, fmt: str, raw: bool, dtype: str) -> list[Path]:
    """Write ``ckpt`` to ``out`` as ``fmt`` (``ckpt`` or ``safetensors``, with ``out.json`` beside it)."""
    tensors = ckpt["state_dict"] if raw else {**ckpt["state_dict"], **ckpt["ema_state_dict"]}
    cast = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "ckpt":
        payload = {**ckpt, "state_dict": cast, "ema_state_dict": {k: cast[k] for k in ckpt["ema_state_dict"]}}
        atomic_write(out, lambda f: torch.save(payload, f))
        return [out]
    contiguous = {k: v.contiguous() for k, v in cast.items()}
    atomic_write(out, lambda f: write_safetensors(contiguous, f))
    beside = out.with_suffix(".json")
    atomic_write_json(beside, {"config": ckpt["config"], "epoch": ckpt.get("epoch"),
                               "global_step": ckpt.get("global_step"), "weights": "raw" if raw else "ema",
                               "dtype": dtype})  # fmt: skip
    return [out, beside]
