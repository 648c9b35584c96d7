"""Sizes and repetitions of `make bench` and `make bench-full`, and ``Setup``: the part of them the command
line may change.

`make bench` measures the headline figures (the peers at 15 M and 61 M parameters, write efficiency, the stall,
saving every 1 and 2 steps, the trainer's overhead on 1 and 2 processes) in ~24 minutes on 2 CPU cores;
`make bench-full` adds the peers at 244 M, the scale figures, the save-interval curve, the LoRA figures, the
resume latency and the listing (docs/performance.md says how long each takes here); gpu.md has values for GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results.md"
"""What `make bench-full` writes (and the one docs/performance.md quotes); `make bench` writes ``HEADLINE_RESULTS``."""
HEADLINE_RESULTS = REPO / "benchmarks" / "results-headline.md"

MODEL = "diffit_cifar"
BATCH = 4  # global batch; one diffit_cifar step at batch 4 takes ~1.8 s on one core of a 2-core AMD EPYC VM
STEPS_PER_EPOCH = 8  # ~15 s epochs, each ending in a ~370 MB checkpoint (a far heavier save load than a
#                      real run's: a CIFAR-10 epoch is 390 steps at batch 128)
EPOCHS = 4  # per trainer launch of the overhead figure: epoch 1 is the warm-up, epochs 2..4 repetitions
ROUNDS = 2  # trainer launches of the overhead figure (6 repetitions), each run beside a hand-loop launch
SLICE_SECONDS = 1.0  # the overhead figure's processes take turns of this long (``time_sliced``)
HAND_LOOP_WARMUP_STEPS = 2  # the hand loop's warm-up (it has no start-up work to amortise)
SYNC_STEPS_PER_EPOCH = 1  # the synchronous run measures saves, not epochs: short epochs, same saves
ASYNC_STEPS_PER_EPOCH = 2  # the stall figure's background run: epochs just long enough for a save to end
LORA_STEPS_PER_EPOCH = 5  # the lora-step figure's epochs: every training image of the fake CIFAR-100 trees
LORA_EPOCHS = 6  # per side of the lora-step figure: epochs 2..5 are timed (1 warms up, 6 ends in a save)
SAVE_INTERVALS = (1, 2)  # the save-interval figure's points in `make bench`: a background save every N steps
SAVE_INTERVALS_FULL = (1, 2, 5, 10)  # its curve in `make bench-full`
SAVE_INTERVAL_EPOCHS = 4  # per trainer launch of that figure: epochs 2..4 are timed
PEER_WIDTHS = (
    1,
    2,
)  # the peers figure's sizes in `make bench`: diffit_cifar widened (15.3 M, 61 M parameters)
PEER_WIDTHS_FULL = (1, 2, 4)  # and in `make bench-full` (244 M)
LARGEST_WIDTH = 4  # from this width on, the peers' engine and DCP's twin no longer fit in memory together
PEER_REPS = 3  # repetitions of each peer's save and load after a warm-up, in one launch
PEER_LARGEST_REPS = 3  # the same at the largest width (a save there writes ~4 GB), in launches of their own
ZERO_OVERHEAD_ROUNDS = 1  # trainer launches per config of that figure, each run beside a hand-loop launch
ZERO_OVERHEAD_EPOCHS = 4  # per trainer launch of that figure: epochs 2..4 are timed
SCALE_WIDTHS = (1, 2, 4)  # the scale figure: diffit_cifar widened 1, 2, 4 x (15.3 M, 61 M, 244 M
#                           parameters), in one process and on 2 under ZeRO-2
SCALE_REPS = 2  # saves of each kind per size, after a warm-up (a 244 M save writes ~6 GB)
REPS = 5  # repetitions after one warm-up, for everything timed
WRITE_REPS = 10  # for the write figure: a shared disk's speed varies by ±20% from one write to the next
LISTED_RUNS = 1000


@dataclass(frozen=True)
class Setup:
    """How the training sides run: sizes and launch (the defaults fit 2 CPU cores; gpu.md has GPU values)."""

    batch: int = BATCH
    steps: int = STEPS_PER_EPOCH
    epochs: int = EPOCHS
    accelerate_config: str | None = None
    """configs/accelerate/NAME.yaml for the trainer and the hand loop; None: one process, plain python."""
    num_processes: int | None = None
    """accelerate launch --num_processes (overrides the config's)."""
    zero_config: str = "cpu_zero2"
    """The ZeRO-2 config of the runs on 2 processes: the merge, peers, zero-overhead and scale figures'."""
    zero3_config: str = "cpu_zero3"
    """The ZeRO-3 config of the peers and zero-overhead figures' runs on 2 processes."""
    rounds: int = ROUNDS
    """Trainer launches of the overhead figure (``epochs`` each), and as many hand-loop launches."""
    slice_seconds: float = SLICE_SECONDS
    """How long each of the overhead figure's processes runs at a turn."""
    full: bool = False
    """`make bench-full`: every figure at every size, the curves whole; else the headline figures."""

    @property
    def peer_widths(self) -> tuple[int, ...]:
        return PEER_WIDTHS_FULL if self.full else PEER_WIDTHS

    @property
    def save_intervals(self) -> tuple[int, ...]:
        return SAVE_INTERVALS_FULL if self.full else SAVE_INTERVALS

    def zero_configs(self) -> dict[str, str]:
        """The ZeRO configs of the runs on 2 processes, by the stage the figures name."""
        return {"ZeRO-2": self.zero_config, "ZeRO-3": self.zero3_config}

    def describe(self) -> str:
        if self.accelerate_config is None:
            return "one process (python)"
        n = f", {self.num_processes} processes" if self.num_processes else ""
        return f"accelerate launch {self.accelerate_config}{n}"


def widened(width: int) -> list[tuple[str, Any]]:
    """Config overrides that widen diffit_cifar (channels [128, 256, 256], time embedding 512) ``width`` times:
    parameters grow about ``width**2`` times. Width 1 overrides nothing (any model as configured)."""
    if width == 1:
        return []
    return [("model.channels", [128 * width, 256 * width, 256 * width]), ("model.time_dim", 512 * width)]
