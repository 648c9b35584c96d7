"""Checkpoints of a base run: sharded resumable state, merged ``epoch_NNN.ckpt``, best/last, retention.

Files of one run (``run_NNN/checkpoints/``):
  ``epoch_NNN.ckpt``   merged full fp32 checkpoint: ``state_dict``, ``ema_state_dict``, ``epoch``,
                        ``global_step``, ``metrics``, ``config`` (plain data; loads with weights_only=True)
  ``best.ckpt``/``last.ckpt``  hard links to an epoch file (a copy where links are impossible)
  ``state/epoch_NNN/`` resumable state of that epoch: DeepSpeed's own shards (``*_optim_states.pt``,
                        ``*model_states.pt``) or, without DeepSpeed, ``model.safetensors`` + ``optimizer.pt``;
                        plus each rank's EMA slice and RNG state and ``trainer_state.json`` (counters, history)

Rank rule, kept inside this module: ``save``/``load`` are called on every rank. The collective parts
(DeepSpeed's save and load, which hang if one rank skips them) run everywhere; file work that must happen
once (merge, links, retention) runs on global rank 0 only, followed by a barrier.

Commit order, so that a crash at any point leaves the previous checkpoint whole: state is written under
``state/.tmp-epoch_NNN`` and renamed when every rank is done; the merged file is written under a temporary
name and renamed; then ``last``/``best`` are relinked; retention runs last. Resume trusts ``last.ckpt``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from launch import Topology, barrier, decide_on_rank0
from trainer.atomic import (
    TMP_PREFIX,
    atomic_rename_dir,
    atomic_write,
    atomic_write_json,
    fsync_dir,
    link_or_copy,
    remove_tmp_leftovers,
)
from trainer.ema import EMA, full_from_slices
from trainer.errors import UserError
from trainer.zero import merge_zero_shards, weights_only_loads

CKPT_FORMAT = "diffit-trainer/checkpoint-v1"


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


def load_checkpoint_file(path: Path, key: str = "state_dict") -> dict[str, Any]:
    """A ``.ckpt`` of this trainer, weights-only: a file that needs pickled code is refused.

    ``key`` is the entry it must hold: ``state_dict`` for base checkpoints, ``lora_state_dict`` for LoRA ones.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise UserError(
            f"cannot load checkpoint {path}: the file is damaged, was not written by this trainer, or needs "
            f"pickled code to load ({reason})"
        ) from None
    if not isinstance(data, dict) or key not in data:
        kind = data.get("kind") if isinstance(data, dict) else None
        what = f"a {kind} checkpoint" if isinstance(kind, str) else "not a checkpoint of this trainer"
        raise UserError(f"{path} is {what} (no '{key}' inside)")
    return data


@dataclass
class TrainingState:
    """The trainer's own counters, saved with every checkpoint (torchtitan's "Stateful" trainer state)."""

    epoch: int = 0
    """Epochs fully completed."""
    global_step: int = 0
    history: list[dict[str, Any]] | None = None
    best: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history or [],
            "best": self.best,
        }


