"""Builders shared by training, sampling and loading: the config resolved against the data, the model."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from data import DatasetError, DatasetSplits, load_dataset
from model import AUGMENT_DIM, DiffiT
from model.lora import apply_lora, resize_label_embedding, resolve_targets
from trainer.config.schema import ConfigError, ModelConfig, TrainConfig

if TYPE_CHECKING:
    from peft import PeftModel


def load_data(config: TrainConfig) -> DatasetSplits:
    fields = dataclasses.asdict(config.data)
    fields.pop("random_flip")
    fields.pop("augment_p")
    try:
        return load_dataset(**fields, seed=config.seed)
    except DatasetError as e:
        raise ConfigError(str(e)) from None


def resolve_model_against_data(config: TrainConfig, splits: DatasetSplits) -> None:
    """Fill the model's data-dependent keys (channels, classes, size) and check those already set."""
    model = config.model
    if model.image_size is not None and model.image_size != splits.image_size:
        raise ConfigError(
            f"model '{model.name}' is built for {model.image_size} px images but data '{splits.name}' gives "
            f"{splits.image_size} px; pass --set data.image_size={model.image_size} or "
            "--set model.image_size=null"
        )
    if model.in_channels is not None and model.in_channels != splits.channels:
        raise ConfigError(
            f"model.in_channels is {model.in_channels} but data '{splits.name}' has {splits.channels} channel(s)"
        )
    model.image_size = splits.image_size
    model.in_channels = splits.channels
    if model.num_classes is None:
        model.num_classes = splits.num_classes
    resolve_augment_dim(config)


def resolve_augment_dim(config: TrainConfig) -> None:
    """``model.augment_dim`` null: the augmentation label's size with ``data.augment_p`` > 0, else 0 (also what a
    config recorded before the key existed means: it trained without augmentation). A model that cannot take
    the label of an augmented run is refused."""
    model, p = config.model, config.data.augment_p
    if model.augment_dim is None:
        model.augment_dim = AUGMENT_DIM if p > 0 else 0
    elif model.augment_dim not in (0, AUGMENT_DIM):
        raise ConfigError(
            f"model.augment_dim must be null, 0 or {AUGMENT_DIM} (the augmentation label's size), got "
            f"{model.augment_dim}; pass --set model.augment_dim=null"
        )
    elif model.augment_dim == 0 and p > 0:
        raise ConfigError(
            f"data.augment_p={p} needs a model conditioned on the augmentation, but model.augment_dim is 0: the "
            "augmentations would leak into its samples. Pass --set model.augment_dim=null, or data.augment_p=0"
        )


def model_kwargs(model: ModelConfig, sigma_data: float) -> dict[str, Any]:
    kwargs = dataclasses.asdict(model)
    kwargs.pop("name")
    missing = [k for k in ("image_size", "in_channels", "num_classes") if kwargs[k] is None]
    if missing:
        raise ConfigError(f"model keys {', '.join(missing)} must be resolved against a dataset first")
    return {**kwargs, "sigma_data": sigma_data}


def build_model(config: TrainConfig) -> DiffiT:
    """A freshly initialised DiffiT for this config; architecture errors become a ``ConfigError``."""
    resolve_augment_dim(
        config
    )  # a no-op once resolved against the data; a checkpoint's config from before: 0
    try:
        return DiffiT(**model_kwargs(config.model, config.edm.sigma_data))
    except ValueError as e:
        raise ConfigError(f"model '{config.model.name}': {e}") from None


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full or EMA state dict; only buffers (rebuilt by the constructor) may be absent.

    ``strict=False`` alone would hide a mismatch (e.g. peft-prefixed keys, which then load nothing);
    here every parameter must arrive and no key may be left over.
    """
    result = model.load_state_dict(state_dict, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in result.missing_keys if k not in buffers]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"weights do not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the same-named parameters (EMA weights: only the trained ones); all must exist."""
    params = dict(model.named_parameters())
    unknown = [k for k in tensors if k not in params]
    if unknown:
        raise ConfigError(f"{len(unknown)} weights have no parameter in the model, e.g. {unknown[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def base_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a LoRA run adapts: the base checkpoint's EMA (what its samples come from) over its buffers."""
    return {**ckpt["state_dict"], **ckpt.get("ema_state_dict", {})}


def build_lora_model(config: TrainConfig, weights: dict[str, torch.Tensor]) -> PeftModel:
    """The base DiffiT with ``weights``, its label embedding sized for the fine-tuning classes, and adapters."""
    lora = config.lora
    if lora is None:
        raise ConfigError("a LoRA run needs a 'lora' config section (--lora-config)")
    model = build_model(config)
    load_weights(model, weights)
    num_classes = config.model.num_classes if lora.num_classes is None else lora.num_classes
    try:
        resized = resize_label_embedding(model, int(num_classes or 0))
        targets = resolve_targets(
            model,
            target_layers=lora.target_layers,
            rank=lora.rank,
            alpha=lora.alpha,
            stages={
                name: None if stage is None else (stage.rank, stage.alpha)
                for name, stage in lora.stages.items()
            },
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return apply_lora(
        model, targets, dropout=lora.dropout, train_label_embedding=lora.train_label_embedding or resized
    )
