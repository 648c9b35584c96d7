"""save-interval: the cost of saving every N steps (trainer epoch time / hand loop's, minus 1).

For N in ``Setup.save_intervals`` (1 and 2 in `make bench`; the curve 1, 2, 5, 10 in `make bench-full`):
``scripts/train_base.py`` saving a resumable checkpoint in the background every N steps
(``checkpoint.save_every_n_steps``; each ~245 MB with optimizer state and EMA, only the newest kept) and every
epoch, with EMA and logging, against ``benchmarks/hand_loop.py`` (the overhead figure's minimal loop: no EMA,
no saves). The trainer launches and the hand loop run at once, taking turns (``time_sliced``), each timed on
its own running clock; medians of the time between consecutive "Epoch N/M" lines over the trainer runs'
epochs 2..4 and over the hand loop's epochs. The value is the time the trainer adds per epoch over the hand
loop's, as a fraction: the whole trainer overhead at that save frequency (CheckFreq bounds checkpoint overhead
at 3.5%). Targets: saving every 2 steps costs <= 3.5%, every step <= 7%; every point of the curve is in the
detail (a point moves by a few % from run to run).

What bounds it: a save's snapshot blocks training (~0.04 s here), and its writing (checksums and writes:
~0.3 s of a core for 245 MB) runs on the second core meanwhile, competing with the training step for memory
bandwidth; a save that is still being written when the next one is due makes the loop wait.
"""

from __future__ import annotations

import itertools

from benchmarks.harness import Figure, figure, median, spread
from benchmarks.measurements import Measurements

TARGETS = {1: ("<=", 0.07), 2: ("<=", 0.035)}
"""The intervals with a target; the curve's other points are in their detail."""


def measure(m: Measurements) -> list[Figure]:
    loop, runs = m.save_intervals
    epochs = {n: [b - a for a, b in itertools.pairwise(run.epoch_stamps[1:])] for n, run in runs.items()}
    cost = {n: median(times) / median(loop) - 1 for n, times in epochs.items()}
    curve = ", ".join(f"every {k}: {c:+.1%}" for k, c in cost.items())
    figures = []
    for n, target in TARGETS.items():
        run = runs[n]
        detail = (
            f"epoch of {m.setup.steps} steps: train_base.py saving every {n} steps {spread(epochs[n])} "
            f"({len(run.saves)} saves, each blocking {median([s.blocked_seconds for s in run.saves]):.3f} s) vs "
            f"hand loop {spread(loop)}; the curve: {curve}; taking turns of {m.setup.slice_seconds:g} s; "
            f"{m.setup.describe()}"
        )
        what = "every step" if n == 1 else f"every {n} steps"
        figures.append(figure(target, f"saving {what} (trainer / hand loop - 1)", cost[n], detail))
    return figures
