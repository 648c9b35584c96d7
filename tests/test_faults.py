"""Fault injection: damaged files, preemption, a dying machine, a full disk and a change of process count
(power cuts are tests/test_power_cuts.py's).

Every case runs the real `accelerate launch` with 2 processes and DeepSpeed on the CPU, breaks the run the
way the real fault would, resumes it with the ordinary command, and compares the result with one
uninterrupted reference run of the same seed:
  * bit-flipped ``last.ckpt``, truncated shard, deleted shard: fallback to the newest intact epoch,
    bit-identical; nothing intact at all: a loud restart from scratch, bit-identical;
  * SIGTERM on one rank mid-epoch: both ranks save (in the background, the default), exit 0, resume
    bit-identical;
  * a machine that dies in training or in a background save: the survivors exit within the timeout;
  * ENOSPC while saving: previous checkpoints intact, partial files gone; ``continue`` trains on (bit-identical),
    ``fail`` stops as failed and resumes (bit-identical);
  * 2 processes (ZeRO-2) → 1 process → 2 processes (ZeRO-3) inside epochs: equal to the reference up to
    float summation order (not bit-identical: the reductions differ), and far closer than a fresh optimizer.
Faults are placed with ``DIFFIT_FAULTS`` (``trainer/faults.py``), which pauses a process at a named point so
the test can cut the power exactly there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    EPOCHS,
    REPO,
    assert_all_committed_intact,
    assert_bit_identical,
    assert_same_tensors,
    base_argv,
    child_env,
    final_weights,
    free_port,
    load_ckpt,
    machine_command,
    metadata,
    power_off,
    run_cli,
    train_base,
)

pytestmark = pytest.mark.distributed


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in metadata(run)["events"] if e["kind"] == kind]


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
    shard = ckpts / "state" / "epoch_003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    half = shard.stat().st_size // 2
    os.truncate(shard, half)
    (ckpts / "state" / "epoch_002" / "mp_rank_00_model_states.pt").unlink()

    result = train_base(run.parent.parent, *EPOCHS, "--resume", "1")

    for tag, reason in (
        ("epoch_004", "does not match the sha256"),
        ("epoch_003", "bytes"),
        ("epoch_002", "is missing"),
    ):
        assert f"checkpoint {tag} of run 001 is damaged" in result.stderr
        assert (run / "damaged" / tag).is_dir()
        assert any(e["tag"] == tag and reason in e["reason"] for e in events(run, "fallback"))
    assert "Resuming run 001 from epoch 1" in result.stdout
    assert_bit_identical(run, reference["weights"])
    # The damaged files are kept for inspection, with their damage.
    kept = run / "damaged" / "epoch_003" / "state__epoch_003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
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
    """tests/fixtures/before_checkpoint_package: written by the trainer as it was before checkpointing became
    a package (2 processes, ZeRO-2, SIGTERM on rank 1 after step 5)."""
    root = tmp_path / "checkpoints"
    shutil.copytree(REPO / "tests" / "fixtures" / "before_checkpoint_package" / "base_training",
                    root / "base_training")  # fmt: skip
    result = train_base(root, *EPOCHS, "--resume", "1")
    assert "Resuming run 001 from step 5 (epoch 2, step 2 of the epoch)" in result.stdout
    run = root / "base_training" / "run_001"
    assert_bit_identical(run, reference["weights"])
    assert metadata(run)["status"] == "completed"


# --------------------------------------------------------------------------------------------------
# Preemption and a change of process count
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preempted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run whose rank 1 got SIGTERM after step 5 (inside epoch 2); a pristine copy is kept."""
    root = tmp_path_factory.mktemp("preempted") / "checkpoints"
    result = train_base(root, *EPOCHS, env={"DIFFIT_FAULTS": "signal@step:step=5:rank=1"})
    pristine = root.parent / "pristine"
    shutil.copytree(root, pristine, symlinks=True)
    return {"root": root, "pristine": pristine, "result": result}


def test_sigterm_on_one_rank_saves_marks_interrupted_and_exits_0(preempted: dict) -> None:
    result, run = preempted["result"], preempted["pristine"] / "base_training" / "run_001"
    assert result.returncode == 0
    assert "Received SIGTERM" in result.stderr
    assert "saved a resumable checkpoint and is marked interrupted" in result.stdout
    meta = metadata(run)
    assert meta["status"] == "interrupted"
    assert events(run, "interrupted")[0]["signal"] == "SIGTERM"
    assert assert_all_committed_intact(run)[-1] == "step_0000005"


def test_resume_after_sigterm_is_bit_identical(preempted: dict, reference: dict) -> None:
    root = preempted["root"]
    result = train_base(root, *EPOCHS, "--resume", "1")
    assert "Resuming run 001 from step 5 (epoch 2, step 2 of the epoch)" in result.stdout
    assert_bit_identical(root / "base_training" / "run_001", reference["weights"])


