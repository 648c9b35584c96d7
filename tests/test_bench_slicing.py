"""The overhead benchmark's time slicing (``benchmarks/launching.py: time_sliced``) with real processes: only
the process whose turn it is runs, each is stamped on its own running clock, the open-ended ones are
killed when the others end, and a process that fails stops the whole group with one error."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

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
        seen = [float(x) for x in (tmp_path / f"{name}.seen").read_text().split()]
        outside = [t for t in seen if not any(a - 0.005 <= t <= b + 0.005 for a, b in launch.turns)]
        assert len(seen) > 100
        assert len(outside) <= len(seen) // 100, f"{len(outside)} of {len(seen)} samples outside the turns"
    # Turns never overlap, whoever they belong to.
    turns = sorted(t for launch in launches for t in launch.turns)
    assert all(b <= c for (_, b), (c, _) in itertools.pairwise(turns))
    # The open-ended process ran beside them, then was killed.
    assert launches[1].turns and 0 < len(epoch_stamps(launches[1])) < 10_000
    assert "--- stdout (seconds of running clock) ---" in (tmp_path / "endless.log").read_text()


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
