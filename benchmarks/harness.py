"""Figures, their targets, medians and how they are shown: the table printed and ``results.md``."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from benchmarks.settings import PEER_LARGEST_REPS, PEER_REPS, REPS, SCALE_REPS

Target = tuple[str, float]
"""(operator, bound) a figure must meet: ``(">=", 0.97)``; operators ``<=``, ``>=`` and ``<``."""


class BenchError(RuntimeError):
    """A launch or measurement that failed; the message says where its log is."""


@dataclass
class Figure:
    name: str
    value: float | None
    """None: not measurable in this run (the note says why)."""
    op: str
    target: float
    unit: str = ""
    detail: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return {
            "<=": self.value <= self.target,
            ">=": self.value >= self.target,
            "<": self.value < self.target,
        }[self.op]

    def row(self) -> list[str]:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]
        value = "n/a" if self.value is None else f"{self.value:.3f}{self.unit}"
        return [self.name, value, f"{self.op} {self.target:.3g}{self.unit}", mark, self.detail]


def figure(target: Target, name: str, value: float | None, detail: str, unit: str = "") -> Figure:
    op, bound = target
    return Figure(name, value, op, bound, unit, detail)


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """``median (min-max, n=N)`` of a list of seconds, for the detail column."""
    return f"{median(values):.3g} s ({min(values):.3g}-{max(values):.3g}, n={len(values)})"


def table(figures: list[Figure]) -> str:
    rows = [
        ["figure", "value", "target", "", "how (medians of the repetitions)"],
        *[f.row() for f in figures],
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 30)
    return "\n".join(lines)


def markdown(figures: list[Figure], context: dict[str, str], notes: list[str] | None = None) -> str:
    out = [
        "# Performance ratios",
        "",
        "Written by `benchmarks/perf.py` (`make bench-full` writes results.md, `make bench` results-headline.md); "
        "what each figure compares is in the docstring of its module in `benchmarks/figures/`. Every figure is "
        "a ratio of two things measured in the same run on the same machine (medians of repetitions after a "
        f"warm-up: {REPS} for most, {PEER_REPS} for the peers, {PEER_LARGEST_REPS} for the peers at the "
        f"largest size, whose 2 -> 1 resume is timed once without a warm-up, {SCALE_REPS} per size for the "
        "scale figures), except the listing time.",
        "",
        *[f"- {k}: {v}" for k, v in context.items()],
        "",
        "| figure | value | target | | how |",
        "|---|---|---|---|---|",
    ]
    out += ["| " + " | ".join(c.replace("|", "/") for c in f.row()) + " |" for f in figures]
    for note in notes or []:
        out += ["", note]
    return "\n".join(out) + "\n"
