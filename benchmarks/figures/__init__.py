"""The figures of `make bench` and `make bench-full`, one module each, and ``FIGURES``: the registry, in the
order they are measured and printed (``perf.py --only`` picks from its keys); ``HEADLINE``: those `make bench`
measures (`make bench-full` measures them all, each at every size).

A figure module has a docstring that says what the two sides of its ratio are (``perf.py --help`` shows it),
its target(s), and ``measure(m: Measurements) -> list[Figure]``, which takes the launches it needs from
``m`` (``benchmarks/measurements.py``: each made once, shared by the figures). To add a figure, write its
module here and add it to ``FIGURES``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from benchmarks.figures import (
    adapter,
    listing,
    lora_step,
    overhead,
    peers,
    resume,
    save_interval,
    scale,
    stall,
    write,
    zero_overhead,
)
from benchmarks.harness import Figure
from benchmarks.measurements import Measurements

FigureGroup = Callable[[Measurements], list[Figure]]

FIGURES: dict[str, FigureGroup] = {
    "overhead": overhead.measure,
    "zero-overhead": zero_overhead.measure,
    "stall": stall.measure,
    "save-interval": save_interval.measure,
    "write": write.measure,
    "adapter": adapter.measure,
    "lora-step": lora_step.measure,
    "peers": peers.measure,
    "scale": scale.measure,
    "resume": resume.measure,
    "listing": listing.measure,
}

HEADLINE = ("overhead", "zero-overhead", "stall", "save-interval", "write", "peers")


def explain(key: str) -> str:
    """The docstring of figure ``key``'s module."""
    return (sys.modules[FIGURES[key].__module__].__doc__ or "").strip()
