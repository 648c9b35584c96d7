"""zero-overhead: the trainer's throughput over a minimal hand-written loop's with 2 processes under DeepSpeed
ZeRO-2 and ZeRO-3 (img/s trainer / hand loop), one figure per config (``Setup.zero_configs``).

The overhead figure's comparison, launched with ``accelerate launch --config_file configs/accelerate/NAME.yaml
--num_processes 2`` on both sides: time of one epoch of ``benchmarks/hand_loop.py`` (a minimal Accelerate +
DeepSpeed loop: same model, data order, global batch, AdamW and ``model.edm_loss``, DeepSpeed clipping; no
EMA, no saves) ÷ the time between consecutive "Epoch N/M" lines of ``scripts/train_base.py`` (the same steps
plus EMA, progress bar, tensorboard logging, metadata, and a checkpoint every epoch: its ZeRO shards'
snapshot and their background writing). ``ZERO_OVERHEAD_ROUNDS`` trainer launches of ``ZERO_OVERHEAD_EPOCHS``
epochs and as many hand-loop launches per config run at once but take turns (``time_sliced``: each launch,
its workers included, runs 1 s while the others are stopped), each timed on its own running clock. Medians
over the trainer launches' epochs 2..M (epoch 1 and start-up are their warm-up) and over the hand loops'
epochs (after 2 warm-up steps). Both sides train only.
"""

from __future__ import annotations

from benchmarks.figures.overhead import overhead_figure
from benchmarks.harness import Figure
from benchmarks.measurements import Measurements

TARGET = (">=", 0.97)


def measure(m: Measurements) -> list[Figure]:
    figures = []
    for stage, config in m.setup.zero_configs().items():
        name = f"trainer overhead, 2 processes {stage} (img/s trainer / hand loop)"
        figures.append(overhead_figure(TARGET, name, m.zero_overhead(config)))
    return figures
