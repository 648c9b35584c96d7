"""FID in launched runs, with the stand-in feature network on the bundled digits: ``best`` chosen by FID and
listed, an FID stopped in training and resumed, and ``scripts/evaluate.py`` on one and two processes and
after a kill, each giving the same value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import copy_runs, load_ckpt, metadata, run_in_process, run_script, train_base

pytestmark = pytest.mark.distributed

EPOCHS = 3
FID_FLAGS = [
    "--epochs", str(EPOCHS),
    "--set", "evaluation.fid_every_n_epochs=1",
    "--set", "evaluation.fid_features=standin",
    "--set", "evaluation.fid_num_samples=120",
    "--set", "evaluation.fid_batch_size=40",
    "--set", "checkpoint.monitor=fid",
    "--set", "logging.sample_every_n_epochs=0",
]  # fmt: skip
EVALUATE = ["--num-samples", "90", "--batch-size", "30", "--features", "standin"]


def fid_argv(tmp: Path) -> list[str]:
    return [*FID_FLAGS, "--set", f"data.root={tmp / 'datasets'}"]


@pytest.fixture(scope="module")
def fid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch run that computes an FID every epoch and keeps its best by it (one process)."""
    tmp = tmp_path_factory.mktemp("fid")
    result = train_base(tmp / "ckpts", *fid_argv(tmp), accelerate_config=None)
    assert "Computing the FID reference statistics of 1618 training images" in result.stdout
    return tmp / "ckpts" / "base_training" / "run_001"


def fids(run: Path) -> list[float]:
    return [entry["fid"] for entry in metadata(run)["history"]]


def test_best_is_the_epoch_with_the_lowest_fid_and_the_listing_shows_it(fid_run: Path):
    meta = metadata(fid_run)
    values = fids(fid_run)
    assert len(values) == EPOCHS and len(set(values)) == EPOCHS
    best_epoch = 1 + values.index(min(values))
    assert meta["best"] == {"epoch": best_epoch, "metric": "fid", "value": min(values), "mode": "min"}
    assert load_ckpt(fid_run / "checkpoints" / "best.ckpt")["epoch"] == best_epoch
    assert all(entry["fid_samples"] == 120 for entry in meta["history"])
    root = fid_run.parent.parent
    table = run_in_process(
        "train_base.py", ["--list-runs", "--checkpoint-root", str(root)], check=True
    ).stdout
    assert "FID (samples)" in table and f"{min(values):.3f} (120)" in table
    listed = run_in_process(
        "train_base.py", ["--list-runs", "--json", "--checkpoint-root", str(root)], check=True
    )
    (row,) = json.loads(listed.stdout)
    assert (row["best_metric"], row["fid"], row["fid_samples"]) == ("fid", min(values), 120)


def test_an_fid_stopped_in_training_resumes_to_the_same_value(fid_run: Path, tmp_path: Path):
    """SIGTERM on rank 0 in epoch 2's FID: the ranks agree to stop before its next round, the moment is
    committed, and the resume continues the FID from the rounds it had, to the uninterrupted run's values."""
    root = tmp_path / "ckpts"
    stopped = train_base(root, *fid_argv(fid_run.parent.parent.parent), accelerate_config=None,
                         env={"DIFFIT_FAULTS": "signal@fid:epoch=2:round=1"})  # fmt: skip
    assert "Validation of epoch 2 left for the resume" in stopped.stdout
    run = root / "base_training" / "run_001"
    assert metadata(run)["status"] == "interrupted"
    scratch = run / "evaluations" / "fid-epoch_002-120-standin"
    assert sorted(p.name for p in scratch.iterdir()) == ["chunk_000000.safetensors"]
    resumed = train_base(
        root, "--resume", "1", *fid_argv(fid_run.parent.parent.parent), accelerate_config=None
    )
    assert f"Continuing the evaluation from 1 of 3 chunks in {scratch}" in resumed.stdout
    assert fids(run) == fids(fid_run)
    assert metadata(run)["best"] == metadata(fid_run)["best"]
    assert not scratch.exists()


def test_evaluate_gives_one_value_on_one_and_two_processes_and_after_a_kill(fid_run: Path, tmp_path: Path):
    run = copy_runs(fid_run.parent.parent, tmp_path / "ckpts") / "base_training" / "run_001"
    args = [str(run), "--which", "last", *EVALUATE]
    one = run_in_process("evaluate.py", args, check=True)
    assert f"FID of run_001 epoch_00{EPOCHS} (last): 90 samples on 1 process(es), standin" in one.stdout
    killed = run_script("evaluate.py", args, check=False, env={"DIFFIT_FAULTS": "exit@fid:round=2"})
    assert killed.returncode == 9
    again = run_in_process("evaluate.py", args, check=True)
    assert "Continuing the evaluation from 2 of 3 chunks" in again.stdout
    two = run_script("evaluate.py", args, accelerate_config="cpu_zero2")
    assert two.stdout.count("FID ") == 2  # rank 0's two lines only
    records = metadata(run)["evaluations"]
    assert [r["tag"] for r in records] == [f"epoch_00{EPOCHS}"] * 3
    assert records[0]["value"] == records[1]["value"] == records[2]["value"]
    assert (records[0]["num_samples"], records[0]["features"], records[0]["seed"]) == (90, "standin", 0)
    assert not (run / "evaluations" / f"fid-epoch_00{EPOCHS}-90-standin").exists()