class EpochCheckpoints:
    """One folder of ``epoch_NNN.ckpt`` files with ``best``/``last`` links and keep-last-N retention.

    Shared by base runs (``CheckpointManager``) and LoRA runs (``AdapterCheckpointManager``); subclasses
    say which extra paths belong to an epoch and write the files.
    """

    payload_key = "state_dict"
    """The entry every checkpoint file of this kind holds."""

    def __init__(
        self,
        run_dir: Path,
        folder: Path,
        topo: Topology,
        *,
        keep_last_n: int,
        config: dict[str, Any],
        kind: str,
    ) -> None:
        self.run_dir = run_dir
        self.dir = folder
        self.topo = topo
        self.keep_last_n = keep_last_n
        self.config = config
        self.kind = kind
        if topo.is_main:
            # Leftovers of a writer killed mid-save; nothing without the temporary prefix is touched.
            for path in self._leftover_folders():
                for removed in remove_tmp_leftovers(path):
                    print(f"Removed an incomplete checkpoint file left by a crash: {removed}")
        barrier(topo)

    def _leftover_folders(self) -> list[Path]:
        return [self.dir]

    def _epoch_paths(self, epoch: int) -> list[Path]:
        """Everything that belongs to one epoch's checkpoint (deleted together by retention)."""
        return [self.dir / f"{epoch_name(epoch)}.ckpt"]

    def _is_resumable(self, epoch: int) -> bool:
        return True

    def publish(self, ckpt: Path, *, is_best: bool, best_epoch: int | None) -> None:
        """After ``ckpt`` is complete (rank 0): point last (and best) at it, then apply retention."""
        link_or_copy(ckpt, self.dir / "last.ckpt")
        if is_best:
            link_or_copy(ckpt, self.dir / "best.ckpt")
        self.apply_retention(protect=best_epoch)

    def apply_retention(self, protect: int | None) -> list[Path]:
        """Remove epoch checkpoints beyond the newest ``keep_last_n``, never ``protect`` (the best epoch)."""
        if self.keep_last_n == 0:
            return []
        epochs = self.epochs_on_disk()
        keep = set(epochs[-self.keep_last_n :])
        if protect is not None:
            keep.add(protect)
        removed = []
        for epoch in epochs:
            if epoch in keep:
                continue
            for path in self._epoch_paths(epoch):
                self._delete_inside_run(path)
                removed.append(path)
        fsync_dir(self.dir)
        return removed

    def _delete_inside_run(self, path: Path) -> None:
        """Delete a file or folder of this run; a link is removed itself, never what it points to."""
        run = self.run_dir.resolve()
        if path.is_symlink():  # the link itself lives in its parent folder
            inside = path.parent.resolve().is_relative_to(run)
        else:
            target = path.resolve()
            inside = target.is_relative_to(run) and target != run
        if not inside:
            raise RuntimeError(f"refusing to delete {path}: outside run folder {self.run_dir}")
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)

    def epochs_on_disk(self) -> list[int]:
        epochs = []
        for path in self.dir.glob("epoch_*.ckpt"):
            suffix = path.stem.removeprefix("epoch_")
            if suffix.isdigit():
                epochs.append(int(suffix))
        return sorted(epochs)

    def find_resume_point(self) -> int | None:
        """Epoch of ``last.ckpt`` if it can be resumed from (decided on rank 0, agreed by all)."""

        def decide() -> int | None:
            last = self.dir / "last.ckpt"
            if not last.is_file():
                return None
            epoch = int(load_checkpoint_file(last, key=self.payload_key)["epoch"])
            return epoch if self._is_resumable(epoch) else None

        return decide_on_rank0(self.topo, decide)


