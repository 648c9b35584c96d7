"""Performance benchmarks as side-by-side ratios (issue 7): `make bench`.

    python benchmarks/perf.py                      # every figure; prints the table, writes benchmarks/results.md
    python benchmarks/perf.py --only stall,write   # some figures (the runs they need are made too)
    python benchmarks/perf.py --keep               # keep the scratch folder (runs and logs) for inspection
    python benchmarks/perf.py --flops              # training FLOPs per image of the model (for MFU, gpu.md)

Every figure is a ratio of two things measured in this run on this machine, each timed side the median of
>= 5 repetitions after a warm-up (sizes are measured once), never an absolute time; the one exception is
the listing time, which is bounded by reading metadata. The model is ``diffit_cifar`` (15.3 M parameters,
61 MB of fp32 weights; a checkpoint with EMA, Adam moments and the merged file is 367 MB), so checkpoint
I/O is far above noise. Data: a fake CIFAR-10 folder of random images in the official pickle format,
written here (no download). Except in the overhead figure, the sides of a ratio run one after the other,
so run it on a quiet machine: other load during one side only moves the figure.

What each side of each figure is (``Measurements`` below makes the runs; one function per figure):

overhead   Time of one epoch of ``hand_loop`` (a minimal Accelerate loop: same model, data order, global
           batch, process count, AdamW, ``model.edm_loss``, grad clipping; no EMA, no saves) ÷ the time
           between consecutive "Epoch N/M" lines of ``scripts/train_base.py`` (the same steps plus EMA,
           progress bar, tensorboard logging, metadata, and a checkpoint every epoch: its snapshot, and its
           background writing, which competes with training for the CPU and is waited for at the next
           save). ``--rounds`` trainer launches and as many hand-loop launches run at once but take turns
           (``time_sliced``: 1 s each, the others stopped meanwhile), and each is timed on its own running
           clock, so that both sides see the same machine: on a shared machine, speed drifts by ±10% within
           a minute, so two programs run one after the other differ by that much whatever they do. Medians
           over the trainer launches' epochs 2..M (epoch 1 and process start-up are their warm-up) and over
           the hand-loop launches' epochs (after 2 warm-up steps; they run until the trainer runs end).
           Both sides train only: the trainer gets an empty validation split and no sample grids.
stall      Per save, seconds the loop was blocked (``history[i].save_blocked_seconds`` in metadata.json)
           ÷ one step (``hand_loop``'s median epoch ÷ its steps), with ``async_save`` on, over the same
           with it off. A synchronous save blocks the loop for the whole save, so in that mode the save's
           duration counts when the trainer's own figure is smaller. Both runs save every epoch; the
           async run's epochs (2 steps) are long enough for a background save to end before the next save,
           whose wait would count, as it should. (The overhead figure's trainer runs take turns with other
           processes, so their wall-clock timings are not used.)
write      Checkpoint bytes (every file of the save, as the trainer reports them) ÷ the duration of a
           synchronous save (snapshot, serialisation, writes, fsyncs, merged file, sha256 manifest,
           last/best links, retention), over the bytes/s of writing as many bytes to one plain file in the
           same folder and fsyncing it (``dd conv=fsync``-like, 16 MiB blocks from memory). Medians of 10
           saves and 10 plain writes: a shared disk's speed varies by ±20% from one write to the next.
merge      ``trainer.checkpoint.sharding.zero_merge.merge_zero_shards`` on the ZeRO-2 shards of a real 2-process DeepSpeed run
           ÷ DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` on the same shards (same process,
           alternated, files in the page cache; the results are checked to be equal).
adapter    Bytes of a LoRA run's epoch checkpoint (default blockwise config, CIFAR-100 trees) ÷ the bytes
           of the base checkpoint file it adapts (``epoch_NNN.ckpt``: weights + EMA), and ÷ the analytic
           size: trainable parameters × 4 bytes × 4 states (weights, EMA, Adam exp_avg, exp_avg_sq).
resume     Seconds from ``Popen`` to the end of the first optimizer step (the trainer's test-only fault
           injection writes a marker file there and pauses) when resuming the synchronous run's last
           checkpoint ÷ when starting a fresh run. Target: 1.2 + the time to read that checkpoint's bytes at
           the checkpoint write rate of ``write``, divided by the fresh time.
listing    ``scripts/train_base.py --list-runs`` over 1,000 synthetic runs (metadata.json as the trainer
           writes it, 20 epochs of history each), whole command including interpreter start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import pickle
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

RESULTS = REPO / "benchmarks" / "results.md"

# --------------------------------------------------------------------------------------------------
# Settings: sized so that `make bench` takes ~12 minutes on 2 CPU cores (measured; see results.md)
# --------------------------------------------------------------------------------------------------

MODEL = "diffit_cifar"
BATCH = 4  # global batch; one diffit_cifar step at batch 4 takes ~2.6 s on one CPU core
STEPS_PER_EPOCH = 10  # ~27 s epochs, each ending in a ~370 MB checkpoint (a far heavier save load than a
#                       real run's: a CIFAR-10 epoch is 390 steps at batch 128)
EPOCHS = 4  # per trainer launch of the overhead figure: epoch 1 is the warm-up, epochs 2..4 repetitions
ROUNDS = 2  # trainer launches of the overhead figure (6 repetitions), each run beside a hand-loop launch
SLICE_SECONDS = 1.0  # the overhead figure's processes take turns of this long (``time_sliced``)
HAND_LOOP_WARMUP_STEPS = 2  # the hand loop's warm-up (it has no start-up work to amortise)
SYNC_STEPS_PER_EPOCH = 1  # the synchronous run measures saves, not epochs: short epochs, same saves
ASYNC_STEPS_PER_EPOCH = 2  # the stall figure's background run: epochs just long enough for a save to end
REPS = 5  # repetitions after one warm-up, for everything timed
WRITE_REPS = (
    10  # for the write figure: disk speed on a shared machine varies by ±20% from one write to the next
)
LISTED_RUNS = 1000
TARGETS = {
    "overhead": (">=", 0.97),
    "stall": ("<=", 0.10),
    "write": (">=", 0.80),
    "merge": ("<=", 1.0),
    "adapter_base": ("<=", 0.05),
    "adapter_analytic": ("<=", 1.1),
    "resume": ("<=", None),  # 1.2 + the checkpoint's load allowance, computed from the run
    "listing": ("<", 1.0),
}
ORDER = ["overhead", "stall", "write", "merge", "adapter", "resume", "listing"]


class BenchError(RuntimeError):
    """A launch or measurement that failed; the message says where its log is."""


# --------------------------------------------------------------------------------------------------
# Figures and the table
# --------------------------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: float | None
    """None: not measurable in this run (the note says why)."""
    op: str
    target: float
    unit: str = ""
    detail: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return {
            "<=": self.value <= self.target,
            ">=": self.value >= self.target,
            "<": self.value < self.target,
        }[self.op]

    def row(self) -> list[str]:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]
        value = "n/a" if self.value is None else f"{self.value:.3f}{self.unit}"
        return [self.name, value, f"{self.op} {self.target:.3g}{self.unit}", mark, self.detail]


def figure(
    key: str, name: str, value: float | None, detail: str, target: float | None = None, unit: str = ""
) -> Figure:
    op, default = TARGETS[key]
    goal = target if target is not None else default
    assert goal is not None
    return Figure(name, value, op, goal, unit, detail)


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """``median (min-max, n=N)`` of a list of seconds, for the detail column."""
    return f"{median(values):.3g} s ({min(values):.3g}-{max(values):.3g}, n={len(values)})"


def table(figures: list[Figure]) -> str:
    rows = [
        ["figure", "value", "target", "", "how (medians of the repetitions)"],
        *[f.row() for f in figures],
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 30)
    return "\n".join(lines)


def markdown(figures: list[Figure], context: dict[str, str]) -> str:
    out = [
        "# Performance ratios",
        "",
        "Written by `benchmarks/perf.py` (`make bench`); what each figure compares is in that file's docstring. "
        "Every figure is a ratio of two things measured in the same run on the same machine (medians of >= "
        f"{REPS} repetitions after a warm-up), except the listing time.",
        "",
        *[f"- {k}: {v}" for k, v in context.items()],
        "",
        "| figure | value | target | | how |",
        "|---|---|---|---|---|",
    ]
    out += ["| " + " | ".join(c.replace("|", "/") for c in f.row()) + " |" for f in figures]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# Launching the scripts (the same way tests/helpers.py does: one thread per process)
# --------------------------------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"})
    env.setdefault("WANDB_MODE", "offline")
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Setup:
    """How the training sides run: sizes and launch (the defaults fit 2 CPU cores; gpu.md has GPU values)."""

    batch: int = BATCH
    steps: int = STEPS_PER_EPOCH
    epochs: int = EPOCHS
    accelerate_config: str | None = None
    """configs/accelerate/NAME.yaml for the trainer and the hand loop; None: one process, plain python."""
    num_processes: int | None = None
    """accelerate launch --num_processes (overrides the config's)."""
    zero_config: str = "cpu_zero2"
    """The ZeRO-2 config of the merge run (always launched with 2 processes)."""
    rounds: int = ROUNDS
    """Trainer launches of the overhead figure (``epochs`` each), and as many hand-loop launches."""
    slice_seconds: float = SLICE_SECONDS
    """How long each of the overhead figure's processes runs at a turn."""

    def describe(self) -> str:
        if self.accelerate_config is None:
            return "one process (python)"
        n = f", {self.num_processes} processes" if self.num_processes else ""
        return f"accelerate launch {self.accelerate_config}{n}"


def command(
    script: Path, args: list[str], accelerate_config: str | None = None, num_processes: int | None = None
) -> list[str]:
    """``python SCRIPT ARGS`` or ``accelerate launch --config_file configs/accelerate/NAME.yaml SCRIPT ARGS``."""
    if accelerate_config is None:
        return [sys.executable, str(script), *args]
    extra = [] if num_processes is None else ["--num_processes", str(num_processes)]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    config = REPO / "configs" / "accelerate" / f"{accelerate_config}.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", port, *extra, str(script), *args]  # fmt: skip


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


