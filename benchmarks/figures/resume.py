"""resume: time to the first step when resuming, over when starting fresh (resume / fresh start).

Seconds from ``Popen`` to the end of the first optimizer step (the trainer's test-only fault injection
writes a marker file there and pauses) when resuming the synchronous run's last checkpoint ÷ when starting a
fresh run. Target: 1.2 + the time to read that checkpoint's bytes at the checkpoint write rate of ``write``,
divided by the fresh time.
"""

from __future__ import annotations

import json

from benchmarks.harness import Figure, figure, median, spread
from benchmarks.launching import seconds_to_step
from benchmarks.measurements import Measurements
from benchmarks.settings import REPS

BASE_TARGET = 1.2
"""The target is ``<=`` this plus the checkpoint's load allowance, computed from the run."""


def measure(m: Measurements) -> list[Figure]:
    from trainer.checkpoint.folder import MANIFESTS

    run = m.sync_run
    manifests = sorted((run.layout.checkpoints / MANIFESTS).glob("*.json"))
    newest = json.loads(manifests[-1].read_text())
    step, nbytes = int(newest["global_step"]), sum(f["bytes"] for f in newest["files"].values())
    fresh_cmd = m.command("train_base.py", m.trainer_args(m.work / "fresh", steps=m.setup.steps, epochs=1))
    epochs = int(newest["epoch"]) + 1  # one more epoch than the run has done
    resume_args = ["--checkpoint-root", str(run.path.parent.parent), "--resume", "1", "--epochs", str(epochs)]
    resume_cmd = m.command("train_base.py", resume_args)
    print(f"  {REPS + 1} fresh launches and {REPS + 1} resumes, each to its first step ...", flush=True)
    fresh, resumed = [], []
    for rep in range(REPS + 1):  # alternated; the first of each is the warm-up
        fresh.append(seconds_to_step(fresh_cmd, 1, m.logs / f"fresh_{rep}.log"))
        resumed.append(seconds_to_step(resume_cmd, step + 1, m.logs / f"resume_{rep}.log"))
    fresh, resumed = fresh[1:], resumed[1:]
    ckpt_rates, _, _ = m.write_rates
    load_seconds = nbytes / median(ckpt_rates)
    allowed = BASE_TARGET + load_seconds / median(fresh)
    detail = (
        f"launch to end of first step: resume {spread(resumed)} vs fresh {spread(fresh)}; "
        f"target {BASE_TARGET} + "
        f"{nbytes / 1e6:.0f} MB at the checkpoint write rate ({load_seconds:.2f} s) / fresh = {allowed:.2f}"
    )
    ratio = median(resumed) / median(fresh)
    return [figure(("<=", allowed), "resume latency (resume / fresh start)", ratio, detail)]
