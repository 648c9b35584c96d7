"""The base training loop: EDM loss on DiffiT, EMA, per-epoch validation, checkpoints and sample grids.

The loop holds no rank logic of its own beyond "only rank 0 draws": checkpoint I/O decisions live in
``CheckpointManager``, metadata writes in ``RunHandle``, experiment trackers in ``Trackers``, collectives in
``launch``.

Stopping: SIGTERM, SIGINT or SIGUSR1 on any rank sets a flag; the ranks agree on it at the next step
boundary (one collective per step), save a resumable step checkpoint and raise ``Interrupted``, which the
command line turns into status ``interrupted`` and exit code 0. A second signal only repeats the notice.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
from typing import Any

import torch
from tqdm import tqdm

from data import DatasetSplits, ImageDataset
from data.order import epoch_order
from launch import Topology, all_reduce_sum, barrier, configure_deepspeed
from model import EDMSchedule, edm_loss
from model.lora import base_diffit
from trainer import faults
from trainer.checkpoint.formats.base import CheckpointManager, epoch_name, load_checkpoint_file
from trainer.checkpoint.formats.lora import AdapterCheckpointManager
from trainer.checkpoint.io.atomic import TMP_PREFIX, atomic_rename
from trainer.checkpoint.protocol import TrainingState
from trainer.config import TrainConfig
from trainer.ema import EMA
from trainer.errors import Interrupted, SaveFailed, UserError
from trainer.factory import base_weights, build_lora_model, build_model, load_trainable
from trainer.runs.store import RunHandle
from trainer.samples import sample_grid, save_grid
from trainer.trackers import Trackers, open_trackers

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    base = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base


def plan_steps(config: TrainConfig, num_train: int, world_size: int) -> tuple[int, int]:
    """(per-process micro batch, optimizer steps per epoch); refuses batch sizes that cannot work."""
    if config.batch_size % world_size:
        raise UserError(
            f"batch size {config.batch_size} is not divisible by the {world_size} processes of this launch; "
            f"choose a multiple of {world_size} (--batch-size) or change --num_processes"
        )
    steps = num_train // config.batch_size
    if steps == 0:
        raise UserError(
            f"batch size {config.batch_size} is larger than the {num_train} training images; "
            "choose a smaller --batch-size"
        )
    if config.max_steps_per_epoch is not None:
        steps = min(steps, config.max_steps_per_epoch)
    return config.batch_size // world_size, steps


class Trainer:
    """Trains a base model (``kind="base"``) or LoRA adapters on a frozen base (``kind="lora"``)."""

    def __init__(
        self,
        config: TrainConfig,
        accelerator: Any,
        topo: Topology,
        run: RunHandle,
        splits: DatasetSplits,
        kind: str = "base",
    ) -> None:
        self.config, self.accelerator, self.topo, self.run, self.splits = (
            config,
            accelerator,
            topo,
            run,
            splits,
        )
        self.kind = kind
        self.micro_batch, self.steps_per_epoch = plan_steps(config, len(splits.train), topo.world_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self._sampler: torch.nn.Module | None = None  # rank 0's CPU copy for sample grids, built once

        configure_deepspeed(accelerator, micro_batch=self.micro_batch, grad_clip=config.grad_clip)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        module = self._build_module()
        optimizer = torch.optim.AdamW(
            [p for p in module.parameters() if p.requires_grad],
            lr=config.learning_rate,
            betas=(config.betas[0], config.betas[1]),
            weight_decay=config.weight_decay,
        )
        self.model, self.optimizer = accelerator.prepare(module, optimizer)
        self.module = module
        self.net = base_diffit(module)
        self.ema = EMA(
            module.named_parameters(),
            halflife_kimg=config.ema_halflife_kimg,
            rampup_ratio=config.ema_rampup_ratio,
            rank=topo.rank,
            world_size=topo.world_size,
        )
        self.noise = torch.Generator(topo.device)  # re-seeded from (seed, step) before every step
        manager = CheckpointManager if kind == "base" else AdapterCheckpointManager
        self.checkpoints: CheckpointManager | AdapterCheckpointManager = manager(
            run.path,
            topo,
            keep_last_n=config.checkpoint.keep_last_n,
            config=config.to_dict(),
            async_save=config.checkpoint.async_save,
        )
        self.state = TrainingState(history=[])
        self.trackers = Trackers()  # opened by fit(), once resume() has set the step to continue from

    def _build_module(self) -> torch.nn.Module:
        if self.kind == "base":
            return build_model(self.config)
        base = load_checkpoint_file(self.run.path / "base_model" / "base_model.ckpt")
        return build_lora_model(self.config, base_weights(base))

    # -- resume -----------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the newest intact checkpoint; damaged ones are moved aside and reported, and with
        none intact the run starts over in its own folder."""
        point = self.checkpoints.find_resume_point()
        for bad in point.damaged:
            self.run.warn(
                f"checkpoint {bad['tag']} of run {self.run.number:03d} is damaged: {bad['reason']}. "
                f"Its files were moved to {self.run.path / bad['moved_to']}; falling back to an older checkpoint"
            )
            self.run.record_event("fallback", **bad)
        manifest = point.manifest
        if manifest is None:
            self.run.warn(
                f"run {self.run.number:03d} has no intact checkpoint to resume from: TRAINING STARTS OVER FROM "
                "SCRATCH in the same run folder"
                + (" (the damaged files are kept under damaged/)" if point.damaged else "")
            )
            self.run.record_event("restart_from_scratch", damaged=[d["tag"] for d in point.damaged])
            self.run.record_resume(checkpoint=None, state=self.state, topo=self.topo)
            self.checkpoints.repair_links(best_epoch=None)
            return
        self.state = self.checkpoints.load(
            manifest,
            model=self.model,
            optimizer=self.optimizer,
            ema=self.ema,
            noise_generator=self.noise,
            seed=self.config.seed,
        )
        self.checkpoints.repair_links(best_epoch=(self.state.best or {}).get("epoch"))
        self.run.print(
            f"Resuming run {self.run.number:03d} from {manifest.describe()} "
            f"(checkpoint {manifest.tag}, verified against its manifest)"
        )
        if (manifest.world_size, manifest.distributed) != (self.topo.world_size, self.topo.distributed):
            self.run.print(
                f"The checkpoint was saved by {manifest.world_size} process(es) ({manifest.distributed}); "
                f"continuing on {self.topo.world_size} ({self.topo.distributed}) with its full optimizer state"
            )
            self.run.record_event(
                "world_size_change",
                tag=manifest.tag,
                from_world_size=manifest.world_size,
                from_distributed=manifest.distributed,
                to_world_size=self.topo.world_size,
                to_distributed=self.topo.distributed,
            )
        self.run.record_resume(checkpoint=manifest.tag, state=self.state, topo=self.topo)

    # -- training ---------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train the remaining epochs, feeding the configured trackers; they are closed however it ends."""
        self.trackers = open_trackers(self.config, self.run, resume_step=self.state.global_step)
        self._stop_signal: int | None = None
        previous = self._catch_stop_signals()
        failed = True
        try:
            self._fit_epochs()
            failed = False
        except Interrupted:
            failed = False
            raise
        finally:
            if failed:  # let a save in flight finish (no collective: the other ranks may be elsewhere)
                self.checkpoints.join()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.trackers.close(failed=failed)

    def _catch_stop_signals(self) -> dict[int, Any]:
        """Turn stop signals into a flag checked at step boundaries (main thread only, as Python requires)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stop_signal is None:
                self._stop_signal = signum
                note = f"\nReceived {name}: saving a resumable checkpoint after this step, then stopping\n"
            else:
                note = f"\nReceived {name} again: still stopping; the checkpoint being written is completed first\n"
            os.write(2, note.encode())  # not print(): a handler may interrupt a print in progress

        return {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (one small collective, at a step boundary); every rank then
        knows the signal of the lowest rank that got one."""
        signals = [0.0] * self.topo.world_size
        signals[self.topo.rank] = float(self._stop_signal or 0)
        received = [int(s) for s in all_reduce_sum(signals, self.topo) if s]
        if received and self._stop_signal is None:
            self._stop_signal = received[0]
        return bool(received)

    def _fit_epochs(self) -> None:
        cfg = self.config
        self.run.update(epochs_total=cfg.epochs)
        for epoch in range(self.state.epoch + 1, cfg.epochs + 1):
            start = time.perf_counter()
            train_loss = self._train_epoch(epoch)
            self._report(self.checkpoints.poll())
            val_loss = self._validate()
            seconds = time.perf_counter() - start
            metrics = {"train_loss": train_loss}
            if val_loss is not None:
                metrics["val_loss"] = val_loss
            entry: dict[str, Any] = {
                "epoch": epoch,
                **metrics,
                "lr": lr_at(cfg, self.state.global_step - 1, self.total_steps),
                "seconds": round(seconds, 3),
                "images_per_sec": round(self.steps_per_epoch * cfg.batch_size / seconds, 2),
                "checkpoint": None,
            }
            is_best = self._update_best(epoch, metrics)
            self.state.epoch, self.state.step_in_epoch, self.state.epoch_loss_sum = epoch, 0, 0.0
            assert self.state.history is not None
            self.state.history.append(entry)
            saved: dict[str, Any] = {}  # {tag, blocked_seconds, snapshot_bytes} when a save was started
            if epoch % cfg.checkpoint.save_every_n_epochs == 0 or epoch == cfg.epochs:
                entry["checkpoint"] = f"{epoch_name(epoch)}.ckpt"  # part of the state being saved
                saved = self._save(metrics, is_best)
                entry["save_blocked_seconds"] = round(saved["blocked_seconds"], 4)
                if self.kind == "lora" and is_best:
                    self._export_adapter()
            faults.point("metadata", step=self.state.global_step)
            self.run.record_epoch(
                self.state, kept=self.checkpoints.epochs_on_disk() if self.topo.is_main else []
            )
            self._log_epoch(entry, val_loss)
            line = f"Epoch {epoch}/{cfg.epochs}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            self.run.print(line + f", {entry['images_per_sec']:.0f} img/s" + ("  (best)" if is_best else ""))
            every = cfg.logging.sample_every_n_epochs
            if every and (epoch % every == 0 or epoch == cfg.epochs):
                self._write_samples(epoch)
            self._report(self.checkpoints.poll())  # a background save that finished meanwhile
            if self._stop_agreed():  # a signal during validation, saving or sampling
                self._stop(saved_now=bool(saved))
        self._report(self.checkpoints.wait())
        best = self.state.best or {}
        self.run.finish("completed")
        self.run.print(
            f"Training completed. Best checkpoint: epoch {best.get('epoch')}, {best.get('metric')}={best.get('value'):.4f}"
            if best
            else "Training completed."
        )

    def _train_epoch(self, epoch: int) -> float:
        """Train epoch ``epoch`` from ``state.step_in_epoch`` on (0 unless resumed inside it); its mean loss."""
        cfg, topo = self.config, self.topo
        order = epoch_order(
            len(self.splits.train),
            cfg.batch_size,
            seed=cfg.seed,
            epoch=epoch,
            random_flip=cfg.data.random_flip,
        )
        self.model.train()
        first = self.state.step_in_epoch
        loss_sum = 0.0  # this rank's losses of the steps run by this launch
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=first,
            desc=f"Epoch {epoch}/{cfg.epochs}",
            disable=not topo.is_main,
            leave=False,
        )
        start = time.perf_counter()
        window_loss, window_steps, window_start = 0.0, 0, start  # steps since the last tracker point
        every = cfg.checkpoint.save_every_n_steps
        for step in range(first, self.steps_per_epoch):
            lr = lr_at(cfg, self.state.global_step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            indices, flips = order.for_rank(step, topo.rank, topo.world_size)
            images, labels = self.splits.train.batch(indices, flips)
            # The step's noise is a function of (seed, step), drawn for the global batch on every rank, so
            # it is the same on any number of processes and needs no RNG state to resume.
            self.noise.manual_seed(cfg.seed * 1_000_003 + self.state.global_step)
            loss = self._loss(images, labels, self.noise, share=(topo.rank, topo.world_size))
            self.accelerator.backward(loss)
            if topo.deepspeed_stage is None and cfg.grad_clip > 0:
                self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.global_step += 1
            self.state.step_in_epoch = step + 1
            self.ema.update(images_seen=self.state.global_step * cfg.batch_size, batch_size=cfg.batch_size)
            value = loss.item()
            loss_sum += value
            window_loss, window_steps = window_loss + value, window_steps + 1
            bar.update(1)
            last = step == self.steps_per_epoch - 1
            if step % cfg.logging.log_every_n_steps == 0 or last:
                rate = (step + 1 - first) * cfg.batch_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.2e}")
            # Tracker points on multiples of the global step, so every launch of a run logs the same steps;
            # each one averages rank 0's loss since the previous point (no collective on the hot path).
            point = self.state.global_step % cfg.logging.log_every_n_steps == 0 or last
            if self.trackers.enabled and point:
                now = time.perf_counter()
                self.trackers.log(
                    {
                        "train/loss": window_loss / window_steps,
                        "train/lr": lr,
                        "train/images_per_sec": window_steps * cfg.batch_size / (now - window_start),
                    },
                    step=self.state.global_step,
                )
                window_loss, window_steps, window_start = 0.0, 0, now
            faults.point("step", step=self.state.global_step)
            stop = self._stop_agreed()
            if stop or (every and self.state.global_step % every == 0 and not last):
                carried = self.state.epoch_loss_sum
                self.state.epoch_loss_sum += all_reduce_sum([loss_sum], topo)[0] / topo.world_size
                self._save(
                    {"train_loss": self.state.epoch_loss_sum / self.state.step_in_epoch}, is_best=False
                )
                self.state.epoch_loss_sum = carried  # the running sum below still counts from ``carried``
                if stop:
                    bar.close()
                    self._stop(saved_now=True)
        bar.close()
        # Mean over the epoch's steps of the step loss averaged over ranks (steps before a resume included).
        total = self.state.epoch_loss_sum + all_reduce_sum([loss_sum], topo)[0] / topo.world_size
        return total / self.steps_per_epoch

    def _save(self, metrics: dict[str, float], is_best: bool) -> dict[str, Any]:
        """Start a checkpoint of the current state, after the previous one is finished and reported; with
        ``async_save`` off, also wait for this one. Returns {tag, blocked_seconds, snapshot_bytes}."""
        start = time.perf_counter()
        self._report(self.checkpoints.wait())  # the loop is blocked while a slow previous save finishes, too
        waited = time.perf_counter() - start
        queued = self.checkpoints.save(
            model=self.model,
            optimizer=self.optimizer,
            ema=self.ema,
            noise_generator=self.noise,
            state=self.state,
            metrics=metrics,
            is_best=is_best,
        )
        queued["blocked_seconds"] += waited
        self.trackers.log(
            {
                "checkpoint/blocked_seconds": queued["blocked_seconds"],
                "checkpoint/snapshot_mb": queued["snapshot_bytes"] / 1e6,
            },
            step=self.state.global_step,
        )
        if not self.config.checkpoint.async_save:
            self._report(self.checkpoints.wait())
        return queued

    def _report(self, outcome: dict[str, Any]) -> None:
        """Report a finished save: its figures, or its failure, which per config stops the run."""
        if not outcome:
            return
        if "error" in outcome:
            self.run.record_event("save_failed", tag=outcome["tag"], error=outcome["error"])
            for entry in self.state.history or []:
                if entry.get("checkpoint") == f"{outcome['tag']}.ckpt":
                    entry["checkpoint"] = None
            message = (
                f"checkpoint {outcome['tag']} could not be written ({outcome['error']}); its partial files "
                "were removed and every earlier checkpoint is intact"
            )
            if self.config.checkpoint.on_save_error == "fail":
                raise SaveFailed(
                    f"{message}. The run stops (checkpoint.on_save_error: fail): free space or fix the folder, "
                    f"then continue with --resume {self.run.number}"
                )
            self.run.warn(message + "; training continues and the next save tries again")
            return
        if "file" not in outcome:  # ranks other than 0 only learn the tag
            return
        how = (
            f"in the background; training blocked {outcome['blocked_seconds']:.2f} s for a "
            f"{outcome['snapshot_bytes'] / 1e6:.1f} MB host-memory snapshot"
            if self.config.checkpoint.async_save
            else "while training waited"
        )
        self.run.print(
            f"Saved {outcome['file']} ({outcome['bytes'] / 1e6:.1f} MB in {outcome['seconds']:.2f} s {how})"
        )
        self.trackers.log(  # at the step the checkpoint was taken
            {"checkpoint/seconds": outcome["seconds"], "checkpoint/size_mb": outcome["bytes"] / 1e6},
            step=outcome["global_step"],
        )
        self.run.update(checkpoints=self.checkpoints.epochs_on_disk())

    def _stop(self, *, saved_now: bool) -> None:
        """End training after a stop signal: make sure a resumable checkpoint of this moment exists."""
        if not saved_now:
            self._save({}, is_best=False)
        self._report(self.checkpoints.wait())
        name = signal.Signals(self._stop_signal).name if self._stop_signal is not None else "a stop signal"
        self.run.record_event("interrupted", signal=name, global_step=self.state.global_step)
        raise Interrupted(f"stopped by {name} at step {self.state.global_step}")

    def _log_epoch(self, entry: dict[str, Any], val_loss: float | None) -> None:
        """An epoch's metrics (rank 0)."""
        metrics: dict[str, float | None] = {
            "epoch/epoch": entry["epoch"],
            "epoch/train_loss": entry["train_loss"],
            "epoch/val_loss": val_loss,
            "epoch/seconds": entry["seconds"],
            "epoch/images_per_sec": entry["images_per_sec"],
        }
        self.trackers.log(metrics, step=self.state.global_step)

    def _loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        share: tuple[int, int] = (0, 1),
    ) -> torch.Tensor:
        cfg = self.config
        return edm_loss(
            self.model,
            images.to(self.topo.device),
            labels.to(self.topo.device),
            num_classes=self.net.num_classes,
            label_dropout=cfg.model.label_dropout,
            generator=generator,
            p_mean=cfg.edm.p_mean,
            p_std=cfg.edm.p_std,
            sigma_data=cfg.edm.sigma_data,
            share=share,
        )

    @torch.no_grad()
    def _validate(self) -> float | None:
        """Mean EDM loss on the held-out split, with the same noise every epoch so epochs compare.

        Every rank runs the same number of forwards (ZeRO-3 forwards are collective); a rank whose share
        runs out early evaluates a placeholder batch with weight 0.
        """
        val: ImageDataset | None = self.splits.val
        if val is None or len(val) == 0:
            return None
        topo = self.topo
        self.model.eval()
        generator = torch.Generator(topo.device).manual_seed(self.config.seed + 7919 * (topo.rank + 1))
        mine = torch.arange(topo.rank, len(val), topo.world_size)
        batches = math.ceil(math.ceil(len(val) / topo.world_size) / self.micro_batch)
        total = count = 0.0
        for b in range(batches):
            chunk = mine[b * self.micro_batch : (b + 1) * self.micro_batch]
            weight = len(chunk)
            images, labels = val.batch(chunk if weight else torch.zeros(1, dtype=torch.long))
            loss = self._loss(images, labels, generator)
            total += loss.item() * weight
            count += weight
        self.model.train()
        total, count = all_reduce_sum([total, count], topo)
        return total / count

    def _update_best(self, epoch: int, metrics: dict[str, float]) -> bool:
        monitor = self.config.checkpoint.monitor
        if monitor not in metrics:  # val_loss on data without a validation split
            monitor = "train_loss"
        value = metrics[monitor]
        best = self.state.best
        better = (
            best is None
            or (self.config.checkpoint.mode == "min" and value < best["value"])
            or (self.config.checkpoint.mode == "max" and value > best["value"])
        )
        if better:
            self.state.best = {
                "epoch": epoch,
                "metric": monitor,
                "value": value,
                "mode": self.config.checkpoint.mode,
            }
        return better

    # -- samples ----------------------------------------------------------------------------------

    def _inference_model(self, ema: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Rank 0's CPU model with the EMA weights (built once; only the EMA tensors change per epoch)."""
        if self._sampler is None:
            with torch.random.fork_rng(devices=[]):  # the throwaway init must not shift training's RNG
                self._sampler = self._build_module()
        load_trainable(self._sampler, {k: v.cpu() for k, v in ema.items()})
        return self._sampler

    def _export_adapter(self) -> None:
        """peft's standard export of the best adapter (EMA weights) to ``adapter/``, replaced atomically."""
        ema = self.ema.full_state()
        if self.topo.is_main:
            model = self._inference_model(ema)
            tmp, final = self.run.path / f"{TMP_PREFIX}adapter", self.run.path / "adapter"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))  # type: ignore[operator]
            if final.exists():
                shutil.rmtree(final)
            atomic_rename(tmp, final)
        barrier(self.topo)

    def _write_samples(self, epoch: int) -> None:
        ema = self.ema.full_state()
        if self.topo.is_main:
            sampler = self._inference_model(ema)
            logging = self.config.logging
            edm = self.config.edm
            names = self.splits.class_names if self.net.num_classes else ["samples"]
            images = sample_grid(
                sampler,
                class_names=names,
                per_class=logging.samples_per_class,
                schedule=EDMSchedule(edm.num_steps, edm.sigma_min, edm.sigma_max, edm.rho),
                guidance=logging.guidance,
                seed=self.config.seed,
            )
            path = self.run.path / "logs" / "samples" / f"{epoch_name(epoch)}.png"
            save_grid(images, names, logging.samples_per_class, path)
            self.run.print(f"Wrote sample grid {path}")
            self.trackers.log_image("samples", path, step=self.state.global_step)
        barrier(self.topo)
