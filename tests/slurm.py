"""A private single-node SLURM for tests: munged, slurmctld and slurmd started from a temporary folder.

``private_slurm()`` writes a small ``slurm.conf`` (free ports, this machine's short host name as the only
node, a ``debug`` partition, fast scheduling and requeue, ``KillWait=5``), starts the three daemons in the
foreground as children of this process (so their PIDs are known and nothing is daemonised behind our back),
waits until the node is ``idle``, and yields a ``Slurm`` whose ``env`` runs the client commands (``sbatch``,
``scontrol``, ...) against it. On exit it cancels every job, waits for their processes to end, and stops the
daemons it started, by PID. Nothing outside the temporary folder is used: munged gets its own key and
socket (``AuthInfo=socket=...``), so a system munge or another private SLURM on the machine is left alone.

Needs Debian's ``slurmctld slurmd slurm-client munge`` (``.ci/run`` installs them) and root (the daemons run
as root, ``SlurmUser=root``). When they are missing or a daemon does not come up, it fails with the reason and
the daemon's log; ``DIFFIT_SKIP_SLURM=1`` turns that into a skip instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

SKIP_ENV = "DIFFIT_SKIP_SLURM"
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel")
INSTALL_HINT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"

CONF = """\
ClusterName=diffittest
SlurmctldHost={node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5,socket={root}/munge/munge.socket
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=600
NodeName={node} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed here, or its daemons could not be started (the message says why)."""


@dataclass
class Slurm:
    """A running private SLURM: ``env`` (with ``SLURM_CONF``) for its client commands, and its folder."""

    root: Path
    node: str
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A client command (``scontrol``, ``squeue``, ...) against this SLURM."""
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}\n{self.logs()}"
            )
        return result

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit a batch job (``sbatch --parsable ARGS``) with ``env`` plus this SLURM's ``SLURM_CONF``;
        returns the job id."""
        result = subprocess.run(["sbatch", "--parsable", *args], env={**(env or self.env), **self._conf_env()},
                                capture_output=True, text=True, timeout=30, cwd=cwd,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(
                f"sbatch {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ``TimeLimit``, ...);
        empty once the controller has forgotten the job."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait_for(self, what: str, condition: Callable[[], T], timeout: float, poll: float = 0.5) -> T:
        """Poll ``condition()`` until it returns something truthy (returned); fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(poll)

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon's log, for failure messages."""
        parts = []
        for name in DAEMONS:
            log = self.root / "log" / f"{name}.log"
            text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(no log)"]
            parts.append(f"--- {name} log ({log}) ---\n" + "\n".join(text))
        return "\n".join(parts)

    def _conf_env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _unavailable(reason: str) -> None:
    """Fail (or skip, with ``DIFFIT_SKIP_SLURM=1``) because SLURM cannot run here."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"SLURM unavailable ({SKIP_ENV}=1): {reason}")
    pytest.fail(
        f"SLURM unavailable: {reason}\n(set {SKIP_ENV}=1 to skip the SLURM tests instead)", pytrace=False
    )


def check_installed() -> None:
    """Fail (or skip) unless the daemons and client commands are installed and this process is root."""
    missing = [p for p in DAEMONS.values() if not os.access(p, os.X_OK)]
    missing += [c for c in CLIENTS if shutil.which(c) is None]
    if missing:
        _unavailable(f"not installed: {', '.join(missing)} (install with: {INSTALL_HINT})")
    if os.geteuid() != 0:
        _unavailable("the private SLURM runs its daemons as root (SlurmUser=root); this process is not root")


def _log_tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return f"(no {path.name})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def private_slurm(cpus: int | None = None, start_timeout: float = 30) -> Iterator[Slurm]:
    """Start munged, slurmctld and slurmd in a fresh folder under /tmp, wait for the node to be idle, yield a
    ``Slurm``; afterwards cancel its jobs and stop every daemon it started (by PID) and remove the folder.

    Fails (or skips with ``DIFFIT_SKIP_SLURM=1``) with the reason and the daemon's log when SLURM is not
    installed or a daemon does not come up.
    """
    check_installed()
    node = socket.gethostname().split(".")[0]
    # Short and world-traversable: munged wants every directory above its socket executable by all, and unix
    # socket paths (slurmd's per-step sockets in the spool folder) must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="diffit-slurm-", dir="/tmp"))
    root.chmod(0o755)
    for sub in ("state", "spool", "log", "run", "munge"):
        (root / sub).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = CONF.format(node=node, root=root, ctld_port=_free_port(), slurmd_port=_free_port(),
                       cpus=cpus or os.cpu_count() or 1)  # fmt: skip
    (root / "slurm.conf").write_text(conf)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    slurm = Slurm(root=root, node=node, env=env)
    commands = {
        "munged": [DAEMONS["munged"], "--foreground", "--force", f"--socket={root}/munge/munge.socket",
                   f"--key-file={key}", f"--pid-file={root}/run/munged.pid",
                   f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/munged.seed"],
        "slurmctld": [DAEMONS["slurmctld"], "-D", "-i", "-f", str(slurm.conf)],
        "slurmd": [DAEMONS["slurmd"], "-D", "-f", str(slurm.conf)],
    }  # fmt: skip
    ready = {
        "munged": lambda: (root / "munge" / "munge.socket").exists(),
        "slurmctld": lambda: slurm.run("scontrol", "ping", check=False).stdout.count("UP") > 0,
        "slurmd": lambda: _node_state(slurm) == "idle",
    }
    try:
        for name, cmd in commands.items():
            out = (root / "log" / f"{name}.out").open("wb")
            slurm.daemons[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, env=env, cwd=root)  # fmt: skip
            out.close()
            _wait_ready(slurm, name, ready[name], start_timeout)
        yield slurm
    finally:
        _shutdown(slurm)


def _node_state(slurm: Slurm) -> str:
    result = slurm.run("sinfo", "-h", "-n", slurm.node, "-o", "%T", check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def _wait_ready(slurm: Slurm, name: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    proc = slurm.daemons[name]
    while not ready():
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            why = f"exited with code {code}" if code is not None else f"not ready after {timeout:.0f} s"
            output = _log_tail(slurm.root / "log" / f"{name}.out")
            log = _log_tail(slurm.root / "log" / f"{name}.log")
            message = f"{name} {why}\n--- {name} output ---\n{output}\n--- {name} log ---\n{log}"
            if name == "slurmd":
                message += f"\nnode state: {_node_state(slurm)!r}\n--- slurmctld log ---\n" + _log_tail(
                    slurm.root / "log" / "slurmctld.log"
                )
            _shutdown(slurm)
            _unavailable(message)
        time.sleep(0.2)


def _step_sockets(slurm: Slurm) -> list[Path]:
    """slurmstepd's sockets in the spool folder: one per live job step (batch, extern or srun)."""
    return [p for p in (slurm.root / "spool").glob(f"{slurm.node}_*") if p.is_socket()]


def _socket_owners(paths: list[Path]) -> set[int]:
    """The processes holding the unix sockets bound at ``paths`` (from /proc/net/unix and /proc/*/fd)."""
    wanted = {str(p) for p in paths}
    inodes = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] in wanted:
                inodes.add(f"socket:[{fields[6]}]")
    owners = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd) in inodes:
                owners.add(int(fd.parts[2]))
    return owners


def _shutdown(slurm: Slurm) -> None:
    """Cancel every job, wait (up to ~20 s) for their step daemons to go, then stop the daemons by PID."""
    if "slurmctld" in slurm.daemons and slurm.daemons["slurmctld"].poll() is None:
        slurm.run("scancel", "--full", "--quiet", "--user=root", check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            running = slurm.run("squeue", "-h", "-t", "R,CG,S", "-o", "%i", check=False).stdout.strip()
            if not running and not _step_sockets(slurm):
                break
            time.sleep(0.5)
    # A step daemon (slurmstepd, started by our slurmd for a job step) that outlived the cancel: by the PID
    # that holds its socket in our spool folder.
    for pid in _socket_owners(_step_sockets(slurm)):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = slurm.daemons.pop(name, None)
        if proc is None:
            continue
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    shutil.rmtree(slurm.root, ignore_errors=True)
