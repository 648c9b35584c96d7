"""One live launch per run: ``run.lock`` in the run folder names the launch training it.

Global rank 0 takes the lock before it touches anything of the run, keeps it fresh with a heartbeat while it
trains (every ``HEARTBEAT_SECONDS``), and removes it when the launch ends. A second launch that would train
the same run is refused, naming the holder. A lock left by a launch that died (kill -9, power cut, dead
node) never blocks: on the same host its process is gone (or is another process with the same pid); on
another host its heartbeat is older than ``STALE_AFTER_SECONDS``. Such a lock is taken over with a warning.

Taking over is race-free: the stale lock is renamed away first (only one launch can rename it), then the
new one is created with ``O_EXCL`` (only one launch can create it). ``JobLock`` is the same lock on a job's
key (``--auto-resume``) while its run does not exist yet: of two launches of one job started together, one
creates the run and the other is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from trainer.errors import UserError
from trainer.runs.layout import RunLayout
from trainer.storage.atomic import NO_FOLLOW, create_new
from trainer.storage.json_files import as_int, read_json_file

HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 120.0
"""A lock held from another host counts as dead once its heartbeat is this old (four beats missed)."""
PF_EXITING = 0x4
"""The kernel's flag of a process that has begun to exit (``include/linux/sched.h``)."""


class RunLocked(UserError):
    """Another live launch is training the run."""


@dataclass
class Holder:
    host: str
    pid: int
    process_start: str | None
    """The kernel's start time of ``pid`` (tells a reused pid from the holder)."""
    started_at: str
    heartbeat: float
    """``time.time()`` of the last beat."""

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}, started {self.started_at}"


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), None where /proc cannot tell; "exited" for a process
    that is ending (a kill -9 takes a moment to free a large process's memory) or has ended but is not yet
    reaped by its parent (a zombie)."""
    try:
        return start_in_stat(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return None


def start_in_stat(stat: str) -> str:
    """``_process_start`` of the process whose ``/proc/<pid>/stat`` reads ``stat``."""
    fields = stat.rsplit(")", 1)[1].split()  # the command's name in parentheses may hold anything
    exiting = int(fields[6]) & PF_EXITING  # field 9: the kernel's flags of the process
    return "exited" if fields[0] in ("Z", "X") or exiting else fields[19]  # field 3: state; 22: start time


def _alive(holder: Holder) -> bool:
    if holder.pid <= 0:  # an unreadable or malformed lock
        return False
    if holder.host != socket.gethostname():
        return time.time() - holder.heartbeat < STALE_AFTER_SECONDS
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    start = _process_start(holder.pid)
    if start == "exited":
        return False
    same = start is None or holder.process_start is None or start == holder.process_start
    return same and _python(holder.pid)


def _python(pid: int) -> bool:
    """Whether ``pid`` runs a Python interpreter, as every launch of the trainer does (a lock naming any other
    live process, pid 1 say, was not written by one); True where the command line cannot be read."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return True
    return not argv0 or os.path.basename(argv0).startswith(b"python")


MALFORMED = Holder("?", -1, None, "?", 0.0)
"""The holder of a lock that cannot be read or whose fields are not what the trainer writes: a dead one's."""


def read_holder(path: Path) -> Holder | None:
    """The lock's holder, or None when there is no lock (an unreadable or malformed lock counts as a dead
    one's, ``MALFORMED``)."""
    try:
        data = read_json_file(path, max_bytes=64 << 10)
        if not isinstance(data, dict):
            return MALFORMED
        host, started, start = data.get("host"), data.get("started_at"), data.get("process_start")
        heartbeat = data.get("heartbeat")
        if not (isinstance(host, str) and isinstance(started, str) and isinstance(start, str | None)):
            return MALFORMED
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, int | float) or heartbeat != heartbeat:
            return MALFORMED
        return Holder(host, as_int(data.get("pid"), "pid"), start, started, float(heartbeat))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return MALFORMED


def is_live(layout: RunLayout) -> bool:
    """Whether a live launch holds the run's lock (what ``--list-runs`` shows as running)."""
    holder = read_holder(layout.lock)
    return holder is not None and _alive(holder)


class RunLock:
    """The lock of one run, held by this process (global rank 0)."""

    def __init__(self, layout: RunLayout) -> None:
        self._hold(layout.lock, f"run {layout.path.name}", layout.path)

    def _hold(self, path: Path, title: str, folder: Path) -> None:
        """``path``: the lock file; ``title``: what messages call what it locks; ``folder``: where it lies."""
        self.path, self.title, self.folder = path, title, folder
        self.me = Holder(socket.gethostname(), os.getpid(), _process_start(os.getpid()),
                         datetime.now(timezone.utc).isoformat(timespec="seconds"), time.time())  # fmt: skip
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    def acquire(self, what: str) -> str | None:
        """Take the lock, or raise ``RunLocked`` when a live launch holds it (``what``: what this launch was
        about to do, for the message). Returns a warning when a dead launch's lock was taken over."""
        try:
            return self._acquire(what)
        except PermissionError:  # a run folder of someone else's, or made read-only
            raise UserError(
                f"cannot take the lock of {self.title}: you may not write to {self.folder}. "
                "Training needs its run folder writable: copy the run into a checkpoint root of yours "
                "(cp -a) and continue it there, or fix the folder's permissions"
            ) from None

    def _acquire(self, what: str) -> str | None:
        for _ in range(3):  # a race with another launch taking over the same stale lock: look again
            if self._create():
                return None
            holder = read_holder(self.path)
            if holder is None:
                continue
            if holder is not MALFORMED and _alive(holder):
                raise RunLocked(self._busy(holder, what))
            aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path, aside)
                aside.unlink()
                if self._create():
                    if holder is MALFORMED:
                        return f"took over the lock of {self.title}: it was unreadable or malformed"
                    return (
                        f"took over the lock of {self.title} from a launch that is gone ({holder.describe()})"
                    )
        raise RunLocked(f"could not take the lock {self.path}: other launches keep taking it")

    def _busy(self, holder: Holder, what: str) -> str:
        return (
            f"{self.title} is being trained by another launch ({holder.describe()}); this launch would {what}. "
            f"Wait for it to end, or stop it (its run saves and is marked interrupted); if that process is gone "
            f"for good, delete {self.path}"
        )

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self.me)))
        return True

    def start_heartbeat(self) -> None:
        """Refresh the lock every ``HEARTBEAT_SECONDS`` from a thread of its own, until ``release``."""
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.me.heartbeat = time.time()
            tmp = self.path.with_name(f".tmp-{self.path.name}.{os.getpid()}")
            with contextlib.suppress(OSError):  # a lost write costs a beat, not the run
                with create_new(tmp) as f:  # never through a link planted at the name
                    f.write(json.dumps(asdict(self.me)).encode())
                os.replace(tmp, self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this process's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = read_holder(self.path)
        if holder is not None and (holder.host, holder.pid) == (self.me.host, self.me.pid):
            self.path.unlink(missing_ok=True)


class JobLock(RunLock):
    """The lock of an ``--auto-resume`` job's key while the launch holding it finds or creates the job's run
    (``.job-<digest>.lock`` in the kind's folder): two launches of one job never make two runs."""

    def __init__(self, root: Path, key: str) -> None:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self._hold(root / f".job-{digest}.lock", f"job {key!r}", root)

    def _busy(self, holder: Holder, what: str) -> str:
        return (
            f"another launch of {self.title} ({holder.describe()}) is starting the job's run; this launch would "
            f"{what}, and stops so that the job has one run. Run the same command again once that launch has "
            "ended: it continues the job's run"
        )
