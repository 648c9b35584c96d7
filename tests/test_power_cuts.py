"""Power cuts: SIGKILL of the launcher's process group and of every worker (torch elastic starts them in new
sessions) at every stage of training and saving, under real 2-process ZeRO-2 launches in fp32 and in bf16
(DeepSpeed's bf16 module weights beside its fp32 masters, as on every GPU config): in training, after the
shards are written, before the merged file (of a synchronous and of a background save), before the manifest,
before retention and before metadata.json. After the chain of resumes the run is bit-identical to the
uninterrupted ``reference`` run; only committed checkpoints remain. ``make soak`` cuts at random points.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import (
    EPOCHS,
    assert_all_committed_intact,
    assert_bit_identical,
    metadata,
    power_cut_at,
    train_base,
)

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("config", ["cpu_zero2", "cpu_zero2_bf16"])
def test_power_cuts_at_every_stage_then_resume_is_bit_identical(
    config: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    reference = request.getfixturevalue("bf16_reference" if config.endswith("bf16") else "reference")
    root = tmp_path / "checkpoints"
    run = root / "base_training" / "run_001"
    policy = [*EPOCHS, "--set", "checkpoint.keep_last_n=1", "--set", "checkpoint.save_every_n_steps=2"]
    sync = [*policy, "--set", "checkpoint.async_save=false"]  # the cut lands exactly where the save is
    resume, resume_async = [*sync, "--resume", "1"], [*policy, "--resume", "1"]
    # Steps 1-12; epoch checkpoints at steps 3, 6, 9, 12; step checkpoints at 2, 4, 8, 10.
    cuts = [
        ("pause@step:step=5", sync, "step_0000004"),  # training, inside epoch 2
        ("pause@save.shards:step=6", resume, "step_0000004"),  # shards written, not renamed
        # A background save stopped before its merged file; the loop trains on and waits at the next save.
        ("pause@save.merge:step=6", resume_async, "step_0000004"),
        ("pause@save.manifest:step=6", resume, "step_0000004"),  # every file written but the manifest
        ("pause@save.retention:step=9", resume, "epoch_003"),  # committed, old checkpoints not yet removed
        ("pause@metadata:step=12", resume, "epoch_004"),  # everything saved, metadata.json not updated
    ]
    for fault, args, newest in cuts:
        power_cut_at(root, fault, args, accelerate_config=config)
        tags = assert_all_committed_intact(run)
        assert tags[-1] == newest, f"after {fault}: committed {tags}"

    result = train_base(root, *resume_async, accelerate_config=config)
    assert "Resuming run 001 from epoch 4" in result.stdout
    assert_bit_identical(run, reference["weights"])
    meta = metadata(run)
    assert meta["status"] == "completed" and meta["epochs_completed"] == 4 and meta["global_step"] == 12
    assert [r["checkpoint"] for r in meta["resumes"]] == [c[2] for c in cuts]
    # Only committed checkpoints remain: keep_last_n=1 plus the best, no step checkpoint, no leftovers.
    tags = assert_all_committed_intact(run)
    assert tags[-1] == "epoch_004" and not any(t.startswith("step_") for t in tags)
    assert not list(run.rglob(".tmp-*"))
    on_disk = {p.name for p in (run / "checkpoints" / "state").iterdir() if p.is_dir()}
    assert on_disk == set(tags)
    assert os.path.samefile(run / "checkpoints" / "last.ckpt", run / "checkpoints" / "epoch_004.ckpt")


# --------------------------------------------------------------------------------------------------
# Soak (make soak): random power cuts until the run completes
# --------------------------------------------------------------------------------------------------

POINTS = ["step", "save.shards", "save.merge", "save.manifest", "save.retention", "metadata", "write"]


@pytest.mark.soak
def test_soak_random_power_cuts(reference: dict, tmp_path: Path) -> None:
    """``SOAK_CUTS`` (default 20) power cuts at random points and steps, each followed by a resume."""
    import random

    rng = random.Random(int(os.environ.get("SOAK_SEED", "0")))
    root = tmp_path / "checkpoints"
    run = root / "base_training" / "run_001"
    policy = [*EPOCHS, "--set", "checkpoint.keep_last_n=1", "--set", "checkpoint.save_every_n_steps=2"]
    for cut in range(int(os.environ.get("SOAK_CUTS", "20"))):
        done = metadata(run)["global_step"] if run.exists() else 0
        point = rng.choice(POINTS)
        step = rng.randint(done + 1, 12)
        rank = rng.randint(0, 1)
        fault = f"pause@{point}:step={step}:rank={rank}" if point != "write" else f"pause@write:rank={rank}"
        args = [*policy, "--resume", "1"] if run.exists() else policy
        marker_reached = power_cut_at(root, fault, args, may_finish=True)
        tags = assert_all_committed_intact(run) if run.exists() else []
        print(f"cut {cut}: {fault} reached={marker_reached} committed={tags}")
        if not marker_reached:  # the run finished before reaching the point
            break
    train_base(root, *policy, "--resume", "1")
    assert_bit_identical(run, reference["weights"])


def test_a_cut_after_the_last_checkpoint_before_its_sample_grid_is_completed_on_resume(
    tmp_path: Path,
) -> None:
    """The last epoch's checkpoint is committed, its sample grid not yet drawn: the resume finds the run
    trained to the end and draws the grid from the checkpoint before it says the training completed."""
    root = tmp_path / "checkpoints"
    run = root / "base_training" / "run_001"
    args = [
        "--epochs",
        "2",
        "--set",
        "logging.sample_every_n_epochs=2",
        "--set",
        "checkpoint.async_save=false",
    ]
    assert power_cut_at(root, "pause@metadata:step=6", args)
    grid = run / "logs" / "samples" / "epoch_002.png"
    assert assert_all_committed_intact(run)[-1] == "epoch_002" and not grid.exists()

    result = train_base(root, *args, "--resume", "1")
    assert f"Wrote sample grid {grid}" in result.stdout and "Training completed" in result.stdout
    assert grid.stat().st_size > 0
    meta = metadata(run)
    assert meta["status"] == "completed" and [h["epoch"] for h in meta["history"]] == [1, 2]
