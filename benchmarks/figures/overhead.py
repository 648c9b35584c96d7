"""overhead: the trainer's throughput over a minimal hand-written loop's (img/s trainer / hand loop).

Time of one epoch of ``benchmarks/hand_loop.py`` (a minimal Accelerate loop: same model, data order, global
batch, process count, AdamW, ``model.edm_loss``, grad clipping; no EMA, no saves) ÷ the time between
consecutive "Epoch N/M" lines of ``scripts/train_base.py`` (the same steps plus EMA, progress bar,
tensorboard logging, metadata, and a checkpoint every epoch: its snapshot, and its background writing, which
competes with training for the CPU and is waited for at the next save). ``--rounds`` trainer launches and as
many hand-loop launches run at once but take turns (``time_sliced``: 1 s each, the others stopped
meanwhile), and each is timed on its own running clock, so that both sides see the same machine: on a shared
machine, speed drifts by ±10% within a minute, so two programs run one after the other differ by that much
whatever they do. Medians over the trainer launches' epochs 2..M (epoch 1 and process start-up are their
warm-up) and over the hand-loop launches' epochs (after 2 warm-up steps; they run until the trainer runs
end). Both sides train only: the trainer gets an empty validation split and no sample grids.
"""

from __future__ import annotations

import itertools

from benchmarks.harness import Figure, Target, figure, median, spread
from benchmarks.measurements import Interleaved, Measurements

TARGET = (">=", 0.97)


def overhead_figure(target: Target, name: str, sides: Interleaved) -> Figure:
    """Figure ``name`` of ``target``: the hand loops' median epoch ÷ the trainer runs' (their epochs 2..M), both sides'
    spread in the detail."""
    s, loop = sides.setup, sides.loop
    intervals = [b - a for run in sides.runs for a, b in itertools.pairwise(run.epoch_stamps)]
    ratio = median(loop) / median(intervals)
    images = s.batch * s.steps
    detail = (
        f"epoch of {s.steps} steps x {s.batch} images: hand loop {spread(loop)} "
        f"({images / median(loop):.2f} img/s) vs train_base.py {spread(intervals)} "
        f"({images / median(intervals):.2f} img/s) with a ~{sides.runs[0].saves[0].nbytes / 1e6:.0f} MB "
        f"async save each epoch; {s.rounds} trainer and {s.rounds} hand-loop launches taking turns of "
        f"{s.slice_seconds:g} s, timed on their own running clocks; "
        f"{s.describe()}"
    )
    return figure(target, name, ratio, detail)


def measure(m: Measurements) -> list[Figure]:
    return [overhead_figure(TARGET, "trainer overhead (img/s trainer / hand loop)", m.interleaved)]