def start_process(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``cmd`` in its own session (so that its whole process group can be signalled), stdout piped to
    the caller, stderr to ``log`` after a line naming the command."""
    with open(log, "w") as err:
        err.write("$ " + " ".join(cmd) + "\n")
        err.flush()
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(env), cwd=REPO,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def append_stdout(log: Path, lines: list[tuple[float, str]], clock: str) -> None:
    with open(log, "a") as f:
        f.write(f"--- stdout ({clock}) ---\n" + "\n".join(f"[{t:8.3f}] {text}" for t, text in lines) + "\n")


def exited(cmd: list[str], code: int, log: Path) -> str:
    return f"{' '.join(cmd[:4])} ... exited {code}; see {log}"


def launch(cmd: list[str], log: Path, *, timeout: float = 900, env: dict[str, str] | None = None) -> Launch:
    """Run ``cmd`` to completion, timestamping its stdout lines as they arrive; stderr goes to ``log``."""
    lines: list[tuple[float, str]] = []
    begin = time.perf_counter()
    proc = start_process(cmd, log, env)
    watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
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
    return Launch(lines, log)


class Job(NamedTuple):
    """One process of ``time_sliced``."""

    cmd: list[str]
    log: Path
    finite: bool
    """True: it must exit 0 by itself. False: it runs until every finite job has ended, then it is killed."""


def time_sliced(jobs: list[Job], *, slice_seconds: float, timeout: float = 1800) -> list[Launch]:
    """Run ``jobs`` at once but never two at a time: they take turns of ``slice_seconds`` in list order,
    every other process group stopped (SIGSTOP) meanwhile. Each stdout line is stamped with the seconds its
    process had been allowed to run until then: its own running clock, not wall time.

    On a shared machine, speed drifts by ±10% within a minute. Run one after the other, two programs'
    timings differ by that much whatever they do; taking turns of a second, they see the same machine.
    The processes' start-up is sliced too. When the last finite job has ended, the others are killed.
    ``Launch.turns`` has the (start, end) ``perf_counter`` pairs when each process was let run.
    """
    procs: list[subprocess.Popen[str]] = []
    received: list[list[tuple[float, str]]] = [[] for _ in jobs]
    turns: list[list[tuple[float, float]]] = [[] for _ in jobs]
    readers: list[threading.Thread] = []

    def read(i: int) -> None:
        stdout = procs[i].stdout
        assert stdout is not None
        for line in stdout:  # text mode: tqdm's \r also ends a line
            received[i].append((time.perf_counter(), line.rstrip("\n")))

    def failure() -> str | None:
        """Any job that has exited with an error (before the killing, which only ends the loop below)."""
        for job, proc in zip(jobs, procs):
            if proc.poll() not in (None, 0):
                return exited(job.cmd, proc.returncode, job.log)
        return None

    try:
        for i, job in enumerate(jobs):
            procs.append(start_process(job.cmd, job.log))
            os.killpg(procs[i].pid, signal.SIGSTOP)
            readers.append(threading.Thread(target=read, args=(i,), daemon=True))
            readers[-1].start()
        deadline = time.perf_counter() + timeout
        i = 0
        while any(job.finite and proc.poll() is None for job, proc in zip(jobs, procs)):
            if failure():
                break
            if time.perf_counter() > deadline:
                raise BenchError(f"time-sliced jobs not done within {timeout:.0f} s; see {jobs[0].log}")
            proc = procs[i]
            if proc.poll() is None:
                start = time.perf_counter()
                os.killpg(proc.pid, signal.SIGCONT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(slice_seconds)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGSTOP)
                turns[i].append((start, time.perf_counter()))
            i = (i + 1) % len(jobs)
        error = failure()
        if error:
            raise BenchError(error)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also ends a stopped group, and any orphaned workers
            proc.wait()
        for reader in readers:
            reader.join()
        for job in jobs:
            remove_deepspeed_shm(job.cmd)

    def running_clock(i: int, t: float) -> float:
        return sum(max(0.0, min(end, t) - start) for start, end in turns[i])

    launches = []
    for i, job in enumerate(jobs):
        lines = [(running_clock(i, t), text) for t, text in received[i]]
        append_stdout(job.log, lines, "seconds of running clock")
        launches.append(Launch(lines, job.log, turns[i]))
    return launches


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
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(env), cwd=REPO,
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


# --------------------------------------------------------------------------------------------------
# Fake CIFAR folders (the official pickle layout, read by data/cifar.py)
# --------------------------------------------------------------------------------------------------


def write_fake_cifar(root: Path, *, train_images: int, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with ``train_images`` random images over the 5 training files, an empty
    test split (no validation: the hand loop has none either), and ``root/cifar-100-python`` with 4 random
    training images and 1 test image per fine class (for the LoRA run on the trees superclass)."""
    import numpy as np

    from data.cifar import CIFAR10_NAMES, CIFAR100_FINE_NAMES, CIFAR100_SUPERCLASSES

    rng = np.random.default_rng(seed)

    def dump(path: Path, content: dict[str, Any]) -> None:
        with open(path, "wb") as f:
            pickle.dump(content, f, protocol=2)

    def images(n: int) -> Any:
        return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)

    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True, exist_ok=True)
    per_file = [train_images // 5 + (i < train_images % 5) for i in range(5)]
    for i, n in enumerate(per_file, start=1):
        dump(c10 / f"data_batch_{i}", {"data": images(n), "labels": [int(x) for x in rng.integers(0, 10, n)]})
    dump(c10 / "test_batch", {"data": images(0), "labels": []})
    dump(c10 / "batches.meta", {"label_names": CIFAR10_NAMES})

    c100 = root / "cifar-100-python"
    c100.mkdir(parents=True, exist_ok=True)
    coarse = {f: c for c, name in enumerate(CIFAR100_SUPERCLASSES) for f in CIFAR100_SUPERCLASSES[name]}
    for file, per_class in (("train", 4), ("test", 1)):
        fine = [i % 100 for i in range(100 * per_class)]
        dump(c100 / file, {"data": images(len(fine)), "fine_labels": fine,
                           "coarse_labels": [coarse[CIFAR100_FINE_NAMES[i]] for i in fine]})  # fmt: skip
    dump(
        c100 / "meta",
        {"fine_label_names": CIFAR100_FINE_NAMES, "coarse_label_names": list(CIFAR100_SUPERCLASSES)},
    )
    return root


# --------------------------------------------------------------------------------------------------
# The baseline: a minimal hand-written Accelerate loop
# --------------------------------------------------------------------------------------------------


def bench_overrides(data_root: Path, *, batch: int, steps: int, epochs: int) -> list[tuple[str, Any]]:
    """The run both sides train: diffit_cifar on the fake CIFAR-10 folder."""
    return [("model", MODEL), ("data", "cifar10"), ("data.root", str(data_root)), ("batch_size", batch),
            ("max_steps_per_epoch", steps), ("epochs", epochs)]  # fmt: skip


def hand_loop(data_root: Path, *, batch: int, steps: int, epochs: int, warmup_steps: int) -> None:
    """The simplest loop that trains the same model on the same batches: ``warmup_steps`` steps, then
    ``epochs`` epochs of ``steps`` steps. Rank 0 prints "Epoch 0/N: warm-up" after the warm-up and
    "Epoch K/N: hand loop" after each epoch, for whoever launched it to time (``time_sliced``).

    Run as its own process (``--hand-loop``), plain or under ``accelerate launch``, like the trainer.
    """
    import torch

    from data.order import epoch_order
    from launch import build_accelerator, configure_deepspeed
    from model import edm_loss
    from trainer.config import CONFIG_DIR, build_config
    from trainer.factory import build_model, load_data, resolve_model_against_data

    config = build_config(
        CONFIG_DIR / "training" / "base_training.yaml",
        bench_overrides(data_root, batch=batch, steps=steps, epochs=epochs),
    )
    splits = load_data(config)
    resolve_model_against_data(config, splits)
    accelerator = build_accelerator()  # the plain Accelerator, with the gloo/DeepSpeed setup a CPU needs
    rank, world = accelerator.process_index, accelerator.num_processes
    configure_deepspeed(accelerator, micro_batch=batch // world, grad_clip=config.grad_clip)
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=tuple(config.betas),
                                  weight_decay=config.weight_decay)  # fmt: skip
    model, optimizer = accelerator.prepare(model, optimizer)
    deepspeed = accelerator.state.deepspeed_plugin is not None
    model.train()
    generator = torch.Generator(accelerator.device).manual_seed(config.seed)
    for epoch in range(epochs + 1):  # "epoch" 0: the warm-up steps
        order = epoch_order(
            len(splits.train), batch, seed=config.seed, epoch=epoch, random_flip=config.data.random_flip
        )
        for step in range(steps if epoch else warmup_steps):
            indices, flips = order.for_rank(step % order.steps, rank, world)  # warm-up may wrap around
            images, labels = splits.train.batch(indices, flips)
            loss = edm_loss(model, images.to(accelerator.device), labels.to(accelerator.device),
                            num_classes=int(config.model.num_classes or 0),
                            label_dropout=config.model.label_dropout, generator=generator,
                            p_mean=config.edm.p_mean, p_std=config.edm.p_std, sigma_data=config.edm.sigma_data,
                            share=(rank, world))  # fmt: skip
            accelerator.backward(loss)
            if not deepspeed:  # DeepSpeed clips inside its step
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # what any loop logs; also waits for the step on a GPU
        if rank == 0:
            print(f"Epoch {epoch}/{epochs}: {'hand loop' if epoch else 'warm-up'}", flush=True)
    accelerator.end_training()


# --------------------------------------------------------------------------------------------------
# The runs every figure is computed from (each made once, when first needed)
# --------------------------------------------------------------------------------------------------

EPOCH_LINE = re.compile(r"^Epoch (\d+)/(\d+): ")
SAVED_LINE = re.compile(r"^Saved (\S+) \(([\d.]+) MB(?: in|,) ([\d.]+) s(.*)$")


@dataclass
class TrainerRun:
    path: Path
    """The run folder (``<root>/base_training/run_001``)."""
    epoch_stamps: list[float]
    """Seconds after launch at which each "Epoch N/M" line arrived."""
    saves: list[dict[str, Any]]
    """Per "Saved" line: file, bytes, seconds (the whole save), waited (a synchronous save)."""
    history: list[dict[str, Any]] = field(default_factory=list)


def epoch_stamps(result: Launch) -> list[float]:
    """When each "Epoch N/M: " line of the launch's stdout arrived."""
    return [t for t, line in result.lines if EPOCH_LINE.match(line)]


def parse_trainer_run(result: Launch, path: Path) -> TrainerRun:
    stamps = epoch_stamps(result)
    saves = []
    for _, line in result.lines:
        m = SAVED_LINE.match(line)
        if m:
            saves.append({"file": m.group(1), "bytes": float(m.group(2)) * 1e6, "seconds": float(m.group(3)),
                          "waited": "while training waited" in m.group(4)})  # fmt: skip
    history = json.loads((path / "metadata.json").read_text())["history"]
    return TrainerRun(path, stamps, saves, history)


class Measurements:
    """The launches shared by the figures, each made on first use, in a scratch folder."""

    def __init__(self, work: Path, setup: Setup) -> None:
        self.work, self.setup = work, setup
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_root = write_fake_cifar(work / "datasets", train_images=setup.batch * setup.steps)

    def command(self, script: str, args: list[str]) -> list[str]:
        """A training-side launch (``scripts/<script>``, or this file for the hand loop) as ``setup`` says."""
        path = Path(__file__) if script == "perf.py" else REPO / "scripts" / script
        return command(path, args, self.setup.accelerate_config, self.setup.num_processes)

    def trainer_args(self, root: Path, *, steps: int, epochs: int, extra: tuple[str, ...] = ()) -> list[str]:
        args = ["--model", MODEL, "--data", "cifar10", "--set", f"data.root={self.data_root}",
                "--batch-size", str(self.setup.batch), "--max-steps-per-epoch", str(steps),
                "--epochs", str(epochs), "--set", "warmup_steps=0", "--set", "logging.sample_every_n_epochs=0",
                "--checkpoint-root", str(root)]  # fmt: skip
        return args + list(extra)

    def train(
        self, name: str, *, steps: int, epochs: int | None = None, extra: tuple[str, ...] = ()
    ) -> TrainerRun:
        root, epochs = self.work / name, epochs or self.setup.epochs
        args = self.trainer_args(root, steps=steps, epochs=epochs, extra=extra)
        print(f"  train_base.py '{name}': {epochs} epochs of {steps} steps ...", flush=True)
        result = launch(self.command("train_base.py", args), self.logs / f"{name}.log")
        return parse_trainer_run(result, root / "base_training" / "run_001")

    @cached_property
    def interleaved(self) -> tuple[list[float], list[TrainerRun]]:
        """The overhead figure's launches: ``rounds`` trainer runs and as many hand loops, all at once,
        taking turns (``time_sliced``), so that a machine that speeds up or slows down meanwhile moves
        both sides alike.

        Returns (seconds per epoch of the hand-written loops, the trainer's runs), in running clock. The
        hand loops have no epoch limit that they reach: they run until the trainer runs have ended."""
        s = self.setup
        extra = ("--set", "checkpoint.async_save=true", "--set", "logging.trackers=[tensorboard]")
        hand = ["--hand-loop", str(self.data_root), "--batch-size", str(s.batch),
                "--steps-per-epoch", str(s.steps), "--epochs", str(10 * s.epochs)]  # fmt: skip
        jobs, roots = [], []
        for i in range(1, s.rounds + 1):
            roots.append(self.work / f"async{i}")
            args = self.trainer_args(roots[-1], steps=s.steps, epochs=s.epochs, extra=extra)
            jobs.append(Job(self.command("train_base.py", args), self.logs / f"async{i}.log", finite=True))
            jobs.append(Job(self.command("perf.py", hand), self.logs / f"hand_loop_{i}.log", finite=False))
        print(f"  {s.rounds} x train_base.py ({s.epochs} epochs of {s.steps} steps) and {s.rounds} hand-written "
              f"loops, taking turns of {s.slice_seconds:g} s ...", flush=True)  # fmt: skip
        launches = time_sliced(jobs, slice_seconds=s.slice_seconds)
        runs = [parse_trainer_run(launch, root / "base_training" / "run_001")
                for launch, root in zip(launches[0::2], roots)]  # fmt: skip
        seconds = [b - a for launch in launches[1::2] for a, b in itertools.pairwise(epoch_stamps(launch))]
        return seconds, runs

    @property
    def baseline(self) -> list[float]:
        """Seconds per epoch of the hand-written loop."""
        return self.interleaved[0]

    @property
    def trainer_runs(self) -> list[TrainerRun]:
        """The trainer as users run it (async saves every epoch, progress bar, tensorboard logging), timed
        in running clock: the overhead figure's runs."""
        return self.interleaved[1]

    @cached_property
    def step_seconds(self) -> float:
        """One training step: the hand loop's median epoch over its steps."""
        return median(self.baseline) / self.setup.steps

    @cached_property
    def async_run(self) -> TrainerRun:
        """Background saves every epoch, on the wall clock (the overhead figure's runs take turns)."""
        steps = min(ASYNC_STEPS_PER_EPOCH, self.setup.steps)
        extra = ("--set", "checkpoint.async_save=true")
        return self.train("async", steps=steps, epochs=REPS + 2, extra=extra)

    @cached_property
    def sync_run(self) -> TrainerRun:
        """Synchronous saves every epoch; short epochs, since only the saves are measured."""
        steps = min(SYNC_STEPS_PER_EPOCH, self.setup.steps)
        extra = ("--set", "checkpoint.async_save=false")
        return self.train("sync", steps=steps, epochs=WRITE_REPS + 1, extra=extra)

    @cached_property
    def zero_run(self) -> Path:
        """The resumable state (ZeRO-2 shards) of a 2-process DeepSpeed run of one step."""
        root = self.work / "zero"
        args = self.trainer_args(root, steps=1, epochs=1, extra=("--set", "checkpoint.async_save=false"))
        print(f"  2-process DeepSpeed run ({self.setup.zero_config}): 1 step ...", flush=True)
        cmd = command(REPO / "scripts" / "train_base.py", args, self.setup.zero_config, num_processes=2)
        launch(cmd, self.logs / "zero.log")
        return root / "base_training" / "run_001" / "checkpoints" / "state" / "epoch_001"

    @cached_property
    def lora_run(self) -> Path:
        """A LoRA run of one step on the synchronous run's model (CIFAR-100 trees, default blockwise config)."""
        root = self.work / "lora"
        args = ["--base-checkpoint", str(self.sync_run.path), "--data", "cifar100_trees_only",
                "--set", f"data.root={self.data_root}", "--batch-size", str(self.setup.batch),
                "--max-steps-per-epoch", "1", "--epochs", "1", "--set", "warmup_steps=0",
                "--set", "logging.sample_every_n_epochs=0", "--checkpoint-root", str(root)]  # fmt: skip
        print("  train_lora.py: 1 step ...", flush=True)
        launch(self.command("train_lora.py", args), self.logs / "lora.log")
        return root / "lora_finetuning" / "run_001"

    @cached_property
    def write_rates(self) -> tuple[list[float], list[float], float]:
        """(checkpoint bytes/s per synchronous save after the first, plain-file bytes/s per repetition, bytes)."""
        saves = [s for s in self.sync_run.saves if s["file"].endswith(".ckpt")][1:]
        nbytes = median([s["bytes"] for s in saves])
        folder = self.sync_run.path / "checkpoints"
        plain = [nbytes / plain_write_seconds(folder, int(nbytes)) for _ in range(WRITE_REPS + 1)][1:]
        return [s["bytes"] / s["seconds"] for s in saves], plain, nbytes


def plain_write_seconds(folder: Path, nbytes: int, block: int = 16 << 20) -> float:
    """Seconds to write ``nbytes`` to a new file in ``folder`` and fsync it (the file is removed after)."""
    data = memoryview(os.urandom(block))
    path = folder / "plain_write.bin"
    os.sync()  # pay for no earlier writes still in the page cache
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(data[: min(left, block)])
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


# --------------------------------------------------------------------------------------------------
# The figures, one function each
# --------------------------------------------------------------------------------------------------


def trainer_overhead(m: Measurements) -> list[Figure]:
    loop = m.baseline
    intervals = [b - a for run in m.trainer_runs for a, b in itertools.pairwise(run.epoch_stamps)]
    ratio = median(loop) / median(intervals)
    s = m.setup
    images = s.batch * s.steps
    detail = (
        f"epoch of {s.steps} steps x {s.batch} images: hand loop {spread(loop)} "
        f"({images / median(loop):.2f} img/s) vs train_base.py {spread(intervals)} "
        f"({images / median(intervals):.2f} img/s) with a ~{m.trainer_runs[0].saves[0]['bytes'] / 1e6:.0f} MB "
        f"async save each epoch; {s.rounds} trainer and {s.rounds} hand-loop launches taking turns of "
        f"{s.slice_seconds:g} s, timed on their own running clocks; "
        f"{s.describe()}"
    )
    return [figure("overhead", "trainer overhead (img/s trainer / hand loop)", ratio, detail)]


def blocked_per_save(run: TrainerRun) -> tuple[list[float], str]:
    """Seconds the loop was blocked by each save after the first, and a note on where they come from."""
    entries = [h for h in run.history if h.get("checkpoint")][1:]
    if not entries or any("save_blocked_seconds" not in h for h in entries):
        return [], "metadata.json history has no save_blocked_seconds"
    blocked = [float(h["save_blocked_seconds"]) for h in entries]
    waited = [s for s in run.saves if s["waited"]][1:]
    # A synchronous save blocks the loop for all of it; trainers before 0418290 counted the snapshot only.
    # (The printed duration is rounded to 0.01 s.)
    if (
        waited
        and len(waited) == len(blocked)
        and any(s["seconds"] > b + 0.01 for s, b in zip(waited, blocked))
    ):
        blocked = [max(b, s["seconds"]) for b, s in zip(blocked, waited)]
        return blocked, "whole save durations; the trainer's save_blocked_seconds counts the snapshot only"
    return blocked, "save_blocked_seconds"


def checkpoint_stall(m: Measurements) -> list[Figure]:
    step = m.step_seconds
    sync, sync_note = blocked_per_save(m.sync_run)
    asyn, async_note = blocked_per_save(m.async_run)
    if not sync or not asyn:
        return [
            figure("stall", "checkpoint stall (async / sync)", None, sync_note if not sync else async_note)
        ]
    sync_steps, async_steps = median(sync) / step, median(asyn) / step
    detail = (
        f"blocked per save: async {spread(asyn)} = {async_steps:.3f} steps, sync {spread(sync)} = "
        f"{sync_steps:.2f} steps (sync: {sync_note}); one step = {step:.3f} s (hand loop)"
    )
    return [figure("stall", "checkpoint stall (async / sync, in steps)", async_steps / sync_steps, detail)]


def write_efficiency(m: Measurements) -> list[Figure]:
    ckpt, plain, nbytes = m.write_rates
    detail = (
        f"{nbytes / 1e6:.0f} MB per checkpoint: synchronous save {median(ckpt) / 1e6:.0f} MB/s "
        f"(n={len(ckpt)}) vs one plain fsynced file {median(plain) / 1e6:.0f} MB/s "
        f"({min(plain) / 1e6:.0f}-{max(plain) / 1e6:.0f}, n={len(plain)})"
    )
    return [
        figure(
            "write",
            "write efficiency (checkpoint MB/s / plain file MB/s)",
            median(ckpt) / median(plain),
            detail,
        )
    ]


def merge_cost(m: Measurements) -> list[Figure]:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.checkpoint.sharding.zero_merge import merge_zero_shards

    folder = m.zero_run

    def deepspeed_merge() -> dict[str, Any]:
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # progress and notes
            return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)

    ours, theirs = merge_zero_shards(folder), deepspeed_merge()  # the warm-up, and the equality check
    differ = [k for k in theirs if k not in ours or not torch.equal(ours[k].float(), theirs[k].float())]
    if differ:
        raise BenchError(
            f"merge_zero_shards differs from zero_to_fp32 on {len(differ)} tensors, e.g. {differ[:3]}"
        )
    del ours, theirs
    times: dict[str, list[float]] = {"ours": [], "deepspeed": []}
    for rep in range(REPS):  # alternated, starting with each in turn, so drift hits both alike
        pair: list[tuple[str, Callable[[], Any]]] = [
            ("ours", lambda: merge_zero_shards(folder)),
            ("deepspeed", deepspeed_merge),
        ]
        for name, merge in pair if rep % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            merge()
            times[name].append(time.perf_counter() - start)
    shards = sum(p.stat().st_size for p in folder.glob("*.pt"))
    detail = (
        f"{shards / 1e6:.0f} MB of ZeRO-2 shards from 2 processes: merge_zero_shards {spread(times['ours'])} "
        f"vs zero_to_fp32 {spread(times['deepspeed'])}; equal results"
    )
    return [
        figure(
            "merge",
            "merge cost (ours / DeepSpeed zero_to_fp32)",
            median(times["ours"]) / median(times["deepspeed"]),
            detail,
        )
    ]


