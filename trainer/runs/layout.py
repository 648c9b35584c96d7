"""Every path of a run, in one place: the only module that spells the run layout's names.

    <checkpoint root>/
      base/base_model_last.ckpt          the hand-off file a LoRA run uses when given no base
      base_training/run_NNN/             a base run           lora_finetuning/run_NNN/   a LoRA run
        config.json  metadata.json         (both kinds)         base_model/base_model.ckpt  the base, stored once
        checkpoints/                       committed files      lora_weights/              committed files
          epoch_NNN.ckpt  step_NNNNNNN       merged full state    epoch_NNN.ckpt ...         adapters + their state
          best.ckpt  last.ckpt               links to epochs      best.ckpt  last.ckpt
          state/<tag>/                       resumable state      manifests/<tag>.json
          manifests/<tag>.json               commit records     adapter/                   peft's export of best
        logs/  samples/epoch_NNN.png  events.jsonl  tensorboard/  wandb/
        evaluations/<name>/                an FID's sample features while it is computed (removed after)
        damaged/<tag>/                     checkpoints that failed verification, moved aside
        run.lock                           held by the launch training the run
        run_key                            the job an --auto-resume run belongs to

Run numbers are zero-padded and keep growing (``run_1000``); they are always compared as integers. The
checkpoint folder's own layout (tags, ``manifests/``, ``state/``) is the engine's: ``checkpoint/folder.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from trainer.checkpoint.folder import CheckpointFolder, epoch_tag

KIND_FOLDERS = {"base": "base_training", "lora": "lora_finetuning"}
"""The folder under the checkpoint root that holds each kind's runs."""
_CHECKPOINT_FOLDERS = {"base": "checkpoints", "lora": "lora_weights"}
_RUN_NAME = re.compile(r"^run_(\d{3,})$")
DEFAULT_BASE = Path("base") / "base_model_last.ckpt"
"""Under the checkpoint root: the base a LoRA run uses when given none (the seed workflow's hand-off)."""


def kind_root(checkpoint_root: Path, kind: str) -> Path:
    return checkpoint_root / KIND_FOLDERS[kind]


def kind_of(root: Path) -> str:
    """The kind of the runs under a kind root (``.../base_training`` → ``base``)."""
    return next((kind for kind, folder in KIND_FOLDERS.items() if root.name == folder), "base")


def run_dir(root: Path, number: int) -> Path:
    return root / f"run_{number:03d}"


def run_number(name: str) -> int | None:
    """The number of a run folder's name (``run_007`` → 7), or None for any other name."""
    match = _RUN_NAME.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder of kind ``base`` or ``lora``."""

    path: Path
    kind: str

    @classmethod
    def of(cls, checkpoint_root: Path, kind: str, number: int) -> RunLayout:
        return cls(run_dir(kind_root(checkpoint_root, kind), number), kind)

    @classmethod
    def detect(cls, path: Path) -> RunLayout | None:
        """The layout of ``path`` if it is a run folder of either kind (told by its checkpoint folder)."""
        for kind, folder in _CHECKPOINT_FOLDERS.items():
            if (path / folder).is_dir() or path.parent.name == KIND_FOLDERS[kind]:
                return cls(path, kind)
        return None

    @property
    def number(self) -> int:
        number = run_number(self.path.name)
        if number is None:
            raise ValueError(f"{self.path} is not named like a run folder (run_NNN)")
        return number

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metadata(self) -> Path:
        return self.path / "metadata.json"

    @property
    def lock(self) -> Path:
        """Held by the launch training the run (``lock.py``)."""
        return self.path / "run.lock"

    @property
    def run_key(self) -> Path:
        """The key of the job an ``--auto-resume`` run belongs to, one line (read without metadata.json)."""
        return self.path / "run_key"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def events(self) -> Path:
        """One JSON line per save (tag, bytes, blocked and write seconds): the machine-readable record."""
        return self.logs / "events.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.logs / "tensorboard"

    def tensorboard_branch(self, branch: int) -> Path:
        """TensorBoard's folder of the run's ``branch``-th rewind (0: the run's own)."""
        return self.tensorboard / f"branch_{branch}" if branch else self.tensorboard

    def sample_grid(self, epoch: int) -> Path:
        return self.logs / "samples" / f"{epoch_tag(epoch)}.png"

    def fid_scratch(self, tag: str, num_samples: int, features: str) -> Path:
        """The chunk features of an FID of checkpoint ``tag`` (or of the weights at an epoch's end) while it
        is computed: what a stopped evaluation continues from."""
        return self.path / "evaluations" / f"fid-{tag}-{num_samples}-{features}"

    @property
    def checkpoints(self) -> Path:
        """The folder of committed checkpoint files, ``best``/``last`` and ``manifests/``."""
        return self.path / _CHECKPOINT_FOLDERS[self.kind]

    @property
    def checkpoint_folder(self) -> CheckpointFolder:
        """The run's checkpoints as the checkpoint engine is given them."""
        name = f"run {self.number:03d}" if run_number(self.path.name) is not None else self.path.name
        return CheckpointFolder(self.checkpoints, self.path, name, with_state=self.kind == "base",
                                writes_in_owner=self.kind == "lora")  # fmt: skip

    def ckpt(self, name: str) -> Path:
        """A checkpoint file by tag or alias: ``epoch_003``, ``step_0000042``, ``best``, ``last``."""
        return self.checkpoint_folder.ckpt(name)

    def missing_checkpoint(self, name: str) -> str:
        """What to say when checkpoint ``name`` is not in the run: and which ones it has."""
        folder = self.ckpt(name).parent
        kept = sorted(p.stem for p in folder.glob("*.ckpt") if not p.name.startswith("."))
        return (
            f"run {self.path.name} has no checkpoint {name} (never saved, or removed by retention); it has "
            f"{', '.join(kept) or 'none'}"
        )

    @property
    def stored_base(self) -> Path:
        """LoRA runs: the base model the adapters apply to, stored once."""
        return self.path / "base_model" / "base_model.ckpt"

    @property
    def adapter(self) -> Path:
        """LoRA runs: peft's export (``save_pretrained``) of the best adapters."""
        return self.path / "adapter"

    @property
    def damaged(self) -> Path:
        return self.checkpoint_folder.damaged

    def new_folders(self) -> list[Path]:
        """The folders a new run starts with."""
        own = self.stored_base.parent if self.kind == "lora" else self.checkpoints
        return [self.logs, own]
