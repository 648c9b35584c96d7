"""Shared test set-up: CPU DeepSpeed and one thread per process (2-core CI machines)."""

import os

# Must be set before anything imports DeepSpeed (the merge tests compare against its zero_to_fp32).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import subprocess
from pathlib import Path

import pytest

TinyRuns = tuple[Path, dict[str, subprocess.CompletedProcess[str]]]
"""(checkpoint root, {"base": its launch's result, "lora": its launch's result})."""


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """4 epochs × 3 steps straight (2 processes, ZeRO-2), every epoch kept: what the fault and continuation
    suites' runs must end equal to."""
    from tests.helpers import EPOCHS, final_weights, train_base

    root = tmp_path_factory.mktemp("reference")
    train_base(root, *EPOCHS, "--set", "checkpoint.keep_last_n=0")
    run = root / "base_training" / "run_001"
    return {"root": root, "run": run, "weights": final_weights(run)}


@pytest.fixture(scope="session")
def tiny_runs_launched(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    """The launches behind `tiny_runs`, for tests that check what a good run prints."""
    from tests.helpers import train_base, train_lora

    root = tmp_path_factory.mktemp("tiny_runs") / "checkpoints"
    base = train_base(root, "--epochs", "1", accelerate_config=None)
    lora = train_lora(root, "--epochs", "1", "--base-checkpoint", str(root / "base_training" / "run_001"),
                      accelerate_config=None)  # fmt: skip
    return root, {"base": base, "lora": lora}


@pytest.fixture(scope="session")
def tiny_runs(tiny_runs_launched: TinyRuns) -> Path:
    """``<tmp>/checkpoints`` with base run 001 and LoRA run 001 on it (digits 0-4), one process each.

    Shared by every module that only needs finished runs to read; a test that changes files works on a copy.
    """
    return tiny_runs_launched[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the shared tiny runs launches real training processes (the fixture does), so it is
    ``distributed`` whatever its module says."""
    for item in items:
        if "tiny_runs_launched" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.distributed)
