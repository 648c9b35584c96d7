"""Typed run configuration: the dataclasses, built strictly from plain data by ``from_dict`` (``strict.py``:
unknown keys and wrong types are refused with a ``ConfigError`` naming the key). The fully resolved config
(``to_dict``) is what a run records in ``config.json`` and in every checkpoint; ``files.py`` builds it
from YAML presets and command-line overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.checkpoint.policy import CheckpointPolicy
from trainer.checkpoint.retention import RetentionPolicy
from trainer.config.strict import ConfigError as ConfigError  # re-exported: where callers find them
from trainer.config.strict import from_dict as from_dict

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "configs"


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
    augment_dim: int | None = None
    """Size of the augmentation label the model is conditioned on (0: none); null takes the label's size when
    ``data.augment_p`` > 0, else 0. Resolved against the data; a run's config records the number."""

    def __post_init__(self) -> None:
        _require(self.augment_dim is None or self.augment_dim >= 0, "model.augment_dim", "null, 0 or more")
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
    augment_p: float = 0.0
    """EDM's non-leaking augmentation (``model/augment.py``), 0 = off: the probability of each geometric transform
    per image (EDM's CIFAR-10 recipe uses 0.12; every other image is also x-flipped). The model is told how each
    image was augmented (``model.augment_dim``) and samples as if it were not, so no augmentation shows in its
    samples. It does the x-flips itself: ``random_flip`` must then be false."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "in [0, 1)")
        _require(
            0.0 <= self.augment_p < 1.0, "data.augment_p", "in [0, 1) (0: off; EDM's CIFAR-10 recipe: 0.12)"
        )
        if self.augment_p > 0 and self.random_flip:
            raise ConfigError(
                f"data.augment_p={self.augment_p} flips images itself (and tells the model it did); pass "
                "--set data.random_flip=false with it"
            )


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
    keep_best_n: int = 0
    """Also keep the N best epochs by ``monitor``/``mode`` (0: the best one only, which is always kept)."""
    keep_every_n_epochs: int = 0
    """Also keep every N-th epoch forever, e.g. 10 (0: off). Rules combine: any rule keeps a checkpoint."""
    monitor: Literal["train_loss", "val_loss", "fid"] = "val_loss"
    """Metric that picks ``best``; val_loss falls back to train_loss on data without a validation split. fid
    (with ``mode: min``) needs ``evaluation.fid_every_n_epochs``: only the epochs with an FID compete."""
    mode: Literal["min", "max"] = "min"
    save_every_n_steps: int = 0
    """Also save a resumable checkpoint every N optimizer steps inside an epoch (0: off); only the newest
    one is kept."""
    save_every_n_minutes: float = 0.0
    """Also save a resumable checkpoint when this much wall-clock time has passed since the last save (0:
    off; fractions allowed); global rank 0's clock decides for every rank. Kept like step checkpoints."""
    async_save: bool = True
    """Training waits only while a save copies the state to host memory; files are written, merged, hashed and
    committed in the background (one save in flight at a time). false: the loop waits for the whole save."""
    on_save_error: Literal["continue", "fail"] = "fail"
    """When a save fails (full disk, lost mount): ``fail`` stops the run as failed; ``continue`` trains on
    and tries again at the next save. Either way the partial files are removed and earlier checkpoints kept."""

    def retention(self) -> RetentionPolicy:
        return RetentionPolicy(self.keep_last_n, self.keep_best_n, self.keep_every_n_epochs)

    def policy(self) -> CheckpointPolicy:
        """What the checkpoint engine is given."""
        return CheckpointPolicy(self.save_every_n_epochs, self.save_every_n_steps, self.save_every_n_minutes,
                                self.async_save, self.on_save_error, self.retention())  # fmt: skip

    def __post_init__(self) -> None:
        _require(self.save_every_n_epochs >= 1, "checkpoint.save_every_n_epochs", "at least 1")
        _require(self.save_every_n_steps >= 0, "checkpoint.save_every_n_steps", "0 (off) or more")
        _require(self.save_every_n_minutes >= 0, "checkpoint.save_every_n_minutes", "0 (off) or more")
        _require(self.keep_last_n >= 0, "checkpoint.keep_last_n", "0 (keep all) or more")
        _require(self.keep_best_n >= 0, "checkpoint.keep_best_n", "0 (the best only) or more")
        _require(self.keep_every_n_epochs >= 0, "checkpoint.keep_every_n_epochs", "0 (off) or more")


