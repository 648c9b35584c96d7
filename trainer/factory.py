"""Builders shared by training, sampling and loading: the config resolved against the data, the model."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from data import DatasetError, DatasetSplits, load_dataset
from model import DiffiT
from trainer.config import ConfigError, ModelConfig, TrainConfig


def load_data(config: TrainConfig) -> DatasetSplits:
    fields = dataclasses.asdict(config.data)
    fields.pop("random_flip")
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


def model_kwargs(model: ModelConfig, sigma_data: float) -> dict[str, Any]:
    kwargs = dataclasses.asdict(model)
    kwargs.pop("name")
    missing = [k for k in ("image_size", "in_channels", "num_classes") if kwargs[k] is None]
    if missing:
        raise ConfigError(f"model keys {', '.join(missing)} must be resolved against a dataset first")
    return {**kwargs, "sigma_data": sigma_data}


def build_model(config: TrainConfig) -> DiffiT:
    """A freshly initialised DiffiT for this config; architecture errors become a ``ConfigError``."""
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
