"""Typed run configuration: dataclasses, YAML presets, dotted CLI overrides.

A run's config is built in three layers, each validated the same way:
  1. a training YAML (``configs/training/*.yaml``) whose ``model:`` and ``data:`` entries name a preset
     (``configs/model/NAME.yaml``, ``configs/data/NAME.yaml``), a YAML path, or an inline mapping;
  2. command-line flags (``--epochs``, ``--model`` ...), applied as dotted overrides;
  3. ``--set key=value`` overrides (value parsed as YAML, so ``--set model.channels=[32,64]`` works).
Unknown keys and wrong types are refused with a ``ConfigError`` naming the key. The fully resolved config
(``to_dict``) is what a run records in ``config.json`` and in every checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from trainer.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"


class ConfigError(UserError):
    """A config file, flag or override that cannot be used; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """DiffiT architecture. Field names are the ``model.DiffiT`` constructor's keyword arguments."""

    name: str = "diffit_tiny"
    image_size: int | None = None
    """Training resolution; null takes the dataset's."""
    in_channels: int | None = None
    """Image channels; null takes the dataset's (1 for digits, 3 for CIFAR)."""
    channels: list[int] = field(default_factory=lambda: [32, 64])
    """Width of each U-Net stage; one stage per resolution, halving the resolution each time."""
    blocks_per_stage: int = 1
    window_size: int = 4
    head_dim: int = 16
    time_dim: int = 64
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    """Class-conditional when > 0; null takes the dataset's class count; 0 trains an unconditional model."""
    label_dropout: float = 0.1
    """Share of labels replaced by the null label in training, so classifier-free guidance works."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _require(bool(self.channels) and all(c > 0 for c in self.channels), "model.channels", "positive ints")
        _require(self.blocks_per_stage >= 1, "model.blocks_per_stage", "at least 1")
        _require(0.0 <= self.label_dropout < 1.0, "model.label_dropout", "in [0, 1)")

    def architecture(self) -> dict[str, Any]:
        """The keys that decide the shapes of the weights (what a checkpoint must match)."""
        return {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "dropout", "label_dropout")
        }


@dataclass
class DataConfig:
    """Dataset and class filter. Field names are ``data.load_dataset``'s keyword arguments."""

    name: str = "Digits"
    """Display name in listings and plots."""
    source: str = "digits"
    """digits (bundled, offline), cifar10 or cifar100."""
    root: str = "datasets"
    """Folder holding cifar-10-batches-py/ or cifar-100-python/."""
    classes: list[str] | None = None
    superclasses: list[str] | None = None
    image_size: int | None = None
    val_fraction: float = 0.1
    download: bool = False
    random_flip: bool = False

    def __post_init__(self) -> None:
        _require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "in [0, 1)")


@dataclass
class EDMConfig:
    """EDM (Karras et al. 2022) training noise distribution and sampler defaults."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_steps: int = 18

    def __post_init__(self) -> None:
        _require(self.p_std > 0, "edm.p_std", "positive")
        _require(0 < self.sigma_min < self.sigma_max, "edm.sigma_min/sigma_max", "0 < sigma_min < sigma_max")
        _require(self.num_steps >= 2, "edm.num_steps", "at least 2")


@dataclass
class CheckpointConfig:
    save_every_n_epochs: int = 1
    keep_last_n: int = 3
    """Epoch checkpoints kept besides the best one; 0 keeps every epoch."""
    monitor: Literal["train_loss", "val_loss"] = "val_loss"
    """Metric that picks ``best``; val_loss falls back to train_loss on data without a validation split."""
    mode: Literal["min", "max"] = "min"
    save_every_n_steps: int = 0
    """Also save a resumable checkpoint every N optimizer steps inside an epoch (0: off); only the newest
    one is kept."""
    async_save: bool = True
    """Training waits only while a save copies the state to host memory; files are written, merged, hashed and
    committed in the background (one save in flight at a time). false: the loop waits for the whole save."""
    on_save_error: Literal["continue", "fail"] = "fail"
    """When a save fails (full disk, lost mount): ``fail`` stops the run as failed; ``continue`` trains on
    and tries again at the next save. Either way the partial files are removed and earlier checkpoints kept."""

    def __post_init__(self) -> None:
        _require(self.save_every_n_epochs >= 1, "checkpoint.save_every_n_epochs", "at least 1")
        _require(self.save_every_n_steps >= 0, "checkpoint.save_every_n_steps", "0 (off) or more")
        _require(self.keep_last_n >= 0, "checkpoint.keep_last_n", "0 (keep all) or more")


@dataclass
class LoggingConfig:
    log_every_n_steps: int = 10
    sample_every_n_epochs: int = 1
    """Write a sample grid every N epochs (0: never)."""
    samples_per_class: int = 8
    guidance: float = 2.0
    trackers: list[Literal["wandb", "tensorboard"]] = field(default_factory=list)
    """Experiment trackers fed by global rank 0 (``trainer/trackers.py``); files go under the run's ``logs/``."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline keeps wandb's files local (upload later with ``wandb sync``); online uploads as it trains.
    A WANDB_MODE environment variable, when set, wins."""

    def __post_init__(self) -> None:
        _require(self.log_every_n_steps >= 1, "logging.log_every_n_steps", "at least 1")
        _require(self.sample_every_n_epochs >= 0, "logging.sample_every_n_epochs", "0 (never) or more")
        _require(len(set(self.trackers)) == len(self.trackers), "logging.trackers", "a list without repeats")


@dataclass
class LoraStage:
    """LoRA settings of one U-Net stage; null fields take the config's defaults."""

    rank: int | None = None
    alpha: int | None = None