def adapter_size(m: Measurements) -> list[Figure]:
    import torch

    run = m.lora_run
    manifests = sorted((run / "lora_weights" / "manifests").glob("epoch_*.json"))
    adapter = run / "lora_weights" / f"{manifests[-1].stem}.ckpt"
    base = run / "base_model" / "base_model.ckpt"
    ckpt = torch.load(adapter, map_location="cpu", weights_only=True)
    trainable = sum(t.numel() for t in ckpt["lora_state_dict"].values())
    analytic = trainable * 4 * 4  # fp32 weights, EMA, Adam exp_avg and exp_avg_sq
    size, base_size = adapter.stat().st_size, base.stat().st_size
    return [
        figure("adapter_base", "adapter size (LoRA ckpt / base ckpt)", size / base_size,
               f"{size / 1e6:.2f} MB vs {base_size / 1e6:.1f} MB (base epoch file: weights + EMA)"),
        figure("adapter_analytic", "adapter size (LoRA ckpt / analytic)", size / analytic,
               f"analytic {trainable:,} trainable parameters x 4 B x 4 states = {analytic / 1e6:.2f} MB"),
    ]  # fmt: skip


def resume_latency(m: Measurements) -> list[Figure]:
    run = m.sync_run
    manifests = sorted((run.path / "checkpoints" / "manifests").glob("*.json"))
    newest = json.loads(manifests[-1].read_text())
    step, nbytes = int(newest["global_step"]), sum(f["bytes"] for f in newest["files"].values())
    fresh_cmd = m.command("train_base.py", m.trainer_args(m.work / "fresh", steps=m.setup.steps, epochs=1))
    resume_args = [
        "--checkpoint-root",
        str(run.path.parent.parent),
        "--resume",
        "1",
        "--epochs",
        str(int(newest["epoch"]) + 1),  # one more epoch than the run has done
    ]
    resume_cmd = m.command("train_base.py", resume_args)
    print(f"  {REPS + 1} fresh launches and {REPS + 1} resumes, each to its first step ...", flush=True)
    fresh, resumed = [], []
    for rep in range(REPS + 1):  # alternated; the first of each is the warm-up
        fresh.append(seconds_to_step(fresh_cmd, 1, m.logs / f"fresh_{rep}.log"))
        resumed.append(seconds_to_step(resume_cmd, step + 1, m.logs / f"resume_{rep}.log"))
    fresh, resumed = fresh[1:], resumed[1:]
    ckpt_rates, _, _ = m.write_rates
    load_seconds = nbytes / median(ckpt_rates)
    allowed = 1.2 + load_seconds / median(fresh)
    detail = (
        f"launch to end of first step: resume {spread(resumed)} vs fresh {spread(fresh)}; target 1.2 + "
        f"{nbytes / 1e6:.0f} MB at the checkpoint write rate ({load_seconds:.2f} s) / fresh = {allowed:.2f}"
    )
    return [
        figure(
            "resume",
            "resume latency (resume / fresh start)",
            median(resumed) / median(fresh),
            detail,
            target=allowed,
        )
    ]


def listing(m: Measurements) -> list[Figure]:
    root = m.work / "listing"
    write_synthetic_runs(root, LISTED_RUNS)
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train_base.py"),
        "--list-runs",
        "--checkpoint-root",
        str(root),
    ]
    empty = [
        sys.executable,
        str(REPO / "scripts" / "train_base.py"),
        "--list-runs",
        "--checkpoint-root",
        str(m.work / "empty"),
    ]

    def timed(c: list[str]) -> float:
        start = time.perf_counter()
        out = subprocess.run(c, capture_output=True, text=True, env=child_env(), cwd=REPO, check=True).stdout
        seconds = time.perf_counter() - start
        if c is cmd and out.count("completed") < LISTED_RUNS:
            raise BenchError(
                f"--list-runs printed {out.count('completed')} completed runs, not {LISTED_RUNS}"
            )
        return seconds

    times = [timed(cmd) for _ in range(REPS + 1)][1:]
    startup = [timed(empty) for _ in range(REPS + 1)][1:]
    value = median(times) * 1000 / LISTED_RUNS
    detail = f"whole command {spread(times)} for {LISTED_RUNS} runs; of which interpreter and imports (empty root) {spread(startup)}"
    return [figure("listing", "listing (s per 1,000 runs)", value, detail, unit=" s")]


