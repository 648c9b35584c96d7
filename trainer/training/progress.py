"""An epoch's progress on rank 0's terminal or log, and the training points its trackers get."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

from tqdm import tqdm


class Training(Protocol):
    """What the progress of an epoch reads of the trainer."""

    config: Any
    state: Any
    topo: Any
    trackers: Any
    run: Any

    @property
    def steps_per_epoch(self) -> int: ...


PLAIN_EVERY_SECONDS = 60.0
"""How often rank 0 prints a progress line where its output is not a terminal (a SLURM or nohup log)."""


class EpochProgress:
    """An epoch's progress (rank 0) and its tracker points: on multiples of the global step, so that every
    launch of a run logs the same steps, each averaging rank 0's loss since the previous point. Progress is a
    bar on a terminal; in a log file, a plain line every ``PLAIN_EVERY_SECONDS`` (a bar's ``\r`` redraws
    would glue the log's lines together)."""

    def __init__(self, trainer: Training, epoch: int) -> None:
        self.trainer, cfg = trainer, trainer.config
        self.first = trainer.state.step_in_epoch
        self.title = f"Epoch {epoch}/{cfg.epochs}"
        self.plain = not sys.stderr.isatty()
        self.bar = tqdm(total=trainer.steps_per_epoch, initial=self.first, desc=self.title,
                        disable=not trainer.topo.is_main or self.plain, leave=False)  # fmt: skip
        self.start = self.window_start = self.line_at = time.perf_counter()
        self.window_loss, self.window_steps = 0.0, 0

    def update(self, step: int, loss: float, lr: float, last: bool) -> None:
        cfg, trackers = self.trainer.config, self.trainer.trackers
        batch, every = cfg.batch_size, cfg.logging.log_every_n_steps
        self.window_loss, self.window_steps = self.window_loss + loss, self.window_steps + 1
        self.bar.update(1)
        now = time.perf_counter()
        rate = (step + 1 - self.first) * batch / (now - self.start)
        if step % every == 0 or last:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.2e}")
        if self.plain and not last and now - self.line_at >= PLAIN_EVERY_SECONDS:
            self.line_at = now
            self.trainer.run.print(f"{self.title}: step {step + 1}/{self.trainer.steps_per_epoch}, "
                                   f"loss={loss:.4f}, {rate:.0f} img/s, lr={lr:.2e}")  # fmt: skip
        global_step = self.trainer.state.global_step
        if trackers.enabled and (global_step % every == 0 or last):
            trackers.log(
                {"train/loss": self.window_loss / self.window_steps, "train/lr": lr,
                 "train/images_per_sec": self.window_steps * batch / (now - self.window_start)},
                step=global_step,
            )  # fmt: skip
            self.window_loss, self.window_steps, self.window_start = 0.0, 0, now

    def close(self) -> None:
        self.bar.close()
