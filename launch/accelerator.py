"""Accelerator construction and backend choice.

The same code runs as ``python scripts/train_base.py`` (one process), under ``accelerate launch`` with DDP,
and with DeepSpeed ZeRO on GPUs or on the CPU. The CPU DeepSpeed path has three requirements that this
module owns: never ``cpu=True`` on the Accelerator (it silently disables DeepSpeed), a ``gloo`` process
group when there is no CUDA, and ``DS_ACCELERATOR=cpu`` set before DeepSpeed is imported.

It also holds what the launch itself asks, before the trainer plans its steps: launches not shaped as their
config evidently asked are refused (``refuse_unexpected_shape``), the launch config's gradient accumulation
and clipping are read (``launch_asks``), and DeepSpeed's config gets the run's values
(``configure_deepspeed``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from launch.collectives import DEFAULT_TIMEOUT
from launch.errors import LaunchError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def deepspeed_requested() -> bool:
    """True when ``accelerate launch`` was given a DeepSpeed config (it exports this for each process)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def prepare_environment() -> None:
    """Environment fixes that must happen before DeepSpeed or the process group is touched."""
    if not deepspeed_requested():
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's CPU communication op sizes its shared-memory segment by the local process count.
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
        remove_stale_shm_segments()
        # torch's "No CUDA runtime is found, using CUDA_HOME=..." from every rank, when DeepSpeed imports
        # torch's extension builder on a machine without CUDA: expected here, and nothing to act on.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise LaunchError(
            "this launch uses a DeepSpeed accelerate config, but DeepSpeed is not installed. Install it "
            "(pip install deepspeed; Linux only) or launch with --config_file "
            "configs/accelerate/single_process.yaml"
        ) from None
    # Accelerate opens deepspeed_config_file relative to the working directory; the configs in this
    # repo name it relative to the repo root, so resolve it there when launched from elsewhere.
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds_file and ds_file != "none" and not Path(ds_file).is_file() and (PROJECT_ROOT / ds_file).is_file():
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(PROJECT_ROOT / ds_file)


SHM_PREFIX = "deepspeed_allreduce_buffer_"