def write_synthetic_runs(root: Path, count: int) -> None:
    """``count`` finished runs whose metadata.json looks like the trainer's after 20 epochs."""
    from trainer.runs.store import kind_root, new_metadata, run_dir

    folder = kind_root(root, "base")
    for number in range(1, count + 1):
        meta = new_metadata(number=number, kind="base", experiment=f"sweep_{number % 7}", dataset="CIFAR-10",
                            num_classes=10, world_size=8, distributed="deepspeed-zero2")  # fmt: skip
        history = [
            {"epoch": e, "train_loss": 1 / e + number * 1e-6, "val_loss": 1.1 / e, "lr": 2e-4, "seconds": 61.2,
             "images_per_sec": 817.3, "checkpoint": f"epoch_{e:03d}.ckpt", "save_blocked_seconds": 0.05}
            for e in range(1, 21)
        ]  # fmt: skip
        meta.update(status="completed", epochs_total=20, epochs_completed=20, global_step=7800, history=history,
                    best={"epoch": 20, "metric": "val_loss", "value": 0.055, "mode": "min"}, checkpoints=[18, 19, 20],
                    config_summary={"learning_rate": 2e-4, "batch_size": 128, "model": MODEL, "seed": number})  # fmt: skip
        path = run_dir(folder, number)
        path.mkdir(parents=True)
        (path / "metadata.json").write_text(json.dumps(meta, indent=2))


FIGURES: dict[str, Callable[[Measurements], list[Figure]]] = {
    "overhead": trainer_overhead,
    "stall": checkpoint_stall,
    "write": write_efficiency,
    "merge": merge_cost,
    "adapter": adapter_size,
    "resume": resume_latency,
    "listing": listing,
}


# --------------------------------------------------------------------------------------------------
# FLOPs per image, for MFU on GPUs (benchmarks/gpu.md)
# --------------------------------------------------------------------------------------------------


def training_flops_per_image(batch: int = 2) -> float:
    """FLOPs of one forward + backward of the model per training image (torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model import edm_loss
    from trainer.config import CONFIG_DIR, build_config
    from trainer.factory import build_model

    config = build_config(CONFIG_DIR / "training" / "base_training.yaml", [("model", MODEL)])
    config.model.in_channels, config.model.num_classes = 3, 10
    model = build_model(config).train()
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        loss = edm_loss(model, images, labels, num_classes=10, label_dropout=0.1, generator=torch.Generator())
        loss.backward()
    return counter.get_total_flops() / batch


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help=f"comma-separated figures to measure (default all: {','.join(ORDER)})")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    parser.add_argument("--no-record", action="store_true", help=f"don't write {RESULTS.relative_to(REPO)}")
    parser.add_argument(
        "--note", help="a line about this run for results.md (e.g. what else ran on the machine)"
    )
    parser.add_argument("--accelerate-config", metavar="NAME", help="configs/accelerate/NAME.yaml for the trainer "
                        "and the hand loop (default: one process, plain python)")  # fmt: skip
    parser.add_argument(
        "--num-processes", type=int, help="with --accelerate-config: accelerate's --num_processes"
    )
    parser.add_argument("--zero-config", default="cpu_zero2", metavar="NAME", help="ZeRO-2 accelerate config of the "
                        "merge run, launched with 2 processes (default cpu_zero2; multi_gpu_zero2 on GPUs)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=BATCH, help=f"global batch (default {BATCH})")
    parser.add_argument("--steps-per-epoch", type=int, default=STEPS_PER_EPOCH,
                        help=f"steps per epoch of the overhead runs (default {STEPS_PER_EPOCH})")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=EPOCHS,
                        help=f"epochs per trainer launch of the overhead figure, the first a warm-up (default {EPOCHS})")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="trainer launches of the overhead figure, "
                        f"run beside as many hand-loop launches (default {ROUNDS})")  # fmt: skip
    parser.add_argument("--slice-seconds", type=float, default=SLICE_SECONDS, help="the overhead figure's "
                        f"processes take turns of this many seconds (default {SLICE_SECONDS:g})")  # fmt: skip
    parser.add_argument(
        "--flops", action="store_true", help="print the model's training FLOPs per image and exit"
    )
    parser.add_argument("--hand-loop", type=Path, metavar="DATA_ROOT", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hand_loop is not None:  # the baseline's own process
        hand_loop(args.hand_loop, batch=args.batch_size, steps=args.steps_per_epoch, epochs=args.epochs,
                  warmup_steps=HAND_LOOP_WARMUP_STEPS)  # fmt: skip
        return 0
    if args.flops:
        flops = training_flops_per_image()
        print(f"{MODEL}: {flops / 1e9:.2f} GFLOP per training image (forward + backward, 32x32)")
        return 0
    wanted = ORDER if not args.only else [k.strip() for k in args.only.split(",")]
    unknown = [k for k in wanted if k not in FIGURES]
    if unknown:
        raise SystemExit(f"error: unknown figure(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    if args.epochs < 2:
        raise SystemExit("error: --epochs must be at least 2 (the first is a warm-up)")
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be at least 1")
    if args.slice_seconds <= 0:
        raise SystemExit("error: --slice-seconds must be positive")
    setup = Setup(args.batch_size, args.steps_per_epoch, args.epochs, args.accelerate_config, args.num_processes,
                  args.zero_config, args.rounds, args.slice_seconds)  # fmt: skip
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports DeepSpeed
    context = {
        "date (UTC)": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "model": f"{MODEL}, global batch {setup.batch}, fake CIFAR-10 (random images), {setup.describe()}",
        "torch": torch.__version__,
        "load average at the start": load_average(),
    }
    if args.note:
        context = {"note": args.note, **context}
    (REPO / "demo_output").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="perf_", dir=REPO / "demo_output"))
    print(f"Scratch folder: {work}", flush=True)
    start = time.perf_counter()
    figures: list[Figure] = []
    try:
        m = Measurements(work, setup)
        for key in wanted:
            print(f"[{time.perf_counter() - start:5.0f} s] {key}", flush=True)
            figures += FIGURES[key](m)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    context["load average (1, 5, 15 min)"] = (
        f"{context.pop('load average at the start')} at the start, {load_average()} at the end"
    )
    context["wall time of the whole benchmark"] = f"{time.perf_counter() - start:.0f} s"
    print("\n" + table(figures))
    print(f"\nWall time: {time.perf_counter() - start:.0f} s")
    if not args.no_record:
        RESULTS.write_text(markdown(figures, context))
        print(f"Wrote {RESULTS.relative_to(REPO)}")
    return 0 if all(f.passed is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
