"""The one place tests launch the real scripts: plain `python` or `accelerate launch` with N processes.

`run_in_process` (and `run_cli` for the training scripts) is the in-process twin of a plain
`python scripts/<script>` launch, for tests that need one process and no process boundary (bad input, the
export and sample scripts, single-process resumes): it saves an interpreter's start and torch's import.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.checkpoint.manifest import read_manifests, verify
from trainer.runs.layout import RunLayout

REPO = Path(__file__).resolve().parent.parent

# A smoke-sized run: the tiny model, a few steps per epoch, a 4-step sampler for the grids.
TINY_RUN = [
    "--model", "diffit_tiny",
    "--data", "digits",
    "--batch-size", "32",
    "--learning-rate", "0.002",
    "--max-steps-per-epoch", "3",
    "--set", "warmup_steps=0",
    "--set", "logging.samples_per_class=2",
    "--set", "edm.num_steps=4",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: dict[str, str] | None = None, *, cpu_only: bool = True) -> dict[str, str]:
    """The environment of a launched script: this one's, with one OpenMP thread, DeepSpeed on the CPU,
    unbuffered output and offline wandb, then ``extra``.

    ``cpu_only=False`` (the benchmarks, which also run on GPUs): the caller's ``OMP_NUM_THREADS``,
    ``DS_ACCELERATOR`` and ``WANDB_MODE`` are kept where set, and ``DS_ACCELERATOR=cpu`` is added only when
    CUDA is not available.
    """
    env = dict(os.environ)
    if not cpu_only:
        defaults = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
        if not torch.cuda.is_available():
            defaults["DS_ACCELERATOR"] = "cpu"
        return {**defaults, **env, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env.update(
        {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    )
    env.update(extra or {})
    return env


def launch_command(
    script: str,
    args: list[str],
    *,
    accelerate_config: str | None = None,
    launch_args: list[str] = (),  # type: ignore[assignment]
) -> list[str]:
    """`python scripts/<script>` or `accelerate launch --config_file configs/accelerate/<name>.yaml ...`."""
    target = str(REPO / "scripts" / script)
    if accelerate_config is None:
        return [sys.executable, target, *args]
    config = REPO / "configs" / "accelerate" / f"{accelerate_config}.yaml"
    port = [] if "--main_process_port" in launch_args else ["--main_process_port", str(free_port())]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *port, *launch_args,
        target, *args,
    ]  # fmt: skip


def run_script(
    script: str,
    args: list[str],
    *,
    accelerate_config: str | None = None,
    launch_args: list[str] = (),  # type: ignore[assignment]
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    cmd = launch_command(script, args, accelerate_config=accelerate_config, launch_args=launch_args)
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}"
            f"\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` is exactly ``values`` inside the block and exactly what it was after it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons so each call builds its Accelerator from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_cli(
    kind: str,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    """``trainer.cli.main(args, kind)`` in this process, as ``run_script(f"train_{kind}.py", ..., check=False)``
    would see it (see ``run_in_process``)."""
    from trainer.cli import main

    return run_in_process(f"train_{kind}.py", args, lambda argv: main(argv, kind=kind), env=env, cwd=cwd)


@functools.cache
def _script_main(path: Path) -> Callable[[list[str]], int]:
    """The ``main`` of the script at ``path``, loaded once per test process."""
    spec = importlib.util.spec_from_file_location(f"scripts.{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main  # type: ignore[no-any-return]


def run_in_process(
    script: str,
    args: list[str],
    main: Callable[[list[str]], int] | None = None,
    *,
    check: bool = False,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    """``scripts/<script>``'s ``main(args)`` (or ``main`` given) in this process, as ``run_script(...,
    check=check)`` would see it: it saves the interpreter's start and torch's import.

    Same environment (``child_env``), working directory and ``sys.argv`` as the plain `python` launch;
    stdout and stderr are captured, argparse's ``SystemExit`` becomes the return code. An exception that
    escapes ``main`` is not caught: it fails the test with its traceback, where a real launch would have
    printed a ``Traceback`` and exited 1. Accelerate's singletons, the environment, the working directory,
    ``sys.argv``, the warning filters and torch's global RNG are restored afterwards.
    """
    path = REPO / "scripts" / script
    if main is None:
        main = _script_main(path)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environ(child_env(env)))
        stack.enter_context(contextlib.chdir(cwd))
        stack.enter_context(torch.random.fork_rng(devices=[]))
        stack.enter_context(warnings.catch_warnings())
        stack.callback(_reset_accelerate)
        saved_argv = sys.argv
        stack.callback(setattr, sys, "argv", saved_argv)
        sys.argv = [str(path), *args]
        _reset_accelerate()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse: --help, or a flag it cannot parse
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
    result = subprocess.CompletedProcess([sys.executable, str(path), *args], code, stdout.getvalue(),
                                         stderr.getvalue())  # fmt: skip
    if check and code != 0:
        raise AssertionError(f"{script} {' '.join(args)} returned {code}\n--- stdout ---\n{result.stdout[-4000:]}"
                             f"\n--- stderr ---\n{result.stderr[-6000:]}")  # fmt: skip
    return result


def machine_command(
    script: str, args: list[str], *, machine: int, port: int, worker_logs: Path | None = None
) -> list[str]:
    """One of two launchers on loopback, one process each, as two machines (``--num_machines 2``) running
    ``script`` with 2-process ZeRO-2 between them. With ``worker_logs``, torch elastic also writes the
    worker's own stdout and stderr under that folder (see ``worker_output``), apart from the launcher's log."""
    launch = ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine),
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
              "--deepspeed_multinode_launcher", "standard"]  # fmt: skip
    if worker_logs is not None:
        launch += ["--log_dir", str(worker_logs), "--tee", "3"]
    return launch_command(script, args, accelerate_config="cpu_zero2", launch_args=launch)


def worker_output(worker_logs: Path) -> str:
    """What the workers of one launch printed (stdout, then stderr), from the folder given to
    ``machine_command(worker_logs=...)``; the launcher's own log records are not in it."""
    files = sorted(worker_logs.rglob("stdout.log")) + sorted(worker_logs.rglob("stderr.log"))
    assert files, f"no worker output under {worker_logs}"
    return "".join(f.read_text() for f in files)


def train_base(root: Path, *args: str, accelerate_config: str | None = "cpu_zero2", **kwargs: Any):
    """A tiny base run under ``root`` (2-process ZeRO-2 by default)."""
    return run_script("train_base.py", base_argv(root, *args), accelerate_config=accelerate_config, **kwargs)


def base_argv(root: Path, *args: str) -> list[str]:
    """The flags of `train_base`: the tiny run under ``root``, then ``args``."""
    return [*TINY_RUN, "--checkpoint-root", str(root), *args]


def copy_runs(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint root that keeps its hard links (``best.ckpt``, stored bases), as ``cp -a``."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def metadata(run: Path) -> dict[str, Any]:
    """A run folder's ``metadata.json``."""
    return json.loads((run / "metadata.json").read_text())


def events(run: Path, kind: str) -> list[dict[str, Any]]:
    """The events of one kind in a run folder's ``metadata.json``."""
    return [e for e in metadata(run)["events"] if e["kind"] == kind]


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_close_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], bound: float = 1e-4) -> None:
    """Equal up to float rounding: the relative distance of the whole state, |b - a| / |a| over every tensor
    at once, is at most ``bound``. Two fp32 runs of the same training that differ only in the order of float sums
    (another process count, another CPU) measure up to 3e-6 here, although Adam turns rounding in a
    near-zero gradient into a larger step of that one element; one epoch of training moves a tiny run's state
    by 2e-2, and so does a lost optimizer state, RNG state or data position."""
    assert a.keys() == b.keys()
    diffs = {name: (b[name].double() - a[name].double()).norm() for name in a}
    norm = torch.stack([a[name].double().norm() for name in a]).norm()
    distance = float(torch.stack(list(diffs.values())).norm() / norm)
    worst = max(diffs, key=lambda name: float(diffs[name] / max(a[name].double().norm(), 1e-12)))
    assert distance <= bound, f"relative distance {distance:.2e} > {bound:.0e}; most changed: {worst}"


OLD_RUNS = sorted((REPO / "tests" / "fixtures").glob("before_checkpoint_package*"))
"""Runs written by the trainer as it was before checkpointing became a package (55ec783), each stopped by
SIGTERM after step 5: the same recipe on two kinds of machine, ``before_checkpoint_package`` on the CI
machine of 2026-11-30 and ``before_checkpoint_package_amd_avx2`` on an AMD EPYC with AVX2 only."""


def old_run(kind_folder: str, written_here: Path) -> tuple[Path, bool]:
    """The copy in ``OLD_RUNS`` of the old run in ``kind_folder`` (``base_training``, ``lora_finetuning``)
    written on a machine that computes as this one, and True; else the first copy, and False.

    ``written_here`` is the same training (seed, settings) run here; a machine computes as another if the
    first epoch's training loss is equal to the last bit and, where ``written_here`` still holds its
    epoch-1 checkpoint, so are its weights (the base runs' losses agree on both kinds of machine). CPUs of
    another kind (AVX-512 vs AVX2 kernels) round differently, so a run begun on one continues on the other
    equal only up to rounding: bit-identity across a resume is a promise about one kind of machine."""
    kind = "lora" if kind_folder == "lora_finetuning" else "base"
    weights = "state_dict" if kind == "base" else "lora_state_dict"
    here = metadata(written_here)["history"][0]["train_loss"]
    mine = RunLayout(written_here, kind).ckpt("epoch_001")
    for folder in OLD_RUNS:
        run = folder / kind_folder / "run_001"
        if metadata(run)["history"][0]["train_loss"] != here:
            continue
        if mine.is_file():
            a, b = load_ckpt(mine)[weights], load_ckpt(RunLayout(run, kind).ckpt("epoch_001"))[weights]
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                continue
        return folder / kind_folder, True
    return OLD_RUNS[0] / kind_folder, False


def train_lora(root: Path, *args: str, accelerate_config: str | None = "cpu_zero2", **kwargs: Any):
    """A tiny LoRA run on digits 0-4 under ``root``, on the newest completed base run there by default."""
    return run_script("train_lora.py", lora_argv(root, *args), accelerate_config=accelerate_config, **kwargs)


def lora_argv(root: Path, *args: str) -> list[str]:
    """The flags of `train_lora`: the tiny run on digits 0-4 under ``root``, then ``args``."""
    return [*TINY_RUN[2:], "--data", "digits_0_4", "--checkpoint-root", str(root), *args]


# --------------------------------------------------------------------------------------------------
# The reference run of the fault and continuation suites, and power cuts
# --------------------------------------------------------------------------------------------------

EPOCHS = ["--epochs", "4", "--set", "logging.sample_every_n_epochs=0"]
"""With ``TINY_RUN``: 4 epochs x 3 steps, no grids (the ``reference`` fixture's run, in conftest.py)."""


def final_weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = load_ckpt(run / "checkpoints" / "epoch_004.ckpt")
    assert ckpt["epoch"] == 4 and ckpt["global_step"] == 12
    return {"state_dict": ckpt["state_dict"], "ema_state_dict": ckpt["ema_state_dict"]}


def assert_bit_identical(
    run: Path, reference: dict[str, dict[str, torch.Tensor]], *, exact: bool = True
) -> None:
    """``run`` ends with the ``reference`` run's weights and EMA; only up to rounding (``assert_close_tensors``)
    where not ``exact``."""
    got = final_weights(run)
    same = assert_same_tensors if exact else assert_close_tensors
    same(reference["state_dict"], got["state_dict"])
    same(reference["ema_state_dict"], got["ema_state_dict"])


def assert_all_committed_intact(run: Path) -> list[str]:
    """Every committed checkpoint verifies against its manifest; returns their tags, oldest first."""
    folder = run / "checkpoints"
    manifests = read_manifests(folder)
    for m in manifests:
        assert verify(folder, m) is None, f"committed checkpoint {m.tag} is damaged: {verify(folder, m)}"
    return [m.tag for m in manifests]


def power_cut_at(
    root: Path,
    fault: str,
    args: list[str],
    timeout: float = 300,
    *,
    may_finish: bool = False,
    accelerate_config: str = "cpu_zero2",
) -> bool:
    """Launch, wait until a process pauses at ``fault``, then SIGKILL everything of the launch. Returns
    whether the point was reached; a launch that ends first fails the test, unless it ends well (exit 0)
    and ``may_finish`` says the run may complete before the point."""
    marker = root.parent / f"paused-{time.monotonic_ns()}"
    log = root.parent / f"{marker.name}.log"
    cmd = launch_command("train_base.py", base_argv(root, *args), accelerate_config=accelerate_config)
    env = child_env({"DIFFIT_FAULTS": fault, "DIFFIT_FAULT_MARKER": str(marker)})
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=root.parent
        )
    deadline = time.monotonic() + timeout
    while not marker.exists():
        ended = proc.poll() is not None
        if ended or time.monotonic() > deadline:
            power_off(proc, root)
            if ended and proc.returncode == 0 and may_finish:
                return False
            what = f"exit {proc.returncode}" if ended else f"still running after {timeout:.0f} s"
            pytest.fail(f"{fault!r} was never reached ({what}):\n{log.read_text()[-5000:]}")
        time.sleep(0.2)
    power_off(proc, root)
    return True


def power_off(proc: subprocess.Popen, root: Path) -> None:
    """SIGKILL the launcher's process group and every worker (torch elastic starts them in new sessions)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    needle = str(root).encode()
    killed: set[int] = set()
    for _ in range(50):
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline and int(pid) != os.getpid():
                alive.append(int(pid))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        if not alive:
            break
        killed.update(alive)
        time.sleep(0.1)
    proc.wait()
    deadline = time.monotonic() + 30  # a killed process's command line reads empty before it has ended
    while any(_running(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is neither a zombie nor gone (it may be a reused pid: then it waits a little
    longer than needed)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def without_permission_override() -> None:
    """``preexec_fn`` of a launched process: as root, give up overriding file permissions, so that it sees a
    read-only folder as a user does (CI runs as root). Linux only."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from what exec grants
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