@dataclass
class LoraConfig:
    """Blockwise LoRA (``configs/lora/*.yaml``): which linear layers of which stages get adapters."""

    target_layers: list[str] = field(
        default_factory=lambda: ["qkv", "qkv_temb", "proj", "mlp.fc1", "mlp.fc2"]
    )
    """Linear layers inside each transformer block (names in model/diffit.py) that get adapters."""
    rank: int = 8
    alpha: int = 16
    """LoRA scaling is alpha / rank."""
    dropout: float = 0.0
    stages: dict[str, LoraStage | None] = field(default_factory=dict)
    """Per stage (``encoder.0``, ``decoder.1``, ``bottleneck`` = the last encoder stage): settings, or null
    for no adapters there. Stages not listed use ``rank``/``alpha``."""
    train_label_embedding: bool = True
    """Train the label embedding in full (always done when the class count differs from the base's)."""
    num_classes: int | None = None
    """Classes fine-tuned on; null takes the dataset's. The label embedding is resized when it differs."""

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "lora.rank", "at least 1")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "in [0, 1)")
        _require(bool(self.target_layers), "lora.target_layers", "a non-empty list")
        for name, stage in self.stages.items():
            _require(
                stage is None or stage.rank is None or stage.rank >= 1, f"lora.stages.{name}.rank", "≥ 1"
            )


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    experiment: str = "diffit_base"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    epochs: int = 3
    batch_size: int = 64
    """Global batch (all processes together), so a run behaves the same on any number of processes."""
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    ema_halflife_kimg: float = 500.0
    """EMA half-life in thousands of training images (EDM's default for CIFAR-10 is 500)."""
    ema_rampup_ratio: float | None = 0.05
    """Early in training the half-life is at most this share of the images seen (EDM's ramp-up)."""
    max_steps_per_epoch: int | None = None
    """Cap on optimizer steps per epoch, for smoke runs; null runs whole epochs."""
    edm: EDMConfig = field(default_factory=EDMConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig | None = None
    """LoRA fine-tuning runs only: where the adapters go (``configs/lora/``)."""
    base_checkpoint: str | None = None
    """LoRA fine-tuning runs only: the base ``.ckpt`` used (resolved path, recorded by the run)."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "epochs", "at least 1")
        _require(self.batch_size >= 1, "batch_size", "at least 1")
        _require(self.learning_rate > 0, "learning_rate", "positive")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two values in [0, 1)"
        )
        _require(self.warmup_steps >= 0, "warmup_steps", "0 or more")
        _require(self.grad_clip >= 0, "grad_clip", "0 (off) or more")
        _require(self.ema_halflife_kimg > 0, "ema_halflife_kimg", "positive")
        _require(
            self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
            "max_steps_per_epoch",
            "null or at least 1",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' must be {expected}")


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, strictly
# --------------------------------------------------------------------------------------------------

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and values of the wrong type."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"'{where}' must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{suggestion}; valid keys here: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default
        raise ConfigError(f"incomplete '{where}': {e}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"config key '{key}' has an invalid value {value!r}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}"
            )
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-3 as a string; a float field takes any float literal.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for '{key}'")  # a bug in this module, not user input


# --------------------------------------------------------------------------------------------------
# YAML files and presets
# --------------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load``; a missing or malformed file is a ``ConfigError``."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def preset_names(section: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / section).glob("*.yaml"))


def resolve_preset(section: str, ref: str) -> Path:
    """A preset name (``diffit_tiny``) or a path to a YAML file."""
    candidate = Path(ref)
    if candidate.suffix in (".yaml", ".yml") or candidate.parent != Path("."):
        if not candidate.is_file():
            raise ConfigError(f"{section} config file not found: {candidate}")
        return candidate
    path = CONFIG_DIR / section / f"{ref}.yaml"
    if not path.is_file():
        names = preset_names(section)
        hint = difflib.get_close_matches(ref, names, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"unknown {section} '{ref}'{suggestion}; choose one of {', '.join(names)} or pass a YAML file path"
        )
    return path


# Aliases of the seed workflow's --dataset flag.
DATASET_ALIASES = {"cifar10": "cifar10", "cifar": "cifar10", "cifar100": "cifar100", "digits": "digits"}


def _section(raw: Any, section: str) -> dict[str, Any]:
    """A training YAML's ``model:``/``data:`` entry: a preset name/path or an inline mapping."""
    if isinstance(raw, str):
        return load_yaml(resolve_preset(section, raw))
    if isinstance(raw, dict):
        return raw
    raise ConfigError(f"'{section}' must be a preset name, a YAML path or a mapping, got {raw!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value parsed as YAML (numbers, lists, null...)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. --set checkpoint.keep_last_n=2), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a nested dict; validation of the key happens when the dataclass is built."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def build_config(
    base: dict[str, Any] | Path,
    overrides: list[tuple[str, Any]] = (),  # type: ignore[assignment]
    cls: type[T] = TrainConfig,  # type: ignore[assignment]
) -> T:
    """Training YAML (or an already loaded dict, e.g. a run's config.json) plus overrides → validated config.

    ``model``/``data`` overrides that are strings (``--model diffit_cifar``) replace the whole section with
    that preset; dotted ones (``model.channels``) change one key.
    """
    data = load_yaml(base) if isinstance(base, Path) else _deep_copy(base)
    for section in ("model", "data", "lora"):
        if section in data and data[section] is not None:
            data[section] = _section(data[section], section)
    for key, value in overrides:
        if key in ("model", "data", "lora"):
            if key == "data" and isinstance(value, str):
                value = DATASET_ALIASES.get(value.lower(), value)
            data[key] = _section(value, key)
        else:
            apply_override(data, key, value)
    return from_dict(cls, data)


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(data))  # plain data only, which is all a config may hold


def diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys
