"""scale: the trainer's save costs at three model sizes, each over what bounds it (worst size shown).

diffit_cifar widened 1, 2 and 4 times (15.3 M, 61 M, 244 M parameters; 0.37, 1.5 and 5.9 GB checkpoints),
in one process and on 2 processes under ZeRO-2 (``benchmarks/scale_timings.py``, ``SCALE_REPS`` of each
after a warm-up, one launch per size):

- snapshot: training blocked per background save ÷ copying the same bytes in memory (the floor of a host
  snapshot: a memcpy of ``staged_bytes`` in 256 MB blocks, in the same process);
- write efficiency: a synchronous save's bytes/s ÷ one plain fsynced file's (as the write figure);
- memory: a training process's peak resident memory across its background saves ÷ (its peak while
  training without saves + its snapshot's bytes): above 1, the save holds memory it does not account for.

Each figure's value is its worst size; the detail gives every size, and ``notes`` (results.md) a table of
the seconds against the bytes, also plotted to docs/bench_scaling.png: each cost should grow linearly.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import Figure, figure, median
from benchmarks.measurements import Measurements
from benchmarks.settings import SCALE_WIDTHS

SNAPSHOT = ("<=", 2.0)
WRITE = (">=", 0.9)
MEMORY = ("<=", 1.1)


def warm(values: list[float]) -> list[float]:
    return values[1:] if len(values) > 1 else values


def per_size(m: Measurements, config: str | None) -> list[dict[str, Any]]:
    """One row per size: parameters, bytes and seconds of each cost, and the ratios (worst rank's)."""
    rows = []
    for width in SCALE_WIDTHS:
        run = m.scale_run(width, config)
        ranks, main = run["ranks"], run["ranks"][0]
        times = main["times"]
        write_rate = median([b / s for b, s in zip(times["write"]["bytes"], times["write"]["seconds"])])
        nbytes = median(times["write"]["bytes"])
        row = {
            "parameters": main["parameters"], "checkpoint_bytes": nbytes, "staged_bytes": main["staged_bytes"],
            "blocked": median(warm(times["blocked"]["ours"])),
            "memcpy": max(median(warm(r["times"]["memcpy"]["seconds"])) for r in ranks),
            "write": nbytes / write_rate, "plain": median(times["plain"]["seconds"]),
            "memory": max(r["rss_saving"] / (r["rss_training"] + r["staged_bytes"]) for r in ranks),
            "rss": [(r["rss_training"], r["staged_bytes"], r["rss_saving"]) for r in ranks],
        }  # fmt: skip
        row["snapshot"] = row["blocked"] / row["memcpy"]
        row["efficiency"] = row["plain"] / row["write"]
        rows.append(row)
    return rows


def size(row: dict[str, Any]) -> str:
    return f"{row['parameters'] / 1e6:.0f}M"


def worst(target: tuple[str, float], name: str, rows: list[dict[str, Any]], key: str, show: Any) -> Figure:
    values = [row[key] for row in rows]
    value = min(values) if target[0] == ">=" else max(values)
    return figure(target, name, value, "; ".join(f"{size(row)}: {show(row)}" for row in rows))


def figures_of(where: str, rows: list[dict[str, Any]]) -> list[Figure]:
    mb = 1e6
    figures = [
        worst(SNAPSHOT, f"snapshot blocked / memcpy, {where}", rows, "snapshot",
              lambda r: f"{r['blocked']:.3g} s / {r['memcpy']:.3g} s ({r['staged_bytes'] / mb:.0f} MB)"),
        worst(WRITE, f"write efficiency by size, {where}", rows, "efficiency",
              lambda r: f"{r['checkpoint_bytes'] / mb / r['write']:.0f} vs {r['checkpoint_bytes'] / mb / r['plain']:.0f} "
              f"MB/s ({r['checkpoint_bytes'] / mb:.0f} MB)"),
        worst(MEMORY, f"peak RSS across saves / (training RSS + snapshot), {where}", rows, "memory",
              lambda r: ", ".join(f"{s / mb:.0f} / ({t / mb:.0f} + {b / mb:.0f}) MB" for t, b, s in r["rss"])),
    ]  # fmt: skip
    return figures


def table(where: str, rows: list[dict[str, Any]]) -> str:
    """The costs against the state's size, as a markdown table."""
    head = "| parameters | checkpoint | snapshot | blocked | memcpy | sync save | plain file |"
    lines = [f"### Scaling, {where}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [size(r), f"{r['checkpoint_bytes'] / 1e9:.2f} GB", f"{r['staged_bytes'] / 1e9:.2f} GB",
                 f"{r['blocked']:.3f} s", f"{r['memcpy']:.3f} s", f"{r['write']:.2f} s", f"{r['plain']:.2f} s"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure(m: Measurements) -> list[Figure]:
    figures, scaling = [], {}
    for config in (None, m.setup.zero_config):
        where = "2 proc ZeRO-2" if config else "1 proc"
        scaling[where] = rows = per_size(m, config)
        figures += figures_of(where, rows)
        m.notes.append(table(where, rows))
    m.plots["bench_scaling.png"] = plot(scaling, m.work / "bench_scaling.png")
    return figures


def plot(scaling: dict[str, list[dict[str, Any]]], path: Any) -> Any:
    """Seconds of each cost against the checkpoint's bytes, a panel per setup (log-log: a line of slope 1 is
    linear growth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = {"blocked": "background save: blocked", "memcpy": "memcpy of the snapshot", "write": "synchronous save",
             "plain": "plain fsynced file"}  # fmt: skip
    fig, axes = plt.subplots(1, len(scaling), figsize=(6 * len(scaling), 4.5), squeeze=False)
    for ax, (where, rows) in zip(axes[0], scaling.items()):
        gb = [r["checkpoint_bytes"] / 1e9 for r in rows]
        for key, label in costs.items():
            if key in rows[0]:
                ax.plot(gb, [r[key] for r in rows], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="checkpoint size (GB)", ylabel="seconds", title=where)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
