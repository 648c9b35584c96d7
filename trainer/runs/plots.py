"""Charts of ``--list-runs --plot``: the monitored metric per epoch, one line per run.

matplotlib is imported here only, and this module only when ``--plot`` is given, so listing stays instant.
A plain ``Figure`` with the Agg canvas is used (no pyplot): no global figure state, no display needed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from trainer.errors import UserError
from trainer.runs.listing import RunSummary, monitored_series
from trainer.storage.atomic import atomic_write


def run_label(row: RunSummary) -> str:
    """``run 003 · lr 0.002 · Digits (10)``: what tells the lines apart."""
    lr = "lr ?" if row.learning_rate is None else f"lr {row.learning_rate:g}"
    return f"run {row.number:03d} · {lr} · {row.dataset or 'dataset ?'}"


def metric_figure(rows: list[RunSummary], title: str = "") -> Figure:
    """A figure with one line per run of ``rows`` that has history; runs without any are left out."""
    series = []
    for row in rows:
        try:
            series.append((row, *monitored_series(Path(row.path))))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue  # a broken run (the table says so) has nothing to draw
    series = [s for s in series if s[2]]
    if not series:
        raise UserError("none of the listed runs has a per-epoch history to plot")
    metrics = sorted({metric for _, metric, _, _ in series})
    figure = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for row, metric, epochs, values in series:
        label = run_label(row) + ("" if len(metrics) == 1 else f" · {metric}")
        axes.plot(epochs, values, marker="o", markersize=3, label=label)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(metrics[0] if len(metrics) == 1 else "monitored metric (" + ", ".join(metrics) + ")")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` as a PNG, replacing ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