def remove_stale_shm_segments(shm: Path = Path("/dev/shm"), proc: Path = Path("/proc")) -> list[Path]:
    """Delete DeepSpeed CPU all-reduce segments (``/dev/shm``) of this user that no process has open.

    DeepSpeed names them by master address and port, and a process killed with SIGKILL leaves its 69 MB
    segment behind. A later launch on the same port then maps the stale segment, whose flags can hang the
    first all-reduce (and each one holds RAM). Every rank calls this before DeepSpeed starts; a segment in
    use is open in some process (DeepSpeed never closes it), so it is never touched.
    """
    prefix = f"{SHM_PREFIX}{os.getuid()}_"
    try:
        candidates = {p for p in shm.iterdir() if p.name.startswith(prefix)}
    except OSError:
        return []
    if not candidates:
        return []
    in_use: set[str] = set()
    for pid in filter(str.isdigit, os.listdir(proc)):
        try:
            for fd in os.scandir(proc / pid / "fd"):
                in_use.add(os.readlink(fd.path))
            with open(proc / pid / "maps") as maps:
                in_use.update(line.split()[-1] for line in maps if str(shm) in line)
        except OSError:  # the process ended or is not ours to inspect
            continue
    removed = []
    for path in sorted(candidates):
        if str(path) not in in_use:
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def release_shm_segment() -> None:
    """At the end of a launch, unlink this rank's DeepSpeed CPU all-reduce segment: DeepSpeed leaves it in
    ``/dev/shm`` even on a clean exit (69 MB per rank, per launch). Its memory goes when the process ends."""
    addr, port, rank = (os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if deepspeed_requested() and not torch.cuda.is_available() and addr and port and rank:
        (Path("/dev/shm") / f"{SHM_PREFIX}{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


def build_accelerator(
    timeout: timedelta = DEFAULT_TIMEOUT, *, accept_shape: bool = False, **kwargs: Any
) -> Any:
    """An ``accelerate.Accelerator`` on the right backend for this machine; collectives that wait longer
    than ``timeout`` for a peer fail instead of hanging. A launch not shaped as its config evidently asked
    is refused first (``refuse_unexpected_shape``), unless ``accept_shape``."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if not accept_shape:
        refuse_unexpected_shape(int(os.environ.get("WORLD_SIZE", "1")), cuda=torch.cuda.is_available())
    prepare_environment()
    # DeepSpeed 0.19 calls a collective PyTorch has deprecated; the warning, once per rank and step type,
    # tells a user nothing they can act on.
    warnings.filterwarnings(
        "ignore",
        message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
        category=FutureWarning,
    )
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo without CUDA: otherwise Accelerate falls back to a group each process believes it is alone in.
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
        init_restarted_process_group(backend, timeout)
    with _deepspeed_quiet():
        accelerator = Accelerator(kwargs_handlers=handlers, **kwargs)
    try:
        refuse_fp16_without_gpu(str(accelerator.mixed_precision), torch.cuda.is_available())
    except LaunchError:
        accelerator.end_training()  # a process group left to the interpreter's exit can abort the process
        raise
    return accelerator


SHM_OP = "deepspeed_shm_comm"
"""DeepSpeed's shared-memory collectives for the CPU, which it compiles the first time a machine uses it."""


@contextlib.contextmanager
def _deepspeed_quiet() -> Iterator[None]:
    """DeepSpeed's start without the line every rank prints on every launch ("DeepSpeed ... built
    successfully", as it loads its CPU op); instead, one notice from each machine's first process when that
    op is compiled (about a minute, once per machine)."""
    if not deepspeed_requested() or torch.cuda.is_available():
        yield
        return
    from torch.utils import cpp_extension

    built = Path(cpp_extension._get_build_directory(SHM_OP, verbose=False)) / f"{SHM_OP}.so"
    if not built.exists() and os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            "Compiling DeepSpeed's shared-memory op for the CPU (once per machine, about a minute)",
            flush=True,
        )
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            yield
    finally:
        for line in said.getvalue().splitlines():
            if not (line.startswith("DeepSpeed ") and line.endswith(" built successfully")):
                print(line, flush=True)


def refuse_fp16_without_gpu(precision: str, cuda: bool) -> None:
    """fp16 needs a GPU: DeepSpeed's CPU accelerator fails every rank with "Type fp16 is not supported on your
    device", and Accelerate without DeepSpeed trains such a launch in fp32 without a word."""
    if precision == "fp16" and not cuda:
        raise LaunchError(
            "this launch asks for fp16 mixed precision, which needs a GPU, and none is available: use bf16 "
            "(mixed_precision: bf16; configs/accelerate/cpu_zero2_bf16.yaml with DeepSpeed) or fp32 "
            "(mixed_precision: 'no')"
        )


def refuse_unexpected_shape(
    world_size: int, *, cuda: bool, env: dict[str, str] | None = None, proc: Path = Path("/proc")
) -> None:
    """Refuse a launch whose shape is not what its config evidently asked for (the override is the training
    scripts' ``--accept-launch``):

    - more processes on this machine than it has CPU cores, and no GPU: a config for GPUs
      (``multi_gpu_*.yaml``: 8 processes) launched here, which would train as that many CPU processes;
    - one process where ``accelerate launch`` was asked for several (``--num_processes N``, or the config's
      ``num_processes``) under ``use_cpu: true``, which ``accelerate config default`` writes: Accelerate
      then runs a single process, without a word.
    """
    env = dict(os.environ) if env is None else env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    here = int(env.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    if not cuda and here > cores:
        raise LaunchError(
            f"this launch starts {here} processes on a machine with {cores} CPU cores and no GPU, as a config for "
            "GPUs would (num_processes: 8 in multi_gpu_*.yaml); launch with configs/accelerate/cpu_zero2.yaml "
            "(or cpu_zero2_bf16.yaml) here, pass --num_processes to fit the cores, or --accept-launch to train "
            "as launched"
        )
    if world_size == 1 and env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "WORLD_SIZE" not in env:
        asked = _launcher_processes(proc)
        if asked is not None and asked > 1:
            raise LaunchError(
                f"accelerate launch was asked for {asked} processes but started 1: its config sets use_cpu: "
                "true (as `accelerate config default` writes), and Accelerate then runs one process. Launch with "
                "configs/accelerate/cpu_zero2.yaml for several processes on the CPU, or pass --accept-launch to "
                "train in one"
            )


def _launcher_processes(proc: Path) -> int | None:
    """The process count the ``accelerate launch`` that started this process was given (its
    ``--num_processes``, else its config file's ``num_processes``), or None when the parent is not one or
    cannot be read (not Linux, another user)."""
    import yaml

    try:
        parent = proc / str(os.getppid())
        argv = (parent / "cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = Path(os.readlink(parent / "cwd"))
    except OSError:
        return None
    if not any("accelerate" in part for part in argv[:3]):
        return None
    flags: dict[str, str] = {}
    for i, part in enumerate(argv):
        for flag in ("--num_processes", "--config_file"):
            if part == flag and i + 1 < len(argv):
                flags[flag] = argv[i + 1]
            elif part.startswith(flag + "="):
                flags[flag] = part.split("=", 1)[1]
    if "--num_processes" in flags:
        return int(flags["--num_processes"]) if flags["--num_processes"].isdigit() else None
    if "--config_file" not in flags:
        return None  # Accelerate's default config: what `accelerate config` wrote for this user
    try:
        config = yaml.safe_load((cwd / flags["--config_file"]).read_text())
    except (OSError, yaml.YAMLError):
        return None
    value = config.get("num_processes") if isinstance(config, dict) else None
    return value if isinstance(value, int) else None


def init_restarted_process_group(backend: str, timeout: timedelta) -> None:
    """In a worker that torch elastic restarted (``--max_restarts``), create the default process group in a
    store of this attempt's own; Accelerate and DeepSpeed then use it as it is.

    ``accelerate launch`` uses torch elastic's static rendezvous, whose store outlives the attempts and is
    shared without a per-attempt prefix: a restarted worker's process groups would read the addresses the
    dead attempt's processes published under the same keys, and fail ("Connection refused") or hang while
    connecting. The first attempt is left to Accelerate.
    """
    import torch.distributed as dist

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or dist.is_initialized():
        return
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    attempt_store = dist.PrefixStore(f"diffit/attempt_{restart}", store)
    dist.init_process_group(backend, store=attempt_store, rank=rank, world_size=world_size, timeout=timeout)


@dataclass(frozen=True)
class LaunchAsks:
    """Training settings the launch config itself gives (``None``: not given, or ``"auto"``): the trainer
    uses them or refuses the launch where its own settings disagree, and never overwrites them unsaid."""

    accumulation: int | None = None
    """``gradient_accumulation_steps``."""
    clipping: float | None = None
    """``gradient_clipping`` (DeepSpeed's max global gradient norm)."""
    source: str = "the accelerate config"
    """Where they were read, for messages."""


def launch_asks() -> LaunchAsks:
    """The gradient accumulation and clipping this launch's config gives: its DeepSpeed JSON's, when it names
    one, else the accelerate config's (``accelerate launch`` exports those as environment variables)."""
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if deepspeed_requested() and ds_file != "none":
        try:
            given = json.loads(Path(ds_file).read_text())
        except (OSError, ValueError):
            given = None  # Accelerate refuses the file itself
        if not isinstance(given, dict):
            given = {}
        source = f"the DeepSpeed config {ds_file}"
        accumulation, clipping = given.get("gradient_accumulation_steps"), given.get("gradient_clipping")
    else:
        source = "the accelerate config"
        accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        clipping = os.environ.get("ACCELERATE_GRADIENT_CLIPPING") if deepspeed_requested() else None
    return LaunchAsks(_asked(accumulation, int, "gradient_accumulation_steps", source),
                      _asked(clipping, float, "gradient_clipping", source), source)  # fmt: skip


def _asked(value: Any, cast: type, key: str, source: str) -> Any:
    if value is None or str(value).lower() == "auto":
        return None
    try:
        number = cast(value)
    except (TypeError, ValueError):
        number = None
    least = 1 if cast is int else 0
    if (
        number is None
        or isinstance(value, bool)
        or number < least
        or (cast is int and number != float(value))
    ):
        raise LaunchError(f'{source} sets {key} to {value!r}: give a number or "auto"')
    return number


def configure_deepspeed(accelerator: Any, *, micro_batch: int, accumulation: int, grad_clip: float) -> None:
    """Fill the DeepSpeed values the trainer owns, before ``accelerator.prepare``: the batch sizes, the
    gradient accumulation and clipping (which the launch config either left to the trainer or gave the
    same values: ``LaunchAsks``).

    DeepSpeed asserts train_batch_size == micro_batch × grad_accum × world_size; the trainer feeds its own
    batches (no DataLoader passes through ``prepare``), so Accelerate cannot infer them. Accelerate's own
    count is set too: it scales the loss of each micro-batch without DeepSpeed, and would otherwise replace
    DeepSpeed's value with it.
    """
    accelerator.gradient_accumulation_steps = accumulation
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch * accumulation * accelerator.num_processes
    config["gradient_clipping"] = grad_clip
    config.setdefault("steps_per_print", 10**9)  # DeepSpeed's own periodic prints would interleave with ours
