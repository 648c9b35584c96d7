"""Shared test set-up: CPU DeepSpeed and one thread per process (2-core CI machines), and the expensive runs
that many tests read, launched once per test session even when pytest-xdist runs the tests in workers."""

import os

# Must be set before anything imports DeepSpeed (the merge tests compare against its zero_to_fp32).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from filelock import FileLock

TinyRuns = tuple[Path, dict[str, subprocess.CompletedProcess[str]]]
"""(checkpoint root, {"base": its launch's result, "lora": its launch's result})."""

T = TypeVar("T")


def once_per_session(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None],
                     load: Callable[[Path], T]) -> T:  # fmt: skip
    """``make(folder)`` once for the whole session, then ``load(folder)`` in every process that asks.

    Under pytest-xdist each worker has its own session fixtures; the first worker to ask builds ``folder``
    (beside the workers' temporary folders) while the others wait on its lock, so a launch shared by tests
    in several workers still runs once. A folder left by a build that failed is built again.
    """
    shared = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder every worker's basetemp lies in
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return load(folder)


def reference_run(tmp_path_factory: pytest.TempPathFactory, accelerate_config: str) -> dict:
    """4 epochs × 3 steps straight (2 processes under ``accelerate_config``), every epoch kept, launched once
    per session: ``{"root", "run", "weights"}`` (the final model file's weights and EMA)."""
    from tests.helpers import EPOCHS, final_weights, train_base

    def load(root: Path) -> dict:
        run = root / "base_training" / "run_001"
        return {"root": root, "run": run, "weights": final_weights(run)}

    def make(root: Path) -> None:
        train_base(root, *EPOCHS, "--set", "checkpoint.keep_last_n=0", accelerate_config=accelerate_config)

    return once_per_session(tmp_path_factory, f"reference_{accelerate_config}", make, load)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The run (ZeRO-2, fp32) the fault and continuation suites' runs must end equal to. Tests read it or copy
    it; none changes it."""
    return reference_run(tmp_path_factory, "cpu_zero2")


@pytest.fixture(scope="session")
def bf16_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``reference`` in bf16 (``cpu_zero2_bf16``): the precision of every GPU config."""
    return reference_run(tmp_path_factory, "cpu_zero2_bf16")


@pytest.fixture(scope="session")
def tiny_runs_launched(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    """The launches behind `tiny_runs`, for tests that check what a good run prints."""
    from tests.helpers import train_base, train_lora

    def load(folder: Path) -> TinyRuns:
        results = json.loads((folder / "launches.json").read_text())
        return folder / "checkpoints", {k: subprocess.CompletedProcess(*v) for k, v in results.items()}

    def make(folder: Path) -> None:
        root = folder / "checkpoints"
        base = train_base(root, "--epochs", "1", accelerate_config=None)
        lora = train_lora(root, "--epochs", "1", "--base-checkpoint", str(root / "base_training" / "run_001"),
                          accelerate_config=None)  # fmt: skip
        saved = {
            k: [r.args, r.returncode, r.stdout, r.stderr] for k, r in {"base": base, "lora": lora}.items()
        }
        (folder / "launches.json").write_text(json.dumps(saved))

    return once_per_session(tmp_path_factory, "tiny_runs", make, load)


@pytest.fixture(scope="session")
def tiny_runs(tiny_runs_launched: TinyRuns) -> Path:
    """``<tmp>/checkpoints`` with base run 001 and LoRA run 001 on it (digits 0-4), one process each.

    Shared by every module that only needs finished runs to read; a test that changes files works on a copy.
    """
    return tiny_runs_launched[0]


SLOWEST_FIRST = (
    "test_faults.py",  # 13 min (wall time in one worker of `make test` on a slow 2-core day); launches `reference`
    "test_lora.py",  # 11 min; launches the shared tiny runs meanwhile
    "test_continuation.py",  # 10 min
    "test_preemption.py",  # 10 min
    "test_power_cuts.py",  # 6 min
    "test_run_allocation.py",  # 5 min
    "test_slurm.py",  # 5 min, mostly waiting for the scheduler and the job's time limit
    "test_base_training.py",  # 4 min
    "test_around_runs.py",  # 4 min
    "test_going_back.py",  # 3 min
    "test_bad_input.py",  # 2 min
)
"""Test modules in the order the workers take them: the longest first, so that no long module is left to
run alone at the end (pytest-xdist hands whole modules to workers in collection order). The others follow
in collection order."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules in `SLOWEST_FIRST` order. A test that needs the shared tiny runs launches real training
    processes (the fixture does), so it is ``distributed`` whatever its module says."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its order
    for item in items:
        if "tiny_runs_launched" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.distributed)
