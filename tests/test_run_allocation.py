"""Run numbers under real launches: a sweep started at once, and two machines sharing one checkpoint folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    TINY_RUN,
    child_env,
    free_port,
    launch_command,
    machine_command,
    run_cli,
    worker_output,
)
from trainer.checkpoint.manifest import read_manifests

pytestmark = pytest.mark.distributed


def test_four_simultaneous_launches_get_four_distinct_runs(tmp_path: Path) -> None:
    """A sweep of 4 learning rates started at the same moment: 4 runs, none sharing a folder."""
    rates = ["0.001", "0.002", "0.003", "0.004"]
    procs = [
        subprocess.Popen(
            launch_command(
                "train_base.py",
                [
                    *TINY_RUN,
                    "--checkpoint-root",
                    str(tmp_path),
                    "--epochs",
                    "1",
                    "--max-steps-per-epoch",
                    "1",
                    "--learning-rate",
                    lr,
                    "--set",
                    "logging.sample_every_n_epochs=0",
                ],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(),
            cwd=REPO,
        )
        for lr in rates
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    runs = sorted((tmp_path / "base_training").glob("run_*"))
    assert [r.name for r in runs] == ["run_001", "run_002", "run_003", "run_004"]
    seen = sorted(json.loads((r / "config.json").read_text())["learning_rate"] for r in runs)
    assert seen == sorted(float(lr) for lr in rates)  # every launch wrote its own folder, none twice
    for run in runs:
        meta = json.loads((run / "metadata.json").read_text())
        assert meta["status"] == "completed" and meta["run_number"] == int(run.name[4:])


def _two_machines(root: Path, *args: str) -> list[str]:
    """Two launchers on loopback, one process each, as two machines sharing ``root``: what each machine's
    worker printed. The launchers' own logs are left out: torch elastic may log a lost connection when
    machine 1's launcher waits at its exit barrier after machine 0's, which hosts the store, has left."""
    port = free_port()
    procs, logs = [], []
    for machine in (0, 1):
        logs.append(root.parent / f"{root.name}-logs" / f"machine{machine}-{port}")
        cmd = machine_command("train_base.py", [*TINY_RUN, "--checkpoint-root", str(root), *args], machine=machine,
                              port=port, worker_logs=logs[-1])  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=REPO
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(outputs)
    return [worker_output(log) for log in logs]


def test_two_machines_agree_on_the_run_and_only_global_rank0_writes(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    first = _two_machines(root, "--epochs", "1")
    resumed = _two_machines(root, "--resume", "--epochs", "2")
    runs = sorted((root / "base_training").glob("run_*"))
    assert [r.name for r in runs] == ["run_001"]  # both machines used the one run rank 0 allocated
    meta = json.loads((runs[0] / "metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["distributed"] == "deepspeed-zero2"
    assert meta["status"] == "completed" and meta["epochs_completed"] == 2 and len(meta["resumes"]) == 1
    # Machine 1 (global rank 1) prints nothing of the run: it neither allocates nor writes.
    for out in (first[1], resumed[1]):
        assert "Saved" not in out and "run 001" not in out and "error" not in out.lower()
    assert "Saved" in first[0] and "Resuming run 001 from epoch 1" in resumed[0]
    # Both machines wrote their part of every tensor file, into the one shared folder.
    files = read_manifests(runs[0] / "checkpoints")[-1].files
    assert [part["rank"] for part in files["epoch_002.ckpt"]["parts"]] == [0, 1]
    assert (runs[0] / "checkpoints" / "state" / "epoch_002" / "rng_rank1.pt").is_file()


def test_two_launches_of_one_job_started_together_make_one_run_and_one_refusal(tmp_path: Path) -> None:
    """``--auto-resume --run-key jobA`` twice at the same moment (steps slowed so that the launches overlap):
    one of them makes and trains the job's run, the other stops with one line; the next attempt finds the
    run completed."""
    job = [*TINY_RUN, "--checkpoint-root", str(tmp_path), "--epochs", "1", "--auto-resume", "--run-key", "jobA",
           "--set", "logging.sample_every_n_epochs=0"]  # fmt: skip
    env = child_env({"DIFFIT_FAULTS": "delay@step:seconds=2"})
    command = launch_command("train_base.py", job)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env, "cwd": REPO}
    procs = [subprocess.Popen(command, **pipes) for _ in range(2)]  # type: ignore[call-overload]
    outputs = [p.communicate(timeout=600) for p in procs]
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert refused.count("error:") == 1 and "Traceback" not in refused, refused
    assert "job 'jobA'" in refused or "being trained by another launch" in refused, refused
    assert [r.name for r in (tmp_path / "base_training").glob("run_*")] == ["run_001"]
    again = subprocess.run(launch_command("train_base.py", job), capture_output=True, text=True, env=child_env(),
                           cwd=REPO, timeout=600)  # fmt: skip
    assert again.returncode == 0 and "has completed: nothing to train" in again.stdout, again.stderr[-2000:]


def test_a_launch_of_a_job_whose_run_is_being_created_is_refused(tmp_path: Path) -> None:
    """The job's key held by another live launch (a Python process holding its lock) while no run exists yet:
    refused in one line, nothing created."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from trainer.runs.lock import JobLock; "
         f"root = Path({str(tmp_path / 'base_training')!r}); root.mkdir(parents=True); "
         "JobLock(root, 'jobA').acquire('test'); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env(),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        args = [*TINY_RUN, "--checkpoint-root", str(tmp_path), "--auto-resume", "--run-key", "jobA"]
        result = run_cli("base", args)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2 and result.stderr.count("error:") == 1, result.stderr
    assert "another launch of job 'jobA'" in result.stderr and "Run the same command again" in result.stderr
    assert not list((tmp_path / "base_training").glob("run_*"))
