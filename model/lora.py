"""Blockwise LoRA on DiffiT with peft: adapters per U-Net stage, a resizable label embedding.

Stages are named as in ``model/diffit.py``: ``encoder.{s}`` (the last one, at the lowest resolution, is the
bottleneck, also called ``bottleneck`` here) and ``decoder.{s}``. Adapters go on the transformer blocks'
linear layers (``qkv``, ``qkv_temb``, ``proj``, ``mlp.fc1``, ``mlp.fc2``) of the chosen stages, with a rank
and alpha per stage (peft's ``rank_pattern``/``alpha_pattern`` keyed by the exact module names).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.diffit import DiffiT

if TYPE_CHECKING:  # peft imports transformers (~5 s): only LoRA runs pay for it
    from peft import PeftModel

LORA_LAYERS = ("qkv", "qkv_temb", "proj", "mlp.fc1", "mlp.fc2")
_BLOCK_LINEAR = re.compile(r"^((?:encoder|decoder)\.\d+)\.blocks\.\d+\.block\.(attn\.(\w+)|mlp\.(fc\d))$")


def stage_names(model: DiffiT) -> list[str]:
    """``encoder.0`` … ``encoder.S-1``, then ``decoder.S-2`` … ``decoder.0``."""
    return [f"encoder.{s}" for s in range(len(model.encoder))] + [f"decoder.{s}" for s in model.decoder]


def resolve_targets(
    model: DiffiT,
    *,
    target_layers: list[str],
    rank: int,
    alpha: int,
    stages: Mapping[str, tuple[int | None, int | None] | None],
) -> dict[str, tuple[int, int]]:
    """Module name → (rank, alpha) for every linear layer that gets an adapter.

    ``stages`` maps a stage name (or ``bottleneck``) to (rank, alpha) overrides, or None for no adapters.
    Unknown stage or layer names raise ``ValueError`` listing the valid ones.
    """
    valid_stages = stage_names(model)
    aliases = {"bottleneck": valid_stages[len(model.encoder) - 1]}
    unknown = [s for s in stages if aliases.get(s, s) not in valid_stages]
    if unknown:
        raise ValueError(
            f"LoRA stage(s) {', '.join(unknown)} match no stage of this model; "
            f"available: {', '.join(valid_stages)}, bottleneck"
        )
    bad_layers = [layer for layer in target_layers if layer not in LORA_LAYERS]
    if bad_layers:
        raise ValueError(
            f"LoRA target layer(s) {', '.join(bad_layers)} match no layer; available: {', '.join(LORA_LAYERS)}"
        )
    per_stage = {aliases.get(name, name): value for name, value in stages.items()}
    targets: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        match = _BLOCK_LINEAR.match(name)
        if not match or not isinstance(module, nn.Linear):
            continue
        layer = match.group(3) or f"mlp.{match.group(4)}"
        if layer not in target_layers:
            continue
        stage = match.group(1)
        if stage in per_stage and per_stage[stage] is None:
            continue
        override = per_stage.get(stage) or (None, None)
        targets[name] = (override[0] or rank, override[1] or alpha)
    if not targets:
        raise ValueError("the LoRA config selects no layer at all; enable at least one stage")
    return targets


def resize_label_embedding(model: DiffiT, num_classes: int) -> bool:
    """Give ``model`` a label embedding for ``num_classes`` classes (+ the null label); True if it changed.

    New class rows start at the base model's null (unconditional) embedding, so fine-tuning starts from
    the base model's unconditional behaviour for every class, and the null row is kept as it was.
    """
    if num_classes == model.num_classes or model.label_embed is None:
        return False
    if num_classes <= 0:
        raise ValueError("a class-conditional base model needs a dataset with classes to fine-tune on")
    old = model.label_embed.weight.detach()
    new = nn.Embedding(num_classes + 1, old.shape[1])
    with torch.no_grad():
        new.weight.copy_(old[-1].expand(num_classes + 1, -1))
    model.label_embed = new
    model.num_classes = num_classes
    return True


def apply_lora(
    model: DiffiT,
    targets: dict[str, tuple[int, int]],
    *,
    dropout: float,
    train_label_embedding: bool,
) -> PeftModel:
    """Freeze ``model`` and add the adapters; the label embedding is trained in full if asked."""
    default_rank, default_alpha = next(iter(targets.values()))
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        rank_pattern={re.escape(name): r for name, (r, _) in targets.items()},
        alpha_pattern={re.escape(name): a for name, (_, a) in targets.items()},
        modules_to_save=["label_embed"] if train_label_embedding and model.label_embed is not None else None,
    )
    return get_peft_model(model, config)


def base_diffit(model: nn.Module) -> DiffiT:
    """The DiffiT itself, whether ``model`` is one or a peft model wrapping one."""
    get_base_model = getattr(model, "get_base_model", None)  # a peft model (peft imported only for LoRA)
    inner = get_base_model() if callable(get_base_model) else model
    if not isinstance(inner, DiffiT):
        raise TypeError(f"expected a DiffiT or a peft model of one, got {type(inner).__name__}")
    return inner
