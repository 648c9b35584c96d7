"""The folder the checkpoint engine is given, and the names it gives checkpoints: the only module that spells
the layout of a checkpoint folder.

    <path>/                       a run's checkpoints/ (base) or lora_weights/ (LoRA)
      <tag>.ckpt                  each checkpoint's model file (a LoRA checkpoint: its only file)
      best.ckpt  last.ckpt        links to epoch files
      state/<tag>/                a base checkpoint's resumable state
      manifests/<tag>.json        the commit record of each checkpoint
    <owner>/damaged/<tag>/        checkpoints that failed verification, set aside
    <owner>/superseded/<tag>/     checkpoints newer than the one a run went back to

Checkpoints are named by tags: ``epoch_NNN`` after an epoch, ``step_NNNNNNN`` inside one. Numbers are
zero-padded and keep growing (``epoch_1000``); they are always compared as integers. The owner is the folder
around ``path`` (a run's): the engine moves and deletes files inside it only, and knows nothing else of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFESTS = "manifests"
"""Inside a checkpoint folder: the commit record of each checkpoint (``manifests/<tag>.json``)."""


def epoch_tag(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


def step_tag(global_step: int) -> str:
    return f"step_{global_step:07d}"


def is_tag(name: str) -> bool:
    prefix, _, number = name.partition("_")
    return prefix in ("epoch", "step") and number.isdigit()


@dataclass(frozen=True)
class CheckpointFolder:
    """Where one series of checkpoints lives (a run's), as the engine sees it."""

    path: Path
    """The folder checkpoints are committed in."""
    owner: Path
    """The folder ``path`` lies in: damaged checkpoints are set aside in it, nothing is moved or deleted outside
    it."""
    name: str
    """How messages name the owner (``run 003``)."""
    with_state: bool = True
    """Each checkpoint has a ``state/<tag>/`` folder beside its ``.ckpt`` file; else the file is all of it."""
    writes_in_owner: bool = False
    """A crashed writer may leave ``.tmp-`` files in the owner too (a LoRA run's half-written adapter export)."""

    def ckpt(self, name: str) -> Path:
        """A checkpoint file by tag or alias: ``epoch_003``, ``step_0000042``, ``best``, ``last``."""
        return self.path / f"{name}.ckpt"

    @property
    def state_root(self) -> Path:
        """The resumable state of each tag, ``state/<tag>/`` (with ``with_state``)."""
        return self.path / "state"

    @property
    def manifests(self) -> Path:
        return self.path / MANIFESTS

    @property
    def damaged(self) -> Path:
        return self.owner / "damaged"

    @property
    def superseded(self) -> Path:
        """Checkpoints newer than the one the owner went back to, kept."""
        return self.owner / "superseded"

    @property
    def tag_roots(self) -> list[tuple[Path, str]]:
        """Where a checkpoint's files live, as (folder, suffix): tag ``T`` owns ``folder/T+suffix``."""
        own = [(self.path, ".ckpt")]
        return [*own, (self.state_root, "")] if self.with_state else own

    @property
    def leftover_folders(self) -> list[Path]:
        """Where a crashed checkpoint writer may leave ``.tmp-`` files."""
        return [
            self.path,
            *([self.state_root] if self.with_state else []),
            *([self.owner] if self.writes_in_owner else []),
        ]
