"""Preemption, a dying machine and a change of process count, under real 2-process DeepSpeed launches:
  * SIGTERM on one rank mid-epoch: both ranks save (in the background, the default), exit 0, resume
    bit-identical;
  * 2 processes (ZeRO-2) → 1 process → 2 processes (ZeRO-3) inside epochs: equal to the reference up to
    float summation order (not bit-identical: the reductions differ), and far closer than a fresh optimizer;
  * a machine that dies in training or in a background save: the survivors exit within the timeout, every
    committed checkpoint stays intact, and the run resumes bit-identically.
The reference is the session's `reference` run (conftest.py): 4 epochs x 3 steps straight, 2 processes,
ZeRO-2. Faults are placed with ``DIFFIT_FAULTS`` (``trainer/faults.py``).
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

from tests.helpers import (
    EPOCHS,
    assert_all_committed_intact,
    assert_bit_identical,
    base_argv,
    child_env,
    events,
    free_port,
    machine_command,
    metadata,
    power_off,
    train_base,
)

pytestmark = pytest.mark.distributed


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
    # rank 1's signal: the run's last line names it; the notice on receipt is rank 0's alone (Ctrl-C reaches
    # every worker of a launch, and a notice from each would repeat it once per rank)
    assert "Received SIGTERM" not in result.stderr
    assert "Interrupted (stopped by SIGTERM at step 5)" in result.stdout
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
    # Only the order of float sums differs from the reference; a lost optimizer state would not.
    assert_bit_identical(run, reference["weights"], exact=False)
    # Validation gives one value on any number of processes: epoch 2 was validated on 1, the reference on 2.
    validated = [h["val_loss"] for h in metadata(reference["run"])["history"]]
    assert [h["val_loss"] for h in metadata(run)["history"]] == pytest.approx(validated, rel=1e-4)


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