class CheckpointManager(EpochCheckpoints):
    """Saves and restores the full training state of a base run, on every rank."""

    def __init__(self, run_dir: Path, topo: Topology, *, keep_last_n: int, config: dict[str, Any]) -> None:
        self.state_root = run_dir / "checkpoints" / "state"
        super().__init__(
            run_dir, run_dir / "checkpoints", topo, keep_last_n=keep_last_n, config=config, kind="base"
        )

    def _leftover_folders(self) -> list[Path]:
        return [self.dir, self.state_root]

    def _epoch_paths(self, epoch: int) -> list[Path]:
        return [self.dir / f"{epoch_name(epoch)}.ckpt", self.state_root / epoch_name(epoch)]

    def _is_resumable(self, epoch: int) -> bool:
        return (self.state_root / epoch_name(epoch) / "trainer_state.json").is_file()

    # -- saving ---------------------------------------------------------------------------------------

    def save(
        self,
        *,
        model: Any,
        optimizer: Any,
        ema: EMA,
        noise_generator: torch.Generator,
        state: TrainingState,
        metrics: dict[str, float],
        is_best: bool,
    ) -> dict[str, Any]:
        """Write epoch ``state.epoch``'s checkpoint on all ranks; returns {file, bytes, seconds} on rank 0."""
        start = time.perf_counter()
        name = epoch_name(state.epoch)
        tmp = self.state_root / f"{TMP_PREFIX}{name}"
        if self.topo.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.topo)

        if self.topo.deepspeed_stage is not None:
            model.save_checkpoint(str(self.state_root), tag=tmp.name, save_latest=False)
        elif self.topo.is_main:
            save_file(unwrap_model(model).state_dict(), str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        self._save_rank_files(tmp, ema, noise_generator)
        barrier(self.topo)

        info: dict[str, Any] = {}
        if self.topo.is_main:
            atomic_write_json(tmp / "trainer_state.json", self._trainer_state(state, ema))
            _fsync_tree(tmp)
            final = self.state_root / name
            if final.exists():  # an orphan of a crash between this rename and the merged file
                shutil.rmtree(final)
            atomic_rename_dir(tmp, final)
            ckpt = self.dir / f"{name}.ckpt"
            payload = self._merged_payload(final, state, metrics)
            atomic_write(ckpt, lambda f: torch.save(payload, f))
            del payload
            self.publish(ckpt, is_best=is_best, best_epoch=(state.best or {}).get("epoch"))
            info = {"file": str(ckpt), "bytes": ckpt.stat().st_size, "seconds": time.perf_counter() - start}
        barrier(self.topo)
        return info

    def _save_rank_files(self, folder: Path, ema: EMA, noise_generator: torch.Generator) -> None:
        rank = self.topo.rank
        if ema.partitioned or self.topo.is_main:  # unpartitioned EMA is identical on every rank
            save_file(
                {k: v.contiguous() for k, v in ema.local_state().items()},
                str(folder / f"ema_rank{rank}.safetensors"),
            )
        rng = {"torch": torch.get_rng_state(), "noise": noise_generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, folder / f"rng_rank{rank}.pt")

    def _trainer_state(self, state: TrainingState, ema: EMA) -> dict[str, Any]:
        return {
            **state.to_dict(),
            "world_size": self.topo.world_size,
            "distributed": self.topo.distributed,
            "ema_partitioned": ema.partitioned,
            "param_shapes": {k: list(v) for k, v in ema.shapes().items()},
        }

    def _merged_payload(
        self, folder: Path, state: TrainingState, metrics: dict[str, float]
    ) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT,
            "kind": self.kind,
            "state_dict": read_model_state(folder),
            "ema_state_dict": read_full_ema(folder),
            "epoch": state.epoch,
            "global_step": state.global_step,
            "metrics": dict(metrics),
            "config": self.config,
        }

    # -- loading --------------------------------------------------------------------------------------

    def load(
        self, epoch: int, *, model: Any, optimizer: Any, ema: EMA, noise_generator: torch.Generator
    ) -> TrainingState:
        """Restore everything saved for ``epoch`` on every rank."""
        folder = self.state_root / epoch_name(epoch)
        saved = json.loads((folder / "trainer_state.json").read_text())
        now = {name: list(shape) for name, shape in ema.shapes().items()}
        changed = [name for name in now if saved["param_shapes"].get(name) != now[name]]
        changed += [name for name in saved["param_shapes"] if name not in now]
        if changed:
            name = changed[0]
            raise UserError(
                f"the checkpoint of epoch {epoch} does not fit the model as configured now: {len(changed)} "
                f"parameter(s) differ, e.g. {name} (saved {saved['param_shapes'].get(name)}, now {now.get(name)}); "
                "drop the --set model.* override that changes the architecture"
            )
        if saved["world_size"] != self.topo.world_size or saved["distributed"] != self.topo.distributed:
            raise UserError(
                f"run was saved with {saved['world_size']} process(es) ({saved['distributed']}) and is resumed "
                f"with {self.topo.world_size} ({self.topo.distributed}); launch it with the same accelerate "
                "config as before"
            )
        if self.topo.deepspeed_stage is not None:
            with weights_only_loads():
                path, _ = model.load_checkpoint(
                    str(self.state_root),
                    tag=folder.name,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                    load_module_strict=True,
                )
            if path is None:
                raise UserError(f"DeepSpeed could not load the checkpoint in {folder}")
        else:
            unwrap_model(model).load_state_dict(load_file(str(folder / "model.safetensors")))
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        rank = self.topo.rank
        ema_file = folder / f"ema_rank{rank if saved['ema_partitioned'] else 0}.safetensors"
        ema.load_local_state(load_file(str(ema_file)))
        rng = torch.load(folder / f"rng_rank{rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        noise_generator.set_state(rng["noise"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        barrier(self.topo)
        return TrainingState(
            epoch=saved["epoch"],
            global_step=saved["global_step"],
            history=saved["history"],
            best=saved["best"],
        )


def read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from one epoch's resumable state (merging ZeRO shards if needed)."""
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    return merge_zero_shards(folder)


def read_full_ema(folder: Path) -> dict[str, torch.Tensor]:
    """Full EMA tensors from one epoch's resumable state (reassembling ZeRO-3 slices if needed)."""
    saved = json.loads((folder / "trainer_state.json").read_text())
    if not saved["ema_partitioned"]:
        return load_file(str(folder / "ema_rank0.safetensors"))
    slices = [load_file(str(folder / f"ema_rank{r}.safetensors")) for r in range(saved["world_size"])]
    return {
        name: full_from_slices([s[name] for s in slices], torch.Size(shape))
        for name, shape in saved["param_shapes"].items()
    }


def unwrap_model(model: Any) -> torch.nn.Module:
    """The plain module inside a DeepSpeed engine or DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)