def test_resume_on_one_process_then_on_two_with_zero3(
    preempted: dict, reference: dict, tmp_path: Path
) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(preempted["pristine"], root, symlinks=True)
    run = root / "base_training" / "run_001"
    # 2 processes (ZeRO-2) → 1 process without DeepSpeed, stopped again inside epoch 3 ...
    single = train_base(root, *EPOCHS, "--resume", "1", accelerate_config=None,
                        env={"DIFFIT_FAULTS": "signal@step:step=8"})  # fmt: skip
    assert "saved by 2 process(es) (deepspeed-zero2); continuing on 1 (single)" in single.stdout
    assert metadata(run)["status"] == "interrupted"
    # ... → 2 processes with ZeRO-3, to the end.
    result = train_base(root, *EPOCHS, "--resume", "1", accelerate_config="cpu_zero3")
    assert "saved by 1 process(es) (single); continuing on 2 (deepspeed-zero3)" in result.stdout

    changes = events(run, "world_size_change")
    assert [(c["from_world_size"], c["to_world_size"]) for c in changes] == [(2, 1), (1, 2)]
    assert [r["world_size"] for r in metadata(run)["resumes"]] == [1, 2]
    got, want = final_weights(run), reference["weights"]
    for key in ("state_dict", "ema_state_dict"):
        for name, tensor in want[key].items():
            # Only the order of float sums differs from the reference; a lost optimizer state would not.
            torch.testing.assert_close(got[key][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")


# --------------------------------------------------------------------------------------------------
# A machine that dies
# --------------------------------------------------------------------------------------------------

TIMEOUT_MINUTES = 0.5
"""``distributed.timeout_minutes`` of the dying-machine tests: the bound every survivor must exit within."""


@pytest.mark.parametrize(
    ("when", "fault", "waited_for"),
    [
        ("in training", "pause@step:step=4:rank=1", "the stop check at step 4"),
        # machine 0 meets the death wherever it next waits for machine 1 (a step's collectives, validation,
        # the save's rendezvous), and names that place; the save in flight is given up
        ("in a background save", "pause@save.rendezvous:tag=epoch_002:rank=1", ".+"),
    ],
    ids=["training", "background-save"],
)
def test_a_dying_machine_ends_the_survivors_within_the_timeout_and_leaves_a_resumable_run(
    reference: dict, tmp_path: Path, when: str, fault: str, waited_for: str
) -> None:
    """Two machines (two launchers on loopback, one process each); machine 1's worker is SIGKILLed while it
    is held at ``fault``. Machine 0 must exit non-zero within the timeout, saying what it waited for; every
    committed checkpoint stays intact. The death in a save, the harder case, is then resumed to the end:
    bit-identical (a resume from intact epoch checkpoints is every other resume test's subject)."""
    root, marker, port = tmp_path / "checkpoints", tmp_path / "paused", free_port()
    args = base_argv(root, *EPOCHS, "--set", f"distributed.timeout_minutes={TIMEOUT_MINUTES}")
    env = child_env({"DIFFIT_FAULTS": fault, "DIFFIT_FAULT_MARKER": str(marker)})
    logs = [tmp_path / f"machine{m}.log" for m in (0, 1)]
    procs = []
    for machine, log in enumerate(logs):
        with open(log, "w") as out:
            cmd = machine_command("train_base.py", args, machine=machine, port=port)
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=tmp_path))  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[
                -3000:
            ]
            time.sleep(0.2)
        time.sleep(0.5)  # the marker is written before the pause begins
        os.kill(int(marker.read_text().split("pid=")[1]), signal.SIGKILL)  # machine 1's worker dies
        killed = time.monotonic()
        code = procs[0].wait(timeout=TIMEOUT_MINUTES * 60 + 60)
        survived = time.monotonic() - killed
    finally:
        for proc in procs:
            power_off(proc, root)
    out = logs[0].read_text()
    assert code != 0, out[-3000:]
    assert survived < TIMEOUT_MINUTES * 60 + 20, f"machine 0 took {survived:.0f} s to give up"
    died = f"another process of this launch died or did not answer within {TIMEOUT_MINUTES:g} min"
    assert re.search(f"error: rank 0: {waited_for}: {died}", out), out[-3000:]
    assert "Traceback" not in out.split("error: rank 0:")[0]
    run = root / "base_training" / "run_001"
    assert metadata(run)["status"] == "failed"
    assert_all_committed_intact(run)
    if "save" in when:  # rank 0's half of the save in flight was discarded, and said so
        assert "warning: rank 0: checkpoint epoch_002 was not saved" in out, out[-3000:]
        train_base(root, *EPOCHS, "--resume", "1")
        assert_bit_identical(run, reference["weights"])


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
