"""What `make bench`'s timed-in-turns figures compute from their launches, on made-up epoch timings."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.figures import lora_step, save_interval
from benchmarks.harness import BenchError
from benchmarks.settings import Setup


def run(stamps: list[float], steps_per_epoch: int = 5, blocked: float = 0.04) -> Any:
    """A trainer run as ``benchmarks/runs.py`` reads it: its epoch lines' times, saves and history."""
    history = [{"global_step": steps_per_epoch * (i + 1)} for i in range(len(stamps))]
    return SimpleNamespace(epoch_stamps=stamps, saves=[SimpleNamespace(blocked_seconds=blocked)] * 3,
                           history=history)  # fmt: skip


def test_save_interval_is_the_cost_over_the_hand_loop_after_the_first_epoch() -> None:
    def timed(
        cost: float,
    ) -> Any:  # epoch 1 (the warm-up) takes 50 s; the timed epochs' median is 10 s x (1 + cost)
        return run([0.0, 50.0, 50.0 + 9 * (1 + cost), 50.0 + 20 * (1 + cost)])

    runs = {n: timed(c) for n, c in ((1, 0.10), (2, 0.03), (5, 0.05), (10, 0.01))}
    m = SimpleNamespace(setup=Setup(), save_intervals=([10.0, 9.0, 11.0], runs))
    (fig,) = save_interval.measure(m)  # type: ignore[arg-type]
    assert fig.value == pytest.approx(0.03) and fig.passed
    assert "every 1: +10.0%" in fig.detail and "within 3.5% at every 2, 10 steps" in fig.detail


def test_lora_step_times_the_epochs_between_the_first_and_the_last() -> None:
    lora = run([0.0, 30.0, 36.0, 43.0, 51.0, 90.0])  # epoch 1 warms up, epoch 6 ends in a save
    base = run([0.0, 30.0, 39.0, 49.0, 60.0, 99.0])
    (fig,) = lora_step.measure(SimpleNamespace(setup=Setup(), lora_and_base_steps=(lora, base)))  # type: ignore[arg-type]
    assert fig.value == pytest.approx(0.7) and fig.passed
    with pytest.raises(BenchError, match="differ in steps"):
        lora_step.measure(
            SimpleNamespace(setup=Setup(), lora_and_base_steps=(lora, run(base.epoch_stamps, 6)))
        )  # type: ignore[arg-type]
