"""Gradient accumulation on real launches: the global batch (``--batch-size``) is cut into processes x
micro-batches, each image keeps its noise, and the micro-batches' gradients sum to the global batch's, so a
run ends where the same run in one piece does (up to the order of float sums): under ZeRO-3, and across a
resume that moves from 1 process to 2 under ZeRO-2 with another split. The launch config's own value is used
when the run gives none, and refused with one line when the two disagree.

The reference is the ``reference`` fixture's run: ZeRO-2, 2 processes x 1 micro-batch of 16 per step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import EPOCHS, assert_bit_identical, events, metadata, train_base

pytestmark = pytest.mark.distributed


def test_zero3_with_four_micro_batches_ends_where_the_reference_does(reference: dict, tmp_path: Path) -> None:
    result = train_base(
        tmp_path, *EPOCHS, "--gradient-accumulation-steps", "4", accelerate_config="cpu_zero3"
    )
    run = tmp_path / "base_training" / "run_001"
    assert "batch 4 per process x 4 micro-batches per step x 2 processes = 32" in result.stdout
    # DeepSpeed's start says nothing per rank (its op is compiled by an earlier launch of the suite)
    assert "built successfully" not in result.stdout and "No CUDA runtime is found" not in result.stderr
    launch = metadata(run)["launch"]
    assert (launch["micro_batch"], launch["accumulation"], launch["global_batch"]) == (4, 4, 32)
    assert_bit_identical(run, reference["weights"], exact=False)


def test_a_resume_on_other_processes_keeps_the_global_batch_with_another_split(
    reference: dict, tmp_path: Path
) -> None:
    """Epochs 1-2 on 1 process (4 micro-batches of 8), epochs 3-4 on 2 under ZeRO-2 (2 of 8 each). The
    launch config asking for another accumulation than the run's is refused first, the run untouched."""
    first = train_base(tmp_path, *EPOCHS, "--epochs", "2", "--gradient-accumulation-steps", "4",
                       accelerate_config=None)  # fmt: skip
    run = tmp_path / "base_training" / "run_001"
    assert "batch 8 per process x 4 micro-batches per step x 1 process = 32" in first.stdout
    before = sorted(p.name for p in (run / "checkpoints").iterdir())

    refused = train_base(tmp_path, *EPOCHS, "--resume", "1", accelerate_config="cpu_zero2",
                         launch_args=["--gradient_accumulation_steps", "2"], check=False)  # fmt: skip
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0  # the launcher's code: its workers exit 2
    assert not any(
        line.startswith(("[rank0]: Traceback", "[rank1]: Traceback")) for line in output.splitlines()
    )
    assert "terminate called" not in output and "SIGABRT" not in output  # no worker aborts on its way out
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: gradient accumulation is 4 in this run's config (--gradient-accumulation-steps, or "
        "distributed.gradient_accumulation_steps) but 2 in the accelerate config: give it in one place, or "
        "the same value in both"
    ], output[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert metadata(run)["status"] == "completed"

    resumed = train_base(tmp_path, *EPOCHS, "--resume", "1", "--gradient-accumulation-steps", "2")
    assert "batch 8 per process x 2 micro-batches per step x 2 processes = 32" in resumed.stdout
    [event] = events(run, "config_changed")
    changed = {c["key"]: (c["old"], c["new"]) for c in event["changes"]}
    assert changed == {"epochs": (2, 4), "distributed.gradient_accumulation_steps": (4, 2)}
    assert_bit_identical(run, reference["weights"], exact=False)
