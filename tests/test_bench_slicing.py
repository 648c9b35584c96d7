"""The overhead benchmark's time slicing (``benchmarks/launching.py: time_sliced``) with real processes: only
the process whose turn it is runs (with every process it started, in its session or in new ones), each is
stamped on its own running clock, the open-ended ones are killed when the others end, and a process that
fails stops the whole group with one error."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import psutil
import pytest

from benchmarks import launching
from benchmarks.harness import BenchError
from benchmarks.launching import Job, epoch_stamps, time_sliced

WORK = 0.1  # seconds of CPU per "epoch" of a child

# A child that burns WORK s of its own CPU per epoch, printing an epoch line after each, and records when
# it was running (perf_counter is the machine's monotonic clock, the same in every process).
CHILD = f"""
import sys, time
epochs, out = int(sys.argv[1]), sys.argv[2]
seen, last = [], 0.0
for k in range(1, epochs + 1):
    start = time.thread_time()
    while time.thread_time() - start < {WORK}:
        now = time.perf_counter()
        if now - last > 0.001:
            seen.append(now)
            last = now
    print(f"Epoch {{k}}/{{epochs}}: work", flush=True)
    if out != "-":
        open(out, "w").write("\\n".join(map(repr, seen)))
"""


def child(epochs: int, out: Path | str = "-") -> list[str]:
    return [sys.executable, "-c", CHILD, str(epochs), str(out)]


# A launcher as torch elastic is one: it starts the command after its first two arguments in a session of its
# own (``start_new_session=True``, as elastic starts each worker), writes its pid to a file and waits for it.
# The worker's stdout is the launcher's.
LAUNCHER = """
import subprocess, sys
worker = subprocess.Popen(sys.argv[2:], start_new_session=True)
open(sys.argv[1], "w").write(str(worker.pid))
sys.exit(worker.wait())
"""


def launcher(pid_file: Path, worker: list[str]) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, str(pid_file), *worker]


def outside_turns(seen_file: Path, turns: list[tuple[float, float]]) -> tuple[int, int]:
    """(moments a child recorded outside ``turns``, moments it recorded)."""
    seen = [float(x) for x in seen_file.read_text().split()]
    outside = [t for t in seen if not any(a - 0.005 <= t <= b + 0.005 for a, b in turns)]
    return len(outside), len(seen)


def running(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` is still there (not a zombie) after up to ``within`` s."""
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.05)
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_only_the_process_whose_turn_it_is_runs(tmp_path):
    epochs = 3
    jobs = [
        Job(child(epochs, tmp_path / "a.seen"), tmp_path / "a.log", finite=True),
        Job(child(10_000), tmp_path / "endless.log", finite=False),
        Job(child(epochs, tmp_path / "b.seen"), tmp_path / "b.log", finite=True),
    ]
    launches = time_sliced(jobs, slice_seconds=0.05, timeout=120)

    for name, launch in zip("ab", (launches[0], launches[2])):
        stamps = epoch_stamps(launch)
        assert len(stamps) == epochs
        assert stamps == sorted(stamps)
        # A stopped process burns no CPU: its running clock holds at least the CPU it used ...
        assert stamps[-1] >= 0.95 * epochs * WORK
        # ... and every moment it was seen running lies inside one of its turns.
        outside, seen = outside_turns(tmp_path / f"{name}.seen", launch.turns)
        assert seen > 100
        assert outside <= seen // 100, f"{outside} of {seen} samples outside the turns"
    # Turns never overlap, whoever they belong to.
    turns = sorted(t for launch in launches for t in launch.turns)
    assert all(b <= c for (_, b), (c, _) in itertools.pairwise(turns))
    # The open-ended process ran beside them, then was killed.
    assert launches[1].turns and 0 < len(epoch_stamps(launches[1])) < 10_000
    assert "--- stdout (seconds of running clock) ---" in (tmp_path / "endless.log").read_text()


def test_a_launch_takes_turns_and_ends_with_the_workers_it_started_in_new_sessions(tmp_path):
    epochs = 3
    pid_files = {name: tmp_path / f"{name}.pid" for name in ("a", "endless")}
    jobs = [
        Job(launcher(pid_files["a"], child(epochs, tmp_path / "a.seen")), tmp_path / "a.log", finite=True),
        Job(child(epochs, tmp_path / "plain.seen"), tmp_path / "plain.log", finite=True),
        Job(launcher(pid_files["endless"], child(10_000, tmp_path / "endless.seen")), tmp_path / "endless.log",
            finite=False),
    ]  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        sliced = pool.submit(time_sliced, jobs, slice_seconds=0.05, timeout=120)
        try:
            wait([sliced], timeout=60)
            # No worker outlives the group, though the open-ended one's launcher was killed stopped (a worker
            # that did would hold its launch's stdout open, and time_sliced would never return) ...
            survivors = [name for name, path in pid_files.items() if running(int(path.read_text()))]
            assert not survivors, f"workers left running: {survivors}"
            launches = sliced.result()
            assert len(epoch_stamps(launches[0])) == epochs
            assert 0 < len(epoch_stamps(launches[2])) < 10_000
            # ... and a worker runs only in its launch's turns.
            for name, launch in zip(("a", "plain", "endless"), launches):
                outside, seen = outside_turns(tmp_path / f"{name}.seen", launch.turns)
                assert seen > 100
                assert outside <= seen // 100, f"{name}: {outside} of {seen} samples outside the turns"
        finally:  # end any worker left running (if that pid is still the worker)
            for name, path in pid_files.items():
                with contextlib.suppress(psutil.Error, ValueError, FileNotFoundError):
                    worker = psutil.Process(int(path.read_text()))
                    if str(tmp_path / f"{name}.seen") in worker.cmdline():
                        worker.kill()


@pytest.mark.parametrize("who", ["finite", "open-ended"])
def test_a_failing_process_ends_the_group_with_its_log_named(tmp_path, monkeypatch, who):
    fail = [sys.executable, "-c", "import sys; print('Epoch 1/1: x', flush=True); sys.exit(3)"]
    jobs = [
        Job(child(10_000), tmp_path / "endless.log", finite=False),
        Job(child(50), tmp_path / "long.log", finite=True),
        Job(fail, tmp_path / "fails.log", finite=who == "finite"),
    ]
    pids: list[int] = []
    popen = launching.subprocess.Popen

    def recording_popen(*args, **kwargs):
        proc = popen(*args, **kwargs)
        pids.append(proc.pid)
        return proc

    monkeypatch.setattr(launching.subprocess, "Popen", recording_popen)
    with pytest.raises(BenchError, match=r"exited 3; see .*fails\.log"):
        time_sliced(jobs, slice_seconds=0.05, timeout=120)
    assert len(pids) == 3 and not any(alive(pid) for pid in pids)
