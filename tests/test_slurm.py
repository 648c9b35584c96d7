"""SLURM: ``launch/slurm_train.sh`` under a real single-node SLURM (munged, slurmctld, slurmd; tests/slurm.py).

One batch job trains a tiny 2-process ZeRO-2 base run with ``--auto-resume`` and lives through what a cluster
does to long jobs:
  * attempt 1 is requeued with ``scontrol requeue`` once a checkpoint is committed (SIGTERM to everything,
    srun SIGKILLs the workers: a preemption);
  * attempt 2 is pushed past its time limit: the test lowers the job's limit to 3 minutes while it waits in
    the queue, SLURM sends the batch script SIGUSR1 (``--signal=B:USR1@150``: at once), its trap has the
    workers save a step checkpoint and exit 0 (repeating the signal until they have their stop handler), and
    the script requeues the job itself;
  * attempt 3 (limit raised again) trains to the end and exits 0 without requeueing.
The result must be one run folder, completed, with final weights bit-identical to the uninterrupted run of the
same flags (the session's ``reference`` run, launched directly with ``tests.helpers.train_base``), and the three
attempts in ``metadata.json``.

The job's steps are slowed with ``DIFFIT_FAULTS=delay@step:seconds=...`` (a sleep after each step, so that
the test can act while it trains without burning CPU; it changes no numbers).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.helpers import EPOCHS, REPO, assert_bit_identical, base_argv, child_env, free_port
from tests.slurm import Slurm, private_slurm

pytestmark = pytest.mark.distributed

T = TypeVar("T")

SCRIPT = REPO / "launch" / "slurm_train.sh"
FLAGS = [*EPOCHS, "--set", "checkpoint.keep_last_n=0"]
"""The flags of the `reference` run (conftest.py): 4 epochs x 3 steps, every epoch kept."""
STEP_DELAY = 4  # seconds of sleep after each step of the job, so that it still trains when the signal comes
LEAD = 150  # --signal=B:USR1@LEAD: slurmctld sends it once LEAD + 30 s are left (it checks every 30 s)
SHORT_LIMIT = 3  # minutes, attempt 2: the signal at slurmctld's first check, the hard limit 3 minutes away
LONG_LIMIT = 10  # minutes, attempts 1 and 3: never signalled (due 7 minutes after the start)
BAD_END = {"FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


class Job:
    """The batch job under test: waits that fail fast (with the job's output) if it ends badly."""

    def __init__(self, slurm: Slurm, job_id: str, output: Path, run: Path) -> None:
        self.slurm, self.id, self.output, self.run = slurm, job_id, output, run

    def info(self) -> dict[str, str]:
        return self.slurm.job(self.id)

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def metadata(self) -> dict:
        try:
            return json.loads((self.run / "metadata.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_for(self, what: str, condition: Callable[[], T], timeout: float) -> T:
        def check() -> T:
            state = self.info().get("JobState", "")
            if state in BAD_END:
                raise AssertionError(f"job {self.id} ended {state} while waiting for {what}")
            return condition()

        return self.slurm.wait_for(what, check, timeout)

    def set_time_limit(self, minutes: int) -> None:
        """``scontrol update TimeLimit``, retried while the job is still completing its previous attempt."""
        update = ("scontrol", "update", f"JobId={self.id}", f"TimeLimit={minutes}")
        self.wait_for(
            f"TimeLimit={minutes}", lambda: self.slurm.run(*update, check=False).returncode == 0, 30
        )


def test_requeued_and_time_limited_job_completes_one_run_bit_identically(
    tmp_path: Path, reference: dict
) -> None:
    root = tmp_path / "checkpoints"
    run = root / "base_training" / "run_001"
    output = tmp_path / "job.out"
    started = time.monotonic()
    with private_slurm() as slurm:
        env = child_env({
            "DIFFIT_PYTHON": sys.executable,  # not .venv/bin on PATH: its ninja would rebuild DeepSpeed's op
            "DIFFIT_ACCELERATE_CONFIG": str(REPO / "configs" / "accelerate" / "cpu_zero2.yaml"),
            "DIFFIT_PROCS_PER_NODE": "2",
            "DIFFIT_MAIN_PORT": str(free_port()),
            "DIFFIT_FAULTS": f"delay@step:seconds={STEP_DELAY}",
            "SLURM_CONF": slurm.env["SLURM_CONF"],
        })  # fmt: skip
        job_id = slurm.sbatch(
            "--job-name=diffit-test", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
            f"--time={LONG_LIMIT}", f"--signal=B:USR1@{LEAD}", f"--output={output}", f"--chdir={REPO}",
            str(SCRIPT), *base_argv(root, *FLAGS), env=env,
        )  # fmt: skip
        job = Job(slurm, job_id, output, run)
        try:
            # Attempt 1: requeued by someone else once a checkpoint is committed (a preemption).
            manifests = run / "checkpoints" / "manifests"
            job.wait_for("attempt 1's first checkpoint", lambda: list(manifests.glob("*.json")), 300)
            slurm.run("scontrol", "requeue", job_id)
            requeued_at = time.monotonic()

            # Attempt 2 gets a limit it cannot train within: SIGUSR1 comes at slurmctld's first check after it
            # starts (within 30 s; the workers, still starting up maybe, get it within 10 s of being ready).
            job.wait_for("the requeue", lambda: int(job.info().get("Restarts", 0)) >= 1, 60)
            job.set_time_limit(SHORT_LIMIT)
            job.wait_for("SIGUSR1 before the time limit", lambda: "SIGUSR1 (time limit" in job.log(), 240)
            signalled_at = time.monotonic()
            job.set_time_limit(LONG_LIMIT)  # attempt 3 trains to the end
            job.wait_for("the job's own requeue", lambda: int(job.info().get("Restarts", 0)) >= 2, 240)

            # Attempt 3: completes; the job ends without another requeue.
            job.wait_for("the job to complete", lambda: job.info().get("JobState") == "COMPLETED", 240)
            finished_at = time.monotonic()
        except BaseException:
            print(f"--- job {job_id} output ({output}) ---\n{job.log()}")
            print(f"--- job {job_id} ---\n{job.info()}\n--- metadata.json ---\n{json.dumps(job.metadata())}")
            print(slurm.logs())
            raise
        info, log = job.info(), job.log()
    marks = {"requeued": requeued_at, "SIGUSR1": signalled_at, "completed": finished_at}
    print("job timeline (s):", ", ".join(f"{k} {v - started:.0f}" for k, v in marks.items()))

    assert info["ExitCode"] == "0:0" and info["Restarts"] == "2", info
    starts = re.findall(r"attempt (\d): 1 node\(s\) x 2 process\(es\)", log)
    assert starts == ["1", "2", "3"], log
    assert log.count("SIGUSR1 (time limit near)") == 1, log
    assert log.count("requeueing the job to continue the run") == 1, log
    assert "attempt 3: launch exited with status 0" in log, log

    assert sorted(p.name for p in run.parent.iterdir()) == ["run_001"]
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["status"] == "completed", metadata
    attempts = metadata["attempts"]
    assert [(a["job_id"], a["restart_count"]) for a in attempts] == [(job_id, r) for r in range(3)], attempts
    assert len({a["key"] for a in attempts}) == 1, attempts
    assert "SIGUSR1" in str(attempts[2]["previous_ended"]), attempts  # the time-limit stop saved and said so
    assert_bit_identical(run, reference["weights"])
