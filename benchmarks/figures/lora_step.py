"""lora-step: a LoRA training step's time over a base training step's (LoRA / base), same model and batch,
in one process and on 2 processes under ZeRO-2 and ZeRO-3 (``Setup.zero_configs``), one figure each.

``scripts/train_lora.py`` (the default blockwise config: adapters on the transformer blocks' linear layers,
the label embedding trained in full, lora dropout) adapting the synchronous run's ``diffit_cifar`` on
CIFAR-100 trees, and ``scripts/train_base.py`` training the same model on CIFAR-10, with the same global
batch and process count, EMA and logging. Both run at once taking turns (``time_sliced``), each on its own
running clock, as the overhead figure's sides do; medians of the time between consecutive "Epoch N/M"
lines over epochs 2..5 of 6 (epoch 1 warms up and is saved, epoch 6 ends in a save: the figure times the
training steps, which the save figures do not). Neither has validation or sample grids.

What bounds it: a LoRA step still runs the whole forward pass, plus the adapters' small matmuls and their
dropout, and its backward pass still goes through every frozen layer for the input gradients; it saves
the frozen weights' gradients (about half of a base backward pass), their optimizer and EMA updates. With a
backward pass of about twice the forward, that bounds the ratio in one process near (1 + 1) / (1 + 2) = 0.67
plus the adapters' cost. With several processes, base training also reduces every weight's gradient (ZeRO-2
all-reduces, ZeRO-3 reduce-scatters), LoRA only the adapters'; ZeRO-3's all-gathers of every weight in the
forward and the backward pass are the same for both, which brings the ratio towards 1 as they dominate.
"""

from __future__ import annotations

import itertools

from benchmarks.harness import BenchError, Figure, figure, median, spread
from benchmarks.measurements import Measurements
from benchmarks.runs import TrainerRun

TARGET = ("<=", 0.85)


def measure(m: Measurements) -> list[Figure]:
    """As ``setup`` launches (one process by default), then on 2 processes under each ZeRO config."""
    figures = [step_figure(m, "", m.lora_and_base_steps(), m.setup.describe())]
    for stage, config in m.setup.zero_configs().items():
        where = f"accelerate launch {config}, 2 processes"
        figures.append(step_figure(m, f", 2 processes {stage}", m.lora_and_base_steps(config), where))
    return figures


def step_figure(m: Measurements, label: str, runs: tuple[TrainerRun, TrainerRun], where: str) -> Figure:
    lora, base = runs
    steps = {run.history[-1]["global_step"] // len(run.history) for run in (lora, base)}
    if len(steps) != 1:
        raise BenchError(f"the LoRA and base runs' epochs differ in steps ({sorted(steps)}): not comparable")
    timed = [[b - a for a, b in itertools.pairwise(run.epoch_stamps[1:-1])] for run in (lora, base)]
    detail = (
        f"epoch of {steps.pop()} steps x {m.setup.batch} images: LoRA {spread(timed[0])} vs base "
        f"{spread(timed[1])}, taking turns of {m.setup.slice_seconds:g} s; {where}"
    )
    return figure(TARGET, f"LoRA step / base step{label} (same model, batch)", median(timed[0]) / median(timed[1]),
                  detail)  # fmt: skip
