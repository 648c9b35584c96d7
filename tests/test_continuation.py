"""Runs that continue by themselves, under real 2-process DeepSpeed launches: one command line for every
attempt of a job (``--auto-resume``), torch elastic restarts, the run lock, time-based saves, and what a
launch does when its launcher is killed or signalled.

The reference is the session's `reference` run (conftest.py): 4 epochs x 3 steps straight, 2 processes,
ZeRO-2.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import (
    EPOCHS,
    REPO,
    assert_all_committed_intact,
    assert_bit_identical,
    base_argv,
    child_env,
    launch_command,
    metadata,
    power_cut_at,
    power_off,
    run_cli,
    train_base,
)

pytestmark = pytest.mark.distributed
RUN = Path("base_training") / "run_001"


def saves(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "events.jsonl").read_text().splitlines()]


def test_one_command_line_serves_every_attempt_of_a_job(reference: dict, tmp_path: Path) -> None:
    """Three attempts of the same command (killed twice: kill -9 of everything) make one run, bit-identical
    to an uninterrupted one; saves every few seconds of wall clock happen on the way; a fourth attempt finds
    the run completed and trains nothing."""
    root, run = tmp_path / "checkpoints", tmp_path / "checkpoints" / RUN
    job = [
        *EPOCHS,
        "--auto-resume",
        "--run-key",
        "sweep-7/lr-0.002",
        "--set",
        "checkpoint.save_every_n_minutes=0.005",
    ]
    for cut in ("pause@step:step=5", "pause@step:step=10"):
        assert power_cut_at(root, f"delay@step:seconds=0.2;{cut}", job)  # 0.2 s steps: the clock saves
        assert_all_committed_intact(run)
        listed = json.loads(run_cli("base", ["--list-runs", "--json", "--checkpoint-root", str(root)]).stdout)
        assert [(r["epochs_total"], r["status"]) for r in listed] == [(4, "died")]  # a killed run: N/4
    last = train_base(root, *job)
    assert "took over the lock of run run_001 from a launch that is gone" in last.stderr
    assert sorted(p.name for p in (root / "base_training").iterdir()) == ["run_001"]
    assert_bit_identical(run, reference["weights"])
    meta = metadata(run)
    assert meta["status"] == "completed" and meta["run_key"] == "sweep-7/lr-0.002"
    assert [a["attempt"] for a in meta["attempts"]] == [1, 2, 3]
    assert [a["previous_ended"] for a in meta["attempts"][1:]] == [
        "killed or lost (it never recorded an end)"
    ] * 2
    timed = [s["tag"] for s in saves(run) if s["tag"].startswith("step_")]  # save_every_n_steps is off
    assert timed, "no save on the clock"

    again = run_cli("base", base_argv(root, *job))  # in this process: the decision comes before training
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Run 001 of job 'sweep-7/lr-0.002' has completed: nothing to train" in again.stdout
    assert len(metadata(run)["attempts"]) == 3 and not list((root / "base_training").glob("run_002"))


def test_torch_elastic_restarts_continue_the_run(reference: dict, tmp_path: Path) -> None:
    """``accelerate launch --max_restarts 2 ... --auto-resume`` with a worker dying in the first two
    attempts: one run, completed, bit-identical."""
    root = tmp_path / "checkpoints"
    dies = "exit@step:step=4:rank=1:restart=0;exit@step:step=8:rank=1:restart=1"
    result = train_base(root, *EPOCHS, "--auto-resume", launch_args=["--max_restarts", "2"],
                        env={"DIFFIT_FAULTS": dies})  # fmt: skip
    run = root / RUN
    assert result.returncode == 0
    assert sorted(p.name for p in (root / "base_training").iterdir()) == ["run_001"]
    meta = metadata(run)
    assert meta["status"] == "completed" and [a["restart_count"] for a in meta["attempts"]] == [0, 1, 2]
    assert_bit_identical(run, reference["weights"])


def test_a_second_launch_is_refused_and_a_killed_launcher_stops_its_workers(
    reference: dict, tmp_path: Path
) -> None:
    """While a run trains, a launch that would resume it is refused before it touches anything; the run goes
    on undisturbed. Then its launcher is SIGKILLed alone: its workers save, stop as interrupted, and the
    resume is bit-identical."""
    root, run = tmp_path / "checkpoints", tmp_path / "checkpoints" / RUN
    cmd = launch_command("train_base.py", base_argv(root, *EPOCHS), accelerate_config="cpu_zero2")
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        # 2 s steps: the 9 steps after epoch 1 outlast the refused launch and the kill, even on a busy machine
        first = subprocess.Popen(cmd, env=child_env({"DIFFIT_FAULTS": "delay@step:seconds=2"}), stdout=out,
                                 stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "manifests" / "epoch_001.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        second = run_cli("base", base_argv(root, *EPOCHS, "--resume", "1"))  # in this process: refused early
        assert second.returncode == 2 and "is being trained by another launch (process" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGKILL)  # the launcher alone: its workers are in sessions of their own
        killed = time.monotonic()
        while any(f"{root}" in p for p in _cmdlines()):
            assert time.monotonic() - killed < 60, "the workers outlived their launcher"
            time.sleep(0.2)
    finally:
        power_off(first, root)
    meta = metadata(run)
    assert meta["status"] == "interrupted"
    assert [e["signal"] for e in meta["events"] if e["kind"] == "interrupted"] == ["the launcher's death"]
    train_base(root, *EPOCHS, "--resume", "1")
    assert_bit_identical(run, reference["weights"])


def _cmdlines() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found.append((proc / "cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                continue
    return found


def test_sigterm_to_the_launcher_saves_and_marks_the_run_interrupted(tmp_path: Path) -> None:
    """What SLURM and Kubernetes do at preemption: SIGTERM to the launcher. It forwards the signal, the
    workers save and exit 0, and the launcher itself then exits 128 + SIGTERM = 143 (Accelerate 1.16; earlier
    releases let torch elastic's SignalException end it with 1 and a traceback; docs/runs-and-checkpoints.md says so).
    A job's command line (``--auto-resume``) is what continues it, and the advice says so."""
    root, run = tmp_path / "checkpoints", tmp_path / "checkpoints" / RUN
    job = [*EPOCHS, "--auto-resume", "--run-key", "preempted-job"]
    cmd = launch_command("train_base.py", base_argv(root, *job), accelerate_config="cpu_zero2")
    launcher = subprocess.Popen(cmd, env=child_env({"DIFFIT_FAULTS": "delay@step:seconds=0.5"}),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "manifests" / "epoch_001.json").exists():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode in (128 + signal.SIGTERM, 1), out[-3000:]  # after the workers' exit 0
    assert "saved a resumable checkpoint and is marked interrupted" in out
    assert "continue it with the same command (--auto-resume)" in out and "--resume 1" not in out
    assert metadata(run)["status"] == "interrupted"
    assert assert_all_committed_intact(run)[-1].startswith("step_")


def test_ctrl_c_while_the_sample_grid_is_drawn_stops_within_seconds(tmp_path: Path) -> None:
    """Ctrl-C reaches the launcher, which forwards it to the workers, while rank 0 draws epoch 1's grid (a
    sampler of thousands of steps: a minute here). The drawing stops between two model calls: the run is
    interrupted at its committed epoch checkpoint, its lock released, within seconds, not after the launcher's
    grace period."""
    root, run = tmp_path / "checkpoints", tmp_path / "checkpoints" / RUN
    args = base_argv(
        root, "--epochs", "2", "--set", "edm.num_steps=5000", "--set", "logging.sample_every_n_epochs=1"
    )
    launcher = subprocess.Popen(launch_command("train_base.py", args, accelerate_config="cpu_zero2"), env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)  # fmt: skip
    assert launcher.stdout is not None
    lines = []
    for line in launcher.stdout:  # the epoch's line comes after its checkpoint, right before the grid
        lines.append(line)
        if line.startswith("Epoch 1/2: train_loss="):
            break
    time.sleep(2)  # well inside the drawing
    launcher.send_signal(signal.SIGINT)
    sent = time.monotonic()
    out, _ = launcher.communicate(timeout=120)
    waited = time.monotonic() - sent
    out = "".join(lines) + out
    assert waited < 20, f"{waited:.0f} s:\n{out[-3000:]}"
    assert "Sample grid of epoch 1 left for the resume to draw: SIGINT came" in out, out[-3000:]
    assert out.count("Received SIGINT: saving") == 1, out[-3000:]  # every worker got it; rank 0 says so
    assert metadata(run)["status"] == "interrupted" and not (run / "run.lock").exists()
    assert assert_all_committed_intact(run) == ["epoch_001"]
    assert not (run / "logs" / "samples" / "epoch_001.png").exists()


def test_ctrl_c_during_start_up_says_one_line_and_creates_nothing(tmp_path: Path) -> None:
    """Ctrl-C reaches the launcher 1.5 s after its workers started, while they import and build the launch
    (several seconds here): one line from rank 0, no traceback from any rank, no run folder."""
    root = tmp_path / "checkpoints"
    command = launch_command("train_base.py", base_argv(root, "--epochs", "1"), accelerate_config="cpu_zero2")
    launcher = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=REPO)  # fmt: skip
    deadline, launched = time.monotonic() + 60, psutil.Process(launcher.pid)
    while time.monotonic() < deadline and len(launched.children(recursive=True)) < 2:
        time.sleep(0.1)
    time.sleep(1.5)
    launcher.send_signal(signal.SIGINT)
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, out[-3000:]
    assert out.count("Interrupted (Ctrl-C) before training began: nothing to continue") == 1, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert not root.exists()


