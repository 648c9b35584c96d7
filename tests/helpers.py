"""The one place tests launch the real scripts: plain `python` or `accelerate launch` with N processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

# A smoke-sized run: the tiny model, a few steps per epoch, a 4-step sampler for the grids.
TINY_RUN = [
    "--model", "diffit_tiny",
    "--data", "digits",
    "--batch-size", "32",
    "--learning-rate", "0.002",
    "--max-steps-per-epoch", "3",
    "--set", "warmup_steps=0",
    "--set", "logging.samples_per_class=2",
    "--set", "edm.num_steps=4",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    )
    env.update(extra or {})
    return env


def launch_command(
    script: str,
    args: list[str],
    *,
    accelerate_config: str | None = None,
    launch_args: list[str] = (),  # type: ignore[assignment]
) -> list[str]:
    """`python scripts/<script>` or `accelerate launch --config_file configs/accelerate/<name>.yaml ...`."""
    target = str(REPO / "scripts" / script)
    if accelerate_config is None:
        return [sys.executable, target, *args]
    config = REPO / "configs" / "accelerate" / f"{accelerate_config}.yaml"
    port = [] if "--main_process_port" in launch_args else ["--main_process_port", str(free_port())]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *port, *launch_args,
        target, *args,
    ]  # fmt: skip


def run_script(
    script: str,
    args: list[str],
    *,
    accelerate_config: str | None = None,
    launch_args: list[str] = (),  # type: ignore[assignment]
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    cmd = launch_command(script, args, accelerate_config=accelerate_config, launch_args=launch_args)
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}"
            f"\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def train_base(root: Path, *args: str, accelerate_config: str | None = "cpu_zero2", **kwargs: Any):
    """A tiny base run under ``root`` (2-process ZeRO-2 by default)."""
    return run_script(
        "train_base.py",
        [*TINY_RUN, "--checkpoint-root", str(root), *args],
        accelerate_config=accelerate_config,
        **kwargs,
    )


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def train_lora(root: Path, *args: str, accelerate_config: str | None = "cpu_zero2", **kwargs: Any):
    """A tiny LoRA run on digits 0-4 under ``root``, on the newest completed base run there by default."""
    return run_script(
        "train_lora.py",
        [*TINY_RUN[2:], "--data", "digits_0_4", "--checkpoint-root", str(root), *args],
        accelerate_config=accelerate_config,
        **kwargs,
    )