@dataclass
class EvaluationConfig:
    """FID during training (``scripts/evaluate.py`` computes it for any checkpoint afterwards)."""

    fid_every_n_epochs: int = 0
    """Compute the FID of the EMA weights every N epochs and at the last one (0: never)."""
    fid_num_samples: int = 10000
    """Samples per FID in training; published FIDs use 50,000 (``scripts/evaluate.py``'s default)."""
    fid_features: Literal["inception-v3", "standin"] = "inception-v3"
    """inception-v3 (the standard; weights download once) or standin (no download, for tests and offline
    smoke runs; not comparable with published FIDs): ``metrics/features.py``."""
    fid_batch_size: int = 250
    """Samples per model batch, the unit of work of a process and of a resume: the FID does not depend on the
    number of processes; the batch size changes which noise each sample gets."""

    def __post_init__(self) -> None:
        _require(self.fid_every_n_epochs >= 0, "evaluation.fid_every_n_epochs", "0 (never) or more")
        _require(self.fid_num_samples >= 2, "evaluation.fid_num_samples", "at least 2")
        _require(self.fid_batch_size >= 1, "evaluation.fid_batch_size", "at least 1")


@dataclass
class DistributedConfig:
    timeout_minutes: float = 5.0
    """How long a process waits for the others at a collective before the launch fails (a dead or frozen
    process or machine): then every process exits non-zero with a message naming what it waited for."""

    gradient_accumulation_steps: int | None = None
    """Micro-batches each process sums per optimizer step (the global batch is micro-batch x this x
    processes); null takes the accelerate/DeepSpeed config's value, else 1. How the global batch is split
    changes nothing of the result: a resume may change it, with the number of processes."""

    def __post_init__(self) -> None:
        _require(self.timeout_minutes > 0, "distributed.timeout_minutes", "positive")
        _require(
            self.gradient_accumulation_steps is None or self.gradient_accumulation_steps >= 1,
            "distributed.gradient_accumulation_steps",
            "null (the launch config's) or at least 1",
        )


@dataclass
class LoggingConfig:
    log_every_n_steps: int = 10
    sample_every_n_epochs: int = 1
    """Write a sample grid every N epochs (0: never)."""
    samples_per_class: int = 8
    sample_max_classes: int = 10
    """Rows of a sample grid at most: with more classes (CIFAR-100 animals: 40), that many spread evenly
    over them, so that a grid costs a bounded share of training whatever the class count."""
    guidance: float = 2.0
    trackers: list[Literal["wandb", "tensorboard"]] = field(default_factory=list)
    """Experiment trackers fed by global rank 0 (``trainer/training/trackers.py``); files go under the run's ``logs/``."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline keeps wandb's files local (upload later with ``wandb sync``); online uploads as it trains.
    A WANDB_MODE environment variable, when set, wins."""

    def __post_init__(self) -> None:
        _require(self.log_every_n_steps >= 1, "logging.log_every_n_steps", "at least 1")
        _require(self.sample_every_n_epochs >= 0, "logging.sample_every_n_epochs", "0 (never) or more")
        _require(self.sample_max_classes >= 1, "logging.sample_max_classes", "at least 1")
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
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
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
        if self.checkpoint.monitor == "fid" and not self.evaluation.fid_every_n_epochs:
            raise ConfigError("checkpoint.monitor fid needs FIDs to compare: set evaluation.fid_every_n_epochs "
                              "(e.g. 5), or monitor val_loss")  # fmt: skip
        if self.checkpoint.monitor == "fid" and self.checkpoint.mode != "min":
            raise ConfigError("checkpoint.monitor fid is better when lower: set checkpoint.mode min")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' must be {expected}")
