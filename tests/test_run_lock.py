"""The run lock: one live launch per run, a dead launch's lock never blocks, and the listing tells a run that
is training now from one whose process died; the listing counts what is committed, not what metadata says."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fake_world import new_run
from trainer.checkpoint.manifest import Manifest, write_manifest
from trainer.runs import lock as run_lock
from trainer.runs.layout import RunLayout
from trainer.runs.listing import summarize
from trainer.runs.lock import RunLock, RunLocked, is_live, read_holder


def layout_at(tmp_path: Path) -> RunLayout:
    return new_run(tmp_path / "base_training" / "run_001")


def test_a_second_launch_on_a_live_run_is_refused_naming_the_holder(tmp_path: Path) -> None:
    layout = layout_at(tmp_path)
    first = RunLock(layout)
    assert first.acquire("resume it") is None
    with pytest.raises(RunLocked) as info:
        RunLock(layout).acquire("resume it")
    message = str(info.value)
    assert f"process {os.getpid()} on {socket.gethostname()}" in message and "resume it" in message
    assert str(layout.lock) in message  # how to proceed if the holder is gone for good
    first.release()
    assert not layout.lock.exists() and RunLock(layout).acquire("resume it") is None


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    layout = layout_at(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    holder = {"host": socket.gethostname(), "pid": int(dead.stdout), "process_start": "1", "started_at": "earlier",
              "heartbeat": time.time()}  # fmt: skip
    layout.lock.write_text(json.dumps(holder))
    assert not is_live(layout)
    warning = RunLock(layout).acquire("resume it")
    assert warning is not None and f"process {dead.stdout.strip()}" in warning and "gone" in warning
    assert read_holder(layout.lock).pid == os.getpid()  # type: ignore[union-attr]


def test_a_killed_launch_not_yet_reaped_holds_no_lock(tmp_path: Path) -> None:
    """Right after a kill -9 its process is a zombie until its parent reaps it: dead, for the lock too."""
    layout = layout_at(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"host": socket.gethostname(), "pid": child.pid, "process_start": run_lock._process_start(child.pid),
                  "started_at": "now", "heartbeat": time.time()}  # fmt: skip
        layout.lock.write_text(json.dumps(holder))
        assert is_live(layout)
        child.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        assert not is_live(layout)  # not reaped yet: still in /proc, yet gone
    finally:
        child.kill()
        child.wait()


def test_a_process_that_has_begun_to_exit_holds_no_lock() -> None:
    """A kill -9 of a process with gigabytes of memory takes a moment: the kernel flags it as exiting (and its
    command line reads empty) before it becomes a zombie."""
    stat = Path("/proc/self/stat").read_text()
    head, tail = stat.rsplit(")", 1)
    fields = tail.split()
    assert run_lock.start_in_stat(stat) == fields[19]
    fields[6] = str(int(fields[6]) | run_lock.PF_EXITING)
    assert run_lock.start_in_stat(f"{head}) {' '.join(fields)}") == "exited"


def test_a_reused_pid_does_not_keep_a_dead_launchs_lock(tmp_path: Path) -> None:
    layout = layout_at(tmp_path)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": "-1", "started_at": "earlier",
              "heartbeat": time.time()}  # this pid, but another process start: the holder is gone  # fmt: skip
    layout.lock.write_text(json.dumps(holder))
    assert not is_live(layout)


def test_another_hosts_lock_is_live_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    layout = layout_at(tmp_path)
    holder = {
        "host": "elsewhere",
        "pid": 1,
        "process_start": None,
        "started_at": "earlier",
        "heartbeat": time.time(),
    }
    layout.lock.write_text(json.dumps(holder))
    assert is_live(layout)
    holder["heartbeat"] = time.time() - run_lock.STALE_AFTER_SECONDS - 1
    layout.lock.write_text(json.dumps(holder))
    assert not is_live(layout)


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    layout = layout_at(tmp_path)
    lock = RunLock(layout)
    lock.acquire("train it")
    before = read_holder(layout.lock).heartbeat  # type: ignore[union-attr]
    lock.start_heartbeat()
    time.sleep(0.3)
    assert read_holder(layout.lock).heartbeat > before  # type: ignore[union-attr]
    lock.release()
    assert not layout.lock.exists()


def commit_epoch(layout: RunLayout, epoch: int, best_epoch: int) -> None:
    """A committed epoch checkpoint (a one-file stand-in), as a dead process may leave behind."""
    ckpt = layout.ckpt(f"epoch_{epoch:03d}")
    ckpt.write_bytes(b"weights")
    best = {"epoch": best_epoch, "metric": "val_loss", "value": 0.5, "mode": "min"}
    write_manifest(
        layout.checkpoints, Manifest(ckpt.stem, epoch, 0, 3 * epoch, 1, "single", best=best), [ckpt]
    )


def test_the_listing_counts_committed_checkpoints_and_shows_a_dead_run_as_died(tmp_path: Path) -> None:
    layout = layout_at(tmp_path)  # metadata: running, no epoch recorded, no checkpoint recorded
    commit_epoch(layout, 1, best_epoch=1)
    row = summarize(layout.path.parent, 1)
    assert (row.status, row.checkpoints, row.epochs_completed, row.best_epoch) == ("died", 1, 1, 1)
    lock = RunLock(layout)
    lock.acquire("train it")
    assert summarize(layout.path.parent, 1).status == "running"
    lock.release()
