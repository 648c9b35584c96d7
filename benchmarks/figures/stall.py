"""stall: how long a save blocks training with ``async_save`` on, over with it off (in steps).

Per save, seconds the loop was blocked (``blocked_seconds`` of each epoch save in the run's
``logs/events.jsonl``, the same number as ``history[i].save_blocked_seconds`` in metadata.json) ÷ one step
(``hand_loop``'s median epoch ÷ its steps), with ``async_save`` on, over the same with it off. A synchronous
save blocks the loop for the whole save, so in that mode the save's duration (``write_seconds``) counts when
the trainer's own figure is smaller. Both runs save every epoch; the async run's epochs (2 steps) are long
enough for a background save to end before the next save, whose wait would count, as it should. (The
overhead figure's trainer runs take turns with other processes, so their wall-clock timings are not used.)
"""

from __future__ import annotations

from benchmarks.harness import Figure, figure, median, spread
from benchmarks.measurements import Measurements
from benchmarks.runs import TrainerRun

TARGET = ("<=", 0.10)
NAME = "checkpoint stall (async / sync, in steps)"


def blocked_per_save(run: TrainerRun) -> tuple[list[float], str]:
    """Seconds the loop was blocked by each epoch save after the first, and a note on where they come from."""
    saves = run.epoch_saves[1:]
    if not saves:
        return [], f"{run.layout.events} records no epoch save after the first"
    blocked = [s.blocked_seconds for s in saves]
    whole = [
        max(s.blocked_seconds, s.write_seconds) if not s.background else s.blocked_seconds for s in saves
    ]
    if whole != blocked:  # a synchronous save blocks the loop for all of it
        return whole, "whole save durations; the trainer's blocked_seconds was smaller"
    return blocked, "blocked_seconds"


def measure(m: Measurements) -> list[Figure]:
    step = m.step_seconds
    sync, sync_note = blocked_per_save(m.sync_run)
    asyn, async_note = blocked_per_save(m.async_run)
    if not sync or not asyn:
        return [figure(TARGET, NAME, None, sync_note if not sync else async_note)]
    sync_steps, async_steps = median(sync) / step, median(asyn) / step
    detail = (
        f"blocked per save: async {spread(asyn)} = {async_steps:.3f} steps, sync {spread(sync)} = "
        f"{sync_steps:.2f} steps (sync: {sync_note}); one step = {step:.3f} s (hand loop)"
    )
    return [figure(TARGET, NAME, async_steps / sync_steps, detail)]
