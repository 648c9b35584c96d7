"""Starting the benchmarked scripts and timing them.

Commands and environments come from ``tests/helpers.py``, as in the tests (``launch_command``,
``child_env``), except that a caller's ``OMP_NUM_THREADS`` and ``DS_ACCELERATOR`` are kept, DeepSpeed
is put on the CPU only where there is no CUDA (the benchmarks also run on GPUs: gpu.md), and Python's
bytecode cache is on (``bench_env``).

``launch`` runs a command to completion, stamping each stdout line with the seconds since ``Popen``;
``time_sliced`` runs several at once in turns, each stamped on its own running clock; ``seconds_to_step``
times a launch to the end of a given optimizer step.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil

from benchmarks.harness import BenchError
from tests.helpers import REPO, child_env, launch_command

HAND_LOOP = REPO / "benchmarks" / "hand_loop.py"
"""The baseline's script (``benchmarks/hand_loop.py``)."""
PEER_TIMINGS = REPO / "benchmarks" / "peer_timings.py"
"""The peers figure's script (``benchmarks/peer_timings.py``)."""
SCALE_TIMINGS = REPO / "benchmarks" / "scale_timings.py"
"""The scaling figures' script (``benchmarks/scale_timings.py``)."""
EPOCH_LINE = re.compile(r"^Epoch (\d+)/(\d+): ")
"""The line the trainer and the hand loop print after each epoch (rank 0)."""


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched script (``tests.helpers.child_env``, the caller's settings kept), with
    Python's bytecode cache on, as in a user's environment: with ``PYTHONDONTWRITEBYTECODE`` set (some CI
    and sandbox images do), every launch compiles the project's modules again, and start-up bound figures
    (the listing, the resume latency) would measure that instead."""
    env = child_env(extra, cpu_only=False)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def command(
    script: str | Path,
    args: list[str],
    accelerate_config: str | None = None,
    num_processes: int | None = None,
) -> list[str]:
    """``python SCRIPT ARGS`` or ``accelerate launch --config_file configs/accelerate/NAME.yaml SCRIPT ARGS``;
    ``script`` is a name in ``scripts/`` or an absolute path (``HAND_LOOP``)."""
    launch_args = [] if num_processes is None else ["--num_processes", str(num_processes)]
    return launch_command(str(script), args, accelerate_config=accelerate_config, launch_args=launch_args)


def remove_deepspeed_shm(cmd: list[str]) -> None:
    """Delete the shared-memory buffers of the DeepSpeed CPU launch ``cmd`` once it has ended.

    DeepSpeed's CPU communication op creates ``/dev/shm/deepspeed_allreduce_buffer_*_<port>_<rank>`` (69 MB
    per rank here) and never removes them, even on a clean exit; left behind, they fill the machine's RAM.
    """
    if "--main_process_port" not in cmd:
        return
    port = cmd[cmd.index("--main_process_port") + 1]
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


@dataclass
class Launch:
    """A finished launch: its stdout lines, each with the seconds since ``Popen`` when it arrived (for
    ``time_sliced``, the seconds its process had run by then)."""

    lines: list[tuple[float, str]]
    log: Path
    turns: list[tuple[float, float]] = field(default_factory=list)
    """For ``time_sliced``: when the process was let run (``perf_counter`` pairs); its stamps count only these."""


def epoch_stamps(result: Launch) -> list[float]:
    """When each "Epoch N/M: " line of the launch's stdout arrived."""
    return [t for t, line in result.lines if EPOCH_LINE.match(line)]


