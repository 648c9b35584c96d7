"""The training loop: fit, epoch, step. EDM loss on DiffiT (or its LoRA adapters), EMA, validation.

Everything around the loop lives beside it: checkpoints in ``CheckpointManager`` (when to save, saving,
resume), the run's record in ``RunHandle``, trackers in ``Trackers``, stop signals in ``StopSignals``,
validation in ``validate.py``, FIDs in ``fid.py``, sample grids in ``samples.py``, progress lines in
``progress.py``, what differs between base and LoRA runs in the run's kind (``kinds.py``). The loop holds no rank logic of its own beyond "only rank 0 draws".
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from data import DatasetSplits
from data.order import EpochOrder, epoch_order
from launch import PeerLost, Topology, configure_deepspeed, peer_failure
from model import SamplingStopped, augment, edm_loss
from model.lora import base_diffit
from trainer.checkpoint.manager import Boundary, CheckpointManager
from trainer.checkpoint.manifest import Manifest
from trainer.checkpoint.states import RNGState, TrainingStates, TrainState
from trainer.config.changes import Change, refuse_inexact
from trainer.config.plan import lr_at, plan_steps
from trainer.config.schema import TrainConfig
from trainer.errors import Interrupted
from trainer.faults import NO_FAULTS, Faults
from trainer.runs.metadata import RunHandle
from trainer.training.base_model import load_init_weights
from trainer.training.ema import EMA
from trainer.training.factory import load_weights
from trainer.training.fid import EpochFids
from trainer.training.fid_chunks import EvaluationStopped
from trainer.training.kinds import RunKind
from trainer.training.progress import EpochProgress
from trainer.training.samples import InferenceCopy, draw_grid
from trainer.training.stop import StopSignals
from trainer.training.trackers import Trackers, epoch_metrics, open_trackers
from trainer.training.validate import ValidationStopped, validation_loss


class Trainer:
    """Trains a run of ``kind`` (a base model, or LoRA adapters on a frozen base) on every rank."""

    def __init__(
        self,
        config: TrainConfig,
        accelerator: Any,
        topo: Topology,
        run: RunHandle,
        splits: DatasetSplits,
        kind: RunKind,
        faults: Faults = NO_FAULTS,
        init_from: Path | None = None,
    ) -> None:
        self.config, self.accelerator, self.topo, self.run, self.splits = (
            config,
            accelerator,
            topo,
            run,
            splits,
        )
        self.kind, self.faults = kind, faults
        self.steps = plan_steps(config, len(splits.train), topo.world_size, topo.asks)
        self.total_steps = self.steps_per_epoch * config.epochs

        configure_deepspeed(accelerator, micro_batch=self.steps.micro_batch, accumulation=self.steps.accumulation,
                            grad_clip=config.grad_clip)  # fmt: skip
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        module = kind.build_module(config)
        start = load_init_weights(init_from, config) if init_from is not None else None
        if start is not None:  # a warm start: another run's weights; the optimizer and counters are fresh
            load_weights(module, start["state_dict"])
        optimizer = torch.optim.AdamW(
            [p for p in module.parameters() if p.requires_grad],
            lr=config.learning_rate,
            betas=(config.betas[0], config.betas[1]),
            weight_decay=config.weight_decay,
        )
        self.model, self.optimizer = accelerator.prepare(module, optimizer)
        self.net = base_diffit(module)
        self.ema = EMA(module.named_parameters(), halflife_kimg=config.ema_halflife_kimg,
                       rampup_ratio=config.ema_rampup_ratio, rank=topo.rank, world_size=topo.world_size)  # fmt: skip
        if start is not None:
            self.ema.from_full(start["ema_state_dict"])
        self.noise = torch.Generator(topo.device)  # re-seeded from (seed, step) before every step
        self.augment_rng = torch.Generator(topo.device)  # the same, with a seed of its own (augment_seed)
        self.state = TrainState()
        self.stop = StopSignals(announce=topo.is_main)
        self.trackers = Trackers()  # opened by fit(), once a resume has set the step to continue from
        self.inference = InferenceCopy(lambda: kind.build_module(config))  # for grids, exports and FIDs
        # Before training: without Inception's weights offline, the run fails now, not at its first FID.
        self.fids = EpochFids(config, topo, splits, run.layout, faults)
        states = TrainingStates(self.model, self.optimizer, self.ema, self.state, RNGState(config.seed))
        fmt = kind.checkpoint_format(run.layout, topo, config, faults)
        self.checkpoints = CheckpointManager(run.layout.checkpoint_folder, fmt, topo, states,
                                             config.checkpoint.policy(), journal=run, metrics=self.trackers,
                                             faults=faults)  # fmt: skip

    @property
    def steps_per_epoch(self) -> int:
        return self.steps.steps_per_epoch

    def resume(self, changes: list[Change], *, forked: bool = False) -> None:
        """Continue from the newest intact checkpoint (see ``CheckpointManager.load``), with ``changes`` to
        the run's config (or to the config of the run it ``forked``): refused before anything is loaded if
        they cannot apply from that checkpoint, else announced and recorded."""

        def accept(manifest: Manifest) -> None:
            refuse_inexact(changes, step_in_epoch=manifest.step_in_epoch, epochs_trained=manifest.epoch,
                           tag=manifest.tag)  # fmt: skip

        self.checkpoints.load(accept=accept)
        how = "in this fork" if forked else "on resume"
        self.run.record_changes(changes, self.config, step=self.state.global_step, how=how)

    # -- training ---------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train the remaining epochs, feeding the configured trackers; they are closed however it ends."""
        self.run.update(epochs_total=self.config.epochs)  # a resume may have changed it
        self.trackers.adopt(open_trackers(self.config, self.run, resume_step=self.state.global_step))
        self.trackers.backfill(self.state.history, self.steps_per_epoch)
        failed = True
        try:
            with self.stop:
                self._complete_epoch_outputs()
                for epoch in range(self.state.epoch + 1, self.config.epochs + 1):
                    self._epoch_or_peer_lost(epoch)
                self.checkpoints.close()
            failed = False
        except Interrupted:
            failed = False
            raise
        finally:
            if failed:  # let this rank's part of a save in flight finish (no collective)
                self.checkpoints.close(failed=True)
            self.trackers.close(failed=failed)
        self.run.finish("completed")
        best = self.state.best
        self.run.print(
            f"Training completed. Best checkpoint: epoch {best['epoch']}, {best['metric']}={best['value']:.4f}"
            if best
            else "Training completed."
        )

    def _epoch_or_peer_lost(self, epoch: int) -> None:
        """``_epoch``, with a collective of DeepSpeed's or torch's that a dead or frozen process failed
        turned into a ``PeerLost`` saying where (the trainer's own collectives raise one themselves)."""
        try:
            self._epoch(epoch)
        except RuntimeError as e:
            if isinstance(e, PeerLost):
                raise
            step = self.state.global_step + 1
            lost = peer_failure(e, what=f"DeepSpeed's collectives in step {step}", timeout=self.topo.timeout)
            if lost is None:
                raise
            raise lost from e

    def _epoch(self, epoch: int) -> None:
        cfg, state = self.config, self.state
        start, first = time.perf_counter(), state.step_in_epoch  # a resume may start inside the epoch
        train_loss = self._train_epoch(epoch)

        def stop_signal(batch: int) -> int | None:
            self.faults.point("validation", epoch=epoch, batch=batch)
            return self.stop.signal

        try:
            val_loss = validation_loss(self.model, self.splits.val, self._loss, topo=self.topo,
                                       micro_batch=self.steps.micro_batch, seed=cfg.seed,
                                       stop_signal=stop_signal)  # fmt: skip
            seconds = time.perf_counter() - start
            fid = self._fid(epoch) if self.fids.due(epoch) else None
        except (ValidationStopped, EvaluationStopped) as stopped:
            self._stop_in_validation(epoch, stopped.signal)
        fid_seconds = time.perf_counter() - start - seconds
        metrics = {"train_loss": train_loss, **({"val_loss": val_loss} if val_loss is not None else {}),
                   **({"fid": fid} if fid is not None else {})}  # fmt: skip
        entry: dict[str, Any] = {
            "epoch": epoch,
            **metrics,
            "lr": lr_at(cfg, state.global_step - 1, self.total_steps),
            "seconds": round(seconds, 3),
            "images_per_sec": round((self.steps_per_epoch - first) * cfg.batch_size / seconds, 2),
            "global_step": state.global_step,
            "checkpoint": None,
        }
        if fid is not None:
            entry.update(fid_samples=cfg.evaluation.fid_num_samples, fid_seconds=round(fid_seconds, 3))
        is_best = state.update_best(epoch, metrics, cfg.checkpoint.monitor, cfg.checkpoint.mode)
        state.end_epoch(entry)
        boundary = self.checkpoints.maybe_save(
            "epoch", stop_signal=self.stop.signal, metrics=metrics, is_best=is_best, last=epoch == cfg.epochs
        )
        if boundary.saved and is_best and self.kind.exports_best:
            model = self._inference_model()
            if model is not None:
                self.kind.on_new_best(model, self.run.layout)
            self.topo.comm.barrier(what=f"the export of epoch {epoch}'s adapters")
        self.faults.point("metadata", step=state.global_step)
        self.run.record_progress(state.state_dict(), kept=self.checkpoints.epochs_on_disk())
        self.trackers.log(epoch_metrics(entry), step=state.global_step)
        line = f"Epoch {epoch}/{cfg.epochs}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        self.run.print(line + f", {entry['images_per_sec']:.0f} img/s" + ("  (best)" if is_best else ""))
        self._stop_if_agreed(boundary)
        if self._samples_due(epoch):
            self._write_samples(epoch)

    def _fid(self, epoch: int) -> float:
        """FID of the EMA weights at the end of epoch ``epoch``, every rank drawing its share."""
        ema = self.ema.full_state()
        model = self.inference.with_weights(ema).to(self.topo.device)
        return self.fids.measure(epoch, model, ema, stop_signal=lambda: self.stop.signal, say=self.run.print)

    def _stop_in_validation(self, epoch: int, signal: int) -> NoReturn:
        """A stop signal during epoch ``epoch``'s validation or FID: its steps are trained, its end is not. The
        checkpoint of this moment (a step checkpoint at the epoch's last step) is committed, and the resume
        validates the epoch again, from the same weights."""
        self.model.train()
        self.stop.signal = signal  # the agreed one: this rank's own may be None
        self.run.print(f"Validation of epoch {epoch} left for the resume: {self.stop.name} came")
        # The step's end again, with the agreed signal: no loss is added, and the moment is saved.
        self._stop_if_agreed(self.checkpoints.maybe_save("step", stop_signal=signal, last=True))
        raise AssertionError("every rank voted for the stop: the step's end agrees on it")

    def _complete_epoch_outputs(self) -> None:
        """On a resume from the end of an epoch: what that epoch's end makes after its checkpoint (the best
        adapters' export, the sample grid), made again from the loaded state when a kill came between the
        checkpoint and them. The tracker records are backfilled from the history (``Trackers.backfill``)."""
        state, epoch = self.state, self.state.epoch
        if epoch == 0 or state.step_in_epoch != 0:
            return
        if self.kind.exports_best and state.best and state.best["epoch"] == epoch:
            model = self._inference_model()
            if model is not None:
                self.kind.on_new_best(model, self.run.layout)
            self.topo.comm.barrier(what=f"the export of epoch {epoch}'s adapters")
        if self._samples_due(epoch):
            grid = self.run.layout.sample_grid(epoch)
            if self.topo.comm.broadcast(
                not grid.exists(), what=f"whether epoch {epoch}'s sample grid exists"
            ):
                self._write_samples(epoch)

    def _samples_due(self, epoch: int) -> bool:
        every = self.config.logging.sample_every_n_epochs
        return bool(every) and (epoch % every == 0 or epoch == self.config.epochs)

    def _train_epoch(self, epoch: int) -> float:
        """Train epoch ``epoch`` from ``state.step_in_epoch`` on (0 unless resumed inside it); its mean loss
        over all its steps and ranks (steps before a resume included)."""
        cfg, state = self.config, self.state
        order = epoch_order(len(self.splits.train), cfg.batch_size, seed=cfg.seed, epoch=epoch,
                            random_flip=cfg.data.random_flip)  # fmt: skip
        self.model.train()
        meter = EpochProgress(self, epoch)
        for step in range(state.step_in_epoch, self.steps_per_epoch):
            loss, lr = self._step(order, step)
            last = step == self.steps_per_epoch - 1
            meter.update(step, loss, lr, last)
            self.faults.point("step", step=state.global_step)
            boundary = self.checkpoints.maybe_save("step", loss=loss, stop_signal=self.stop.signal, last=last)
            if boundary.stop_signal is not None:
                meter.close()
                self._stop_if_agreed(boundary)
        meter.close()
        return state.epoch_loss_sum / self.steps_per_epoch

    def _step(self, order: EpochOrder, step: int) -> tuple[float, float]:
        """One optimizer step on this rank's share of the global batch, summed over its micro-batches; (its
        loss, the learning rate)."""
        cfg, topo, state = self.config, self.topo, self.state
        lr = lr_at(cfg, state.global_step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        indices, flips = order.for_rank(step, topo.rank, topo.world_size)
        images, labels = self.splits.train.batch(indices, flips)
        # The global batch is cut into world size x accumulation micro-batches, rank r's k-th being part
        # r * accumulation + k. The step's noise is a function of (seed, step), drawn for the global batch
        # and cut the same way, so each image gets the same noise however the batch is split, and a resume
        # needs no RNG state. Each micro-batch's mean loss is scaled by 1 / accumulation (by Accelerate, or
        # DeepSpeed's backward), so the gradients sum to the global batch's mean.
        n, parts, losses = self.steps.micro_batch, self.steps.accumulation, []
        for k in range(parts):
            with self.accelerator.accumulate(self.model):
                if self.accelerator.sync_gradients != (k == parts - 1):
                    raise RuntimeError(f"Accelerate syncs gradients at micro-batch {k + 1} of {parts}")
                self.noise.manual_seed(cfg.seed * 1_000_003 + state.global_step)
                part, share = slice(k * n, (k + 1) * n), (topo.rank * parts + k, topo.world_size * parts)
                batch, augment_labels = self._augment(images[part], share)
                loss = self._loss(batch, labels[part], self.noise, share=share, augment_labels=augment_labels)
                self.accelerator.backward(loss)
                losses.append(loss.detach())
        if topo.deepspeed_stage is None and cfg.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.step_in_epoch = step + 1
        self.ema.update(images_seen=state.global_step * cfg.batch_size, batch_size=cfg.batch_size)
        return torch.stack(losses).mean().item(), lr

    def _augment(self, images: torch.Tensor, share: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """This micro-batch with EDM's augmentation, and its labels (None: ``data.augment_p`` is 0). Drawn for the
        global batch and cut like the loss noise, from a generator of its own: a run without augmentation draws
        exactly what it drew before augmentation existed."""
        p = self.config.data.augment_p
        if p == 0:
            return images, None
        self.augment_rng.manual_seed(augment_seed(self.config.seed, self.state.global_step))
        return augment(images.to(self.topo.device), p, self.augment_rng, share)

    def _loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | list[torch.Generator],
              share: tuple[int, int] = (0, 1), augment_labels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        cfg, device = self.config, self.topo.device
        return edm_loss(self.model, images.to(device), labels.to(device), num_classes=self.net.num_classes,
                        label_dropout=cfg.model.label_dropout, generator=generator, p_mean=cfg.edm.p_mean,
                        p_std=cfg.edm.p_std, sigma_data=cfg.edm.sigma_data, share=share,
                        augment_labels=augment_labels)  # fmt: skip

    def _stop_if_agreed(self, boundary: Boundary) -> None:
        """After the ranks agreed on a stop signal (its checkpoint is committed): end training."""
        if boundary.stop_signal is None:
            return
        self.stop.signal = boundary.stop_signal
        self.run.record_event("interrupted", signal=self.stop.name, global_step=self.state.global_step)
        raise Interrupted(f"stopped by {self.stop.name} at step {self.state.global_step}")

    # -- what rank 0 draws and exports ------------------------------------------------------------

    def _inference_model(self) -> torch.nn.Module | None:
        """Rank 0's inference copy with the current EMA weights, None elsewhere (the gather is collective)."""
        ema = self.ema.full_state()
        return self.inference.with_weights(ema) if self.topo.is_main else None

    def _write_samples(self, epoch: int) -> None:
        """Rank 0 draws epoch ``epoch``'s grid (after its checkpoint) while the others wait. A stop signal
        while it draws ends the drawing between two model calls, and the run: the resume, from that epoch's
        checkpoint, draws the grid."""
        model, stopped = self._inference_model(), None
        if model is not None:
            names = self.splits.class_names if self.net.num_classes else ["samples"]
            path = self.run.layout.sample_grid(epoch)
            try:
                draw_grid(model, self.config, names, path, should_stop=lambda: self.stop.signal is not None)
                self.run.print(f"Wrote sample grid {path}")
                self.trackers.log_image("samples", path, step=self.state.global_step)
            except SamplingStopped:
                stopped = self.stop.signal
        stopped = self.topo.comm.broadcast(stopped, what=f"the sample grid of epoch {epoch}")
        if stopped is not None:
            self.checkpoints.close()  # the epoch's checkpoint, if it is still being written
            self.stop.signal = stopped
            self.run.print(f"Sample grid of epoch {epoch} left for the resume to draw: {self.stop.name} came")
            self.run.record_event("interrupted", signal=self.stop.name, global_step=self.state.global_step)
            raise Interrupted(f"stopped by {self.stop.name} while drawing epoch {epoch}'s samples")


def augment_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s augmentation draws: a hash, sharing no seed with the loss noise's."""
    digest = hashlib.blake2b(f"augment {seed} {step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
