"""Fault injection: damaged files, a run written before the checkpoint package, and a full disk
(preemption, a dying machine and a change of process count are tests/test_preemption.py's, power cuts
tests/test_power_cuts.py's).

Every case runs the real `accelerate launch` with 2 processes and DeepSpeed on the CPU, breaks the run the
way the real fault would, resumes it with the ordinary command, and compares the result with one
uninterrupted reference run of the same seed:
  * bit-flipped ``last.ckpt``, truncated shard, deleted shard: fallback to the newest intact epoch,
    bit-identical; nothing intact at all: a loud restart from scratch, bit-identical;
  * ENOSPC while saving: previous checkpoints intact, partial files gone; ``continue`` trains on (bit-identical),
    ``fail`` stops as failed and resumes (bit-identical).
Faults are placed with ``DIFFIT_FAULTS`` (``trainer/faults.py``), which pauses a process at a named point so
the test can cut the power exactly there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    EPOCHS,
    assert_all_committed_intact,
    assert_bit_identical,
    assert_same_tensors,
    base_argv,
    events,
    load_ckpt,
    metadata,
    old_run,
    run_cli,
    train_base,
)

pytestmark = pytest.mark.distributed


# --------------------------------------------------------------------------------------------------
# Damaged files
# --------------------------------------------------------------------------------------------------


def copy_run(reference: dict, tmp_path: Path) -> Path:
    root = tmp_path / "checkpoints"
    subprocess.run(["cp", "-a", str(reference["root"]), str(root)], check=True)  # -a keeps the hard links
    return root / "base_training" / "run_001"


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_checkpoints_fall_back_to_the_newest_intact_epoch(reference: dict, tmp_path: Path) -> None:
    run = copy_run(reference, tmp_path)
    ckpts = run / "checkpoints"
    flip_byte(ckpts / "last.ckpt", (ckpts / "last.ckpt").stat().st_size // 2)  # = epoch_004.ckpt (hard link)
    moments = ckpts / "state" / "epoch_003" / "optimizer.safetensors"
    half = moments.stat().st_size // 2
    os.truncate(moments, half)
    (ckpts / "state" / "epoch_002" / "rng_rank1.pt").unlink()

    result = train_base(run.parent.parent, *EPOCHS, "--resume", "1")

    for tag, reason in (
        ("epoch_004", "does not match the checksum"),
        ("epoch_003", "bytes"),
        ("epoch_002", "is missing"),
    ):
        assert f"checkpoint {tag} of run 001 is damaged" in result.stderr
        assert (run / "damaged" / tag).is_dir()
        assert any(e["tag"] == tag and reason in e["reason"] for e in events(run, "fallback"))
    assert "Resuming run 001 from epoch 1" in result.stdout
    assert_bit_identical(run, reference["weights"])
    # The damaged files are kept for inspection, with their damage.
    kept = run / "damaged" / "epoch_003" / "state__epoch_003" / "optimizer.safetensors"
    assert kept.stat().st_size == half
    assert os.path.samefile(ckpts / "last.ckpt", ckpts / "epoch_004.ckpt")
    assert assert_all_committed_intact(run) == ["epoch_001", "epoch_002", "epoch_003", "epoch_004"]


def test_no_intact_checkpoint_restarts_from_scratch_loudly_and_keeps_the_damage(
    reference: dict, tmp_path: Path
) -> None:
    run = copy_run(reference, tmp_path)
    for epoch in range(1, 5):
        flip_byte(run / "checkpoints" / f"epoch_{epoch:03d}.ckpt", 100)

    result = train_base(run.parent.parent, *EPOCHS, "--resume", "1")

    assert "TRAINING STARTS OVER FROM SCRATCH" in result.stderr
    assert sorted(p.name for p in (run / "damaged").iterdir()) == [f"epoch_{e:03d}" for e in range(1, 5)]
    assert len(events(run, "restart_from_scratch")) == 1
    assert_bit_identical(run, reference["weights"])  # same seed, same data order: the same run again


def test_run_killed_before_its_first_checkpoint_resumes_from_scratch(tiny_runs: Path, tmp_path: Path) -> None:
    """A run with config and metadata but no checkpoint yet (killed in epoch 1): --resume finishes it."""
    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_runs, root, symlinks=True)
    run = root / "base_training" / "run_001"
    original = load_ckpt(run / "checkpoints" / "epoch_001.ckpt")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()

    result = run_cli("base", base_argv(root, "--epochs", "1", "--resume", "1"))  # one process: this one
    assert result.returncode == 0, result.stderr[-3000:]

    assert "no intact checkpoint to resume from: TRAINING STARTS OVER FROM SCRATCH" in result.stderr
    assert not (run / "damaged").exists()  # nothing was damaged, nothing to keep aside
    assert metadata(run)["status"] == "completed"
    resumed = load_ckpt(run / "checkpoints" / "epoch_001.ckpt")
    assert_same_tensors(original["state_dict"], resumed["state_dict"])


def test_a_run_written_before_the_checkpoint_package_resumes_bit_identically(
    reference: dict, tmp_path: Path
) -> None:
    """Written by the trainer as it was before checkpointing became a package (2 processes, ZeRO-2, SIGTERM on
    rank 1 after step 5; ``OLD_RUNS``), the same training as `reference`. Bit-identical where one of its
    copies was written on a machine that computes as this one. Elsewhere, equal up to rounding: a lost
    optimizer state measures 2e-2 against the bound of 1e-4, but the tiny run's EMA (a half-life of one step)
    forgets what it was resumed with, so a lost EMA state shows only in the bit-identical check."""
    fixture, exact = old_run("base_training", reference["run"])
    root = tmp_path / "checkpoints"
    shutil.copytree(fixture, root / "base_training")
    result = train_base(root, *EPOCHS, "--resume", "1")
    assert "Resuming run 001 from step 5 (epoch 2, step 2 of the epoch)" in result.stdout
    run = root / "base_training" / "run_001"
    assert_bit_identical(run, reference["weights"], exact=exact)
    assert metadata(run)["status"] == "completed"


# --------------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------------


def test_disk_full_with_continue_keeps_earlier_checkpoints_and_trains_on(
    reference: dict, tmp_path: Path
) -> None:
    root = tmp_path / "checkpoints"
    run = root / "base_training" / "run_001"
    result = train_base(root, *EPOCHS, "--set", "checkpoint.keep_last_n=0", "--set", "checkpoint.on_save_error=continue",
                        env={"DIFFIT_FAULTS": "enospc@write:tag=epoch_002:rank=1"})  # fmt: skip
    assert "checkpoint epoch_002 could not be written (rank 1: No space left on device" in result.stderr
    assert "training continues" in result.stderr
    assert metadata(run)["status"] == "completed"
    assert events(run, "save_failed")[0]["tag"] == "epoch_002"
    assert assert_all_committed_intact(run) == ["epoch_001", "epoch_003", "epoch_004"]
    assert not (run / "checkpoints" / "state" / "epoch_002").exists()
    assert not (run / "checkpoints" / "epoch_002.ckpt").exists() and not list(run.rglob(".tmp-*"))
    assert_bit_identical(run, reference["weights"])


def test_disk_full_with_fail_stops_as_failed_and_resumes(reference: dict, tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    run = root / "base_training" / "run_001"
    failed = train_base(root, *EPOCHS, env={"DIFFIT_FAULTS": "enospc@write:tag=epoch_002"}, check=False)
    assert failed.returncode != 0
    assert "checkpoint epoch_002 could not be written" in failed.stderr and "--resume 1" in failed.stderr
    assert metadata(run)["status"] == "failed"
    assert assert_all_committed_intact(run) == ["epoch_001"]
    assert os.path.samefile(run / "checkpoints" / "last.ckpt", run / "checkpoints" / "epoch_001.ckpt")
    assert not list(run.rglob(".tmp-*")) and not (run / "checkpoints" / "state" / "epoch_002").exists()

    train_base(root, *EPOCHS, "--resume", "1")
    assert metadata(run)["status"] == "completed"
    assert_bit_identical(run, reference["weights"])
