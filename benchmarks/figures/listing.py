"""listing: ``--list-runs`` over 1,000 runs, in seconds (the one figure that is not a ratio).

``scripts/train_base.py --list-runs`` over 1,000 synthetic runs (metadata.json as the trainer writes it, 20
epochs of history each), whole command including interpreter start-up; bounded by reading metadata. The
detail says how much of it is interpreter start-up and imports (the same command on an empty root).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import BenchError, Figure, figure, median, spread
from benchmarks.launching import bench_env
from benchmarks.measurements import Measurements
from benchmarks.settings import LISTED_RUNS, MODEL, REPO, REPS

TARGET = ("<", 1.0)


def write_synthetic_runs(root: Path, count: int) -> None:
    """``count`` finished runs whose metadata.json looks like the trainer's after 20 epochs."""
    from trainer.runs.layout import RunLayout
    from trainer.runs.metadata import new_metadata

    for number in range(1, count + 1):
        meta = new_metadata(number=number, kind="base", experiment=f"sweep_{number % 7}", dataset="CIFAR-10",
                            num_classes=10, world_size=8, distributed="deepspeed-zero2")  # fmt: skip
        history = [
            {"epoch": e, "train_loss": 1 / e + number * 1e-6, "val_loss": 1.1 / e, "lr": 2e-4, "seconds": 61.2,
             "images_per_sec": 817.3, "checkpoint": f"epoch_{e:03d}.ckpt", "save_blocked_seconds": 0.05}
            for e in range(1, 21)
        ]  # fmt: skip
        meta.update(status="completed", epochs_total=20, epochs_completed=20, global_step=7800, history=history,
                    best={"epoch": 20, "metric": "val_loss", "value": 0.055, "mode": "min"}, checkpoints=[18, 19, 20],
                    config_summary={"learning_rate": 2e-4, "batch_size": 128, "model": MODEL, "seed": number})  # fmt: skip
        layout = RunLayout.of(root, "base", number)
        layout.path.mkdir(parents=True)
        layout.metadata.write_text(json.dumps(meta, indent=2))


def list_runs_seconds(root: Path, *, expect: int) -> float:
    """Seconds of ``train_base.py --list-runs --checkpoint-root root``, which must list ``expect`` runs."""
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train_base.py"),
        "--list-runs",
        "--checkpoint-root",
        str(root),
    ]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=bench_env(), cwd=REPO, check=True).stdout
    seconds = time.perf_counter() - start
    if out.count("completed") < expect:
        raise BenchError(f"--list-runs printed {out.count('completed')} completed runs, not {expect}")
    return seconds


def measure(m: Measurements) -> list[Figure]:
    root = m.work / "listing"
    write_synthetic_runs(root, LISTED_RUNS)
    times = [list_runs_seconds(root, expect=LISTED_RUNS) for _ in range(REPS + 1)][1:]
    startup = [list_runs_seconds(m.work / "empty", expect=0) for _ in range(REPS + 1)][1:]
    value = median(times) * 1000 / LISTED_RUNS
    detail = (
        f"whole command {spread(times)} for {LISTED_RUNS} runs; "
        f"of which interpreter and imports (empty root) {spread(startup)}"
    )
    return [figure(TARGET, "listing (s per 1,000 runs)", value, detail, unit=" s")]