def start_process(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``cmd`` in its own session (so that its whole process group can be signalled), stdout piped to
    the caller, stderr to ``log`` after a line naming the command."""
    with open(log, "w") as err:
        err.write("$ " + " ".join(cmd) + "\n")
        err.flush()
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=bench_env(env), cwd=REPO,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def append_stdout(log: Path, lines: list[tuple[float, str]], clock: str) -> None:
    with open(log, "a") as f:
        f.write(f"--- stdout ({clock}) ---\n" + "\n".join(f"[{t:8.3f}] {text}" for t, text in lines) + "\n")


def exited(cmd: list[str], code: int, log: Path) -> str:
    return f"{' '.join(cmd[:4])} ... exited {code}; see {log}"


def launch(cmd: list[str], log: Path, *, timeout: float = 900, env: dict[str, str] | None = None) -> Launch:
    """Run ``cmd`` to completion, timestamping its stdout lines as they arrive; stderr goes to ``log``.
    Prints the launch's wall time (where the benchmark's time goes)."""
    lines: list[tuple[float, str]] = []
    begin = time.perf_counter()
    proc = start_process(cmd, log, env)
    watchdog = threading.Timer(
        timeout, kill_tree, (proc.pid,)
    )  # the workers too: each has a session of its own
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # text mode: tqdm's \r also ends a line
            lines.append((time.perf_counter() - begin, line.rstrip("\n")))
        proc.wait()
    finally:
        watchdog.cancel()
        remove_deepspeed_shm(cmd)
    append_stdout(log, lines, "seconds since launch")
    if proc.returncode != 0:
        raise BenchError(exited(cmd, proc.returncode, log))
    print(f"    {log.name}: {time.perf_counter() - begin:.0f} s", flush=True)
    return Launch(lines, log)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group ``pgid``, if any process is left in it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _descendant_groups(pid: int) -> list[int]:
    """The process groups of the processes ``pid`` has started, of those they have started, and so on
    (none once it has exited)."""
    groups = []
    try:
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(ProcessLookupError):
                groups.append(os.getpgid(child.pid))
    except psutil.NoSuchProcess:
        pass
    return list(dict.fromkeys(groups))


def stop_tree(pid: int) -> list[int]:
    """Stop (SIGSTOP) the process group of ``pid`` (``start_process`` made it lead one), then that of each
    of its descendants; returns the descendants' groups.

    ``accelerate launch`` starts torch elastic, which starts each worker in a session of its own: stopping
    the launcher's group alone leaves the workers running. The launcher's group stops first, so that it
    starts no new worker meanwhile; descendants are looked for again until a look finds no new group (a
    worker may have started a session of its own before it was stopped).
    """
    _signal_group(pid, signal.SIGSTOP)
    stopped: list[int] = []
    while new := [g for g in _descendant_groups(pid) if g not in stopped and g != pid]:
        for group in new:
            _signal_group(group, signal.SIGSTOP)
        stopped += new
    return stopped


def continue_tree(pid: int) -> None:
    """Continue (SIGCONT) what ``stop_tree(pid)`` stopped: the descendants' groups, then the launcher's."""
    for group in _descendant_groups(pid):
        _signal_group(group, signal.SIGCONT)
    _signal_group(pid, signal.SIGCONT)


def kill_tree(pid: int) -> None:
    """Kill (SIGKILL) the process group of ``pid`` and that of each of its descendants, stopped ones too."""
    for group in [pid, *stop_tree(pid)]:
        _signal_group(group, signal.SIGKILL)


class Job(NamedTuple):
    """One process of ``time_sliced``."""

    cmd: list[str]
    log: Path
    finite: bool
    """True: it must exit 0 by itself. False: it runs until every finite job has ended, then it is killed."""


class _Group:
    """The processes of ``time_sliced``: started stopped, let run one turn at a time, their stdout read by
    one thread each and stamped with ``perf_counter``. A process is its whole tree (``stop_tree``): an
    ``accelerate launch`` and its workers."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.procs: list[subprocess.Popen[str]] = []
        self.received: list[list[tuple[float, str]]] = [[] for _ in jobs]
        self.turns: list[list[tuple[float, float]]] = [[] for _ in jobs]
        self.readers: list[threading.Thread] = []

    def start(self) -> None:
        for i, job in enumerate(self.jobs):
            self.procs.append(start_process(job.cmd, job.log))
            stop_tree(self.procs[i].pid)
            self.readers.append(threading.Thread(target=self._read, args=(i,), daemon=True))
            self.readers[-1].start()

    def _read(self, i: int) -> None:
        stdout = self.procs[i].stdout
        assert stdout is not None
        for line in stdout:  # text mode: tqdm's \r also ends a line
            self.received[i].append((time.perf_counter(), line.rstrip("\n")))

    def failure(self) -> str | None:
        """Any job that has exited with an error (before the killing, which only ends the turns)."""
        for job, proc in zip(self.jobs, self.procs):
            if proc.poll() not in (None, 0):
                return exited(job.cmd, proc.returncode, job.log)
        return None

    def finite_running(self) -> bool:
        return any(job.finite and proc.poll() is None for job, proc in zip(self.jobs, self.procs))

    def turn(self, i: int, seconds: float) -> None:
        """Let process ``i`` run for ``seconds`` (less if it exits), then stop it again."""
        proc = self.procs[i]
        if proc.poll() is not None:
            return
        start = time.perf_counter()
        continue_tree(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(seconds)
        stop_tree(proc.pid)
        self.turns[i].append((start, time.perf_counter()))

    def end(self) -> None:
        for proc in self.procs:
            kill_tree(proc.pid)  # also ends stopped processes
            proc.wait()
        for reader in self.readers:
            reader.join()
        for job in self.jobs:
            remove_deepspeed_shm(job.cmd)

    def launches(self) -> list[Launch]:
        """Each job's stdout lines, stamped on its running clock (the time it had been let run by then)."""
        launches = []
        for i, job in enumerate(self.jobs):
            turns = self.turns[i]
            lines = [
                (sum(max(0.0, min(end, t) - start) for start, end in turns), text)
                for t, text in self.received[i]
            ]
            append_stdout(job.log, lines, "seconds of running clock")
            launches.append(Launch(lines, job.log, turns))
        return launches


def time_sliced(jobs: list[Job], *, slice_seconds: float, timeout: float = 1800) -> list[Launch]:
    """Run ``jobs`` at once but never two at a time: they take turns of ``slice_seconds`` in list order,
    every other process group stopped (SIGSTOP) meanwhile. Each stdout line is stamped with the seconds its
    process had been allowed to run until then: its own running clock, not wall time.

    On a shared machine, speed drifts by ±10% within a minute. Run one after the other, two programs'
    timings differ by that much whatever they do; taking turns of a second, they see the same machine.
    The processes' start-up is sliced too. When the last finite job has ended, the others are killed.
    ``Launch.turns`` has the (start, end) ``perf_counter`` pairs when each process was let run. Prints the
    group's wall time.
    """
    group = _Group(jobs)
    begin = time.perf_counter()
    try:
        group.start()
        deadline = time.perf_counter() + timeout
        i = 0
        while group.finite_running() and not group.failure():
            if time.perf_counter() > deadline:
                raise BenchError(f"time-sliced jobs not done within {timeout:.0f} s; see {jobs[0].log}")
            group.turn(i, slice_seconds)
            i = (i + 1) % len(jobs)
        error = group.failure()
        if error:
            raise BenchError(error)
    finally:
        group.end()
    print(f"    {len(jobs)} processes in turns: {time.perf_counter() - begin:.0f} s", flush=True)
    return group.launches()


def seconds_to_step(cmd: list[str], step: int, log: Path, *, timeout: float = 300) -> float:
    """Seconds from ``Popen`` until the process has finished optimizer step ``step`` (global), then kill it.

    Uses the trainer's test-only fault injection (``trainer/faults.py``): at that step it writes a marker
    file and sleeps; the whole process group is then killed.
    """
    marker = log.with_suffix(".marker")
    marker.unlink(missing_ok=True)
    env = {"DIFFIT_FAULTS": f"pause@step:step={step}", "DIFFIT_FAULT_MARKER": str(marker)}
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=bench_env(env), cwd=REPO,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            while not marker.exists():
                if proc.poll() is not None:
                    raise BenchError(
                        f"{' '.join(cmd[:4])} ... exited {proc.returncode} before step {step}; see {log}"
                    )
                if time.perf_counter() - start > timeout:
                    raise BenchError(f"step {step} not reached within {timeout:.0f} s; see {log}")
                time.sleep(0.005)
            return time.perf_counter() - start
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            remove_deepspeed_shm(cmd)
