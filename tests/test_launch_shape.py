"""A launch not shaped as its config evidently asked, under real ``accelerate launch``: refused with one line
before anything is created, and trained as launched with ``--accept-launch``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, base_argv, child_env, free_port, metadata

pytestmark = pytest.mark.distributed
CORES = len(os.sched_getaffinity(0))


def launch(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(free_port()), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=600)


def errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]


@pytest.mark.skipif(CORES > 4, reason="launches one process more than this machine's cores")
def test_a_gpu_config_on_a_machine_without_gpus_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    result = launch(REPO / "configs/accelerate/multi_gpu_zero2.yaml", "--num_processes", str(CORES + 1),
                    "scripts/train_base.py", *base_argv(root, "--epochs", "1"))  # fmt: skip
    assert result.returncode != 0
    assert errors(result) == [
        f"error: this launch starts {CORES + 1} processes on a machine with {CORES} CPU cores and no GPU, as a "
        "config for GPUs would (num_processes: 8 in multi_gpu_*.yaml); launch with "
        "configs/accelerate/cpu_zero2.yaml (or cpu_zero2_bf16.yaml) here, pass --num_processes to fit the cores, "
        "or --accept-launch to train as launched"
    ], result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr and not root.exists()
    assert "terminate called" not in result.stderr and "SIGABRT" not in result.stderr


def test_one_process_where_several_were_asked_is_refused_unless_accepted(tmp_path: Path) -> None:
    """After `accelerate config default` (use_cpu: true), `--num_processes 2` starts one process."""
    config = tmp_path / "default_config.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\n"
                      "num_machines: 1\nnum_processes: 1\nuse_cpu: true\n")  # fmt: skip
    root = tmp_path / "checkpoints"
    refused = launch(
        config, "--num_processes", "2", "scripts/train_base.py", *base_argv(root, "--epochs", "1")
    )
    assert refused.returncode != 0, refused.stderr[-3000:]  # the launcher's: its process exited 2
    assert errors(refused) == [
        "error: accelerate launch was asked for 2 processes but started 1: its config sets use_cpu: true (as "
        "`accelerate config default` writes), and Accelerate then runs one process. Launch with "
        "configs/accelerate/cpu_zero2.yaml for several processes on the CPU, or pass --accept-launch to train in one"
    ]
    assert 'train_base.py", line' not in refused.stderr and not root.exists()  # the launcher's traceback only

    accepted = launch(config, "--num_processes", "2", "scripts/train_base.py",
                      *base_argv(root, "--epochs", "1", "--accept-launch"))  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "Launch: 1 process on 1 machine, cpu, no DeepSpeed, fp32;" in accepted.stdout
    assert metadata(root / "base_training" / "run_001")["launch"]["processes"] == 1