def test_a_stop_signal_during_validation_ends_it_between_batches(reference: dict, tmp_path: Path) -> None:
    """Rank 1 gets SIGTERM before epoch 2's second validation batch (of 6): both ranks leave validation there
    (a third batch would end the launch with code 9), the moment is committed as a step checkpoint at the
    epoch's last step, and the resume validates epoch 2 again and ends bit-identical to the reference."""
    root, run = tmp_path / "checkpoints", tmp_path / "checkpoints" / RUN
    faults = "signal@validation:epoch=2:batch=2:rank=1;exit@validation:epoch=2:batch=3"
    result = train_base(root, *EPOCHS, env={"DIFFIT_FAULTS": faults})
    assert "Validation of epoch 2 left for the resume: SIGTERM came" in result.stdout, result.stdout[-3000:]
    assert "Interrupted (stopped by SIGTERM at step 6)" in result.stdout
    assert metadata(run)["status"] == "interrupted" and not (run / "run.lock").exists()
    assert assert_all_committed_intact(run) == ["epoch_001", "step_0000006"]
    assert [e["epoch"] for e in metadata(run)["history"]] == [1]

    resumed = train_base(root, *EPOCHS, "--resume", "1")
    assert "Resuming run 001 from step 6 (epoch 2, step 3 of the epoch)" in resumed.stdout, resumed.stdout[
        -3000:
    ]
    assert_bit_identical(run, reference["weights"])
