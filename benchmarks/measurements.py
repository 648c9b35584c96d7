"""The launches the figures are computed from, shared by them: each made once, when a figure first needs it,
in a scratch folder (``Measurements``)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import hand_loop
from benchmarks.fake_data import write_fake_cifar
from benchmarks.harness import median
from benchmarks.launching import (
    HAND_LOOP,
    PEER_TIMINGS,
    SCALE_TIMINGS,
    Job,
    command,
    epoch_stamps,
    launch,
    time_sliced,
)
from benchmarks.runs import TrainerRun, trainer_run
from benchmarks.settings import (
    ASYNC_STEPS_PER_EPOCH,
    LARGEST_WIDTH,
    LORA_EPOCHS,
    LORA_STEPS_PER_EPOCH,
    MODEL,
    PEER_LARGEST_REPS,
    PEER_REPS,
    REPS,
    SAVE_INTERVAL_EPOCHS,
    SYNC_STEPS_PER_EPOCH,
    WRITE_REPS,
    ZERO_OVERHEAD_EPOCHS,
    ZERO_OVERHEAD_ROUNDS,
    Setup,
)
from trainer.runs.layout import RunLayout


class Interleaved(NamedTuple):
    """An overhead figure's launches: ``setup.rounds`` trainer runs of ``setup.epochs`` epochs and as many
    hand-written loops, all at once, taking turns (``time_sliced``), timed in running clock."""

    loop: list[float]
    """Seconds per epoch of the hand loops (no epoch limit that they reach: they run until the trainer
    runs have ended)."""
    runs: list[TrainerRun]
    """The trainer's runs."""
    setup: Setup
    """How both sides were launched."""


class Measurements:
    """The launches shared by the figures, each made on first use, in a scratch folder."""

    def __init__(self, work: Path, setup: Setup) -> None:
        self.work, self.setup = work, setup
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_root = write_fake_cifar(work / "datasets", train_images=setup.batch * setup.steps)
        self._runs: dict[str, dict[str, Any]] = {}
        """Launches made on demand, by key (``peer_timings``, ``scale_run``)."""
        self.notes: list[str] = []
        """Markdown sections figures add to results.md (tables beside their rows)."""
        self.plots: dict[str, Path] = {}
        """Plots figures drew in the scratch folder, by the name they get in docs/."""
        self._overhead: dict[Setup, Interleaved] = {}
        self._lora_steps: dict[Setup, tuple[TrainerRun, TrainerRun]] = {}

    def command(self, script: str | Path, args: list[str]) -> list[str]:
        """A training-side launch (``scripts/<script>``, or ``HAND_LOOP``) as ``setup`` says."""
        return command(script, args, self.setup.accelerate_config, self.setup.num_processes)

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
        return trainer_run(result, root)

    @property
    def interleaved(self) -> Interleaved:
        """The overhead figure's launches, as ``setup`` says."""
        return self.overhead_runs(self.setup)

    def zero_overhead(self, config: str) -> Interleaved:
        """The zero-overhead figure's launches: both sides on 2 processes under
        ``configs/accelerate/<config>.yaml``, ``ZERO_OVERHEAD_ROUNDS`` trainer runs of ``ZERO_OVERHEAD_EPOCHS``
        epochs; the batch (global), steps and turns are ``setup``'s."""
        s = replace(self.setup, accelerate_config=config, num_processes=2, rounds=ZERO_OVERHEAD_ROUNDS,
                    epochs=ZERO_OVERHEAD_EPOCHS)  # fmt: skip
        return self.overhead_runs(s)

    def overhead_runs(self, s: Setup) -> Interleaved:
        """``s.rounds`` trainer runs of ``s.epochs`` epochs of ``s.steps`` steps and as many hand loops, both
        launched as ``s`` says, all at once, taking turns (``time_sliced``), so that a machine that speeds up
        or slows down meanwhile moves both sides alike. Made once per setup."""
        if s in self._overhead:
            return self._overhead[s]
        name = "" if s == self.setup else f"{s.accelerate_config}_{s.num_processes}p_"  # folders and logs
        extra = ("--set", "checkpoint.async_save=true", "--set", "logging.trackers=[tensorboard]")
        hand = hand_loop.command_args(self.data_root, batch=s.batch, steps=s.steps, epochs=10 * s.epochs)
        jobs, roots = [], []
        for i in range(1, s.rounds + 1):
            roots.append(self.work / f"{name}async{i}")
            args = self.trainer_args(roots[-1], steps=s.steps, epochs=s.epochs, extra=extra)
            cmd = command("train_base.py", args, s.accelerate_config, s.num_processes)
            jobs.append(Job(cmd, self.logs / f"{name}async{i}.log", finite=True))
            cmd = command(HAND_LOOP, hand, s.accelerate_config, s.num_processes)
            jobs.append(Job(cmd, self.logs / f"{name}hand_loop_{i}.log", finite=False))
        print(f"  {s.rounds} x train_base.py ({s.epochs} epochs of {s.steps} steps) and {s.rounds} hand-written "
              f"loops, {s.describe()}, taking turns of {s.slice_seconds:g} s ...", flush=True)  # fmt: skip
        launches = time_sliced(jobs, slice_seconds=s.slice_seconds)
        runs = [trainer_run(result, root) for result, root in zip(launches[0::2], roots)]
        seconds = [b - a for result in launches[1::2] for a, b in itertools.pairwise(epoch_stamps(result))]
        self._overhead[s] = Interleaved(seconds, runs, s)
        return self._overhead[s]

    @cached_property
    def save_intervals(self) -> tuple[list[float], dict[int, TrainerRun]]:
        """The save-interval figure's launches: a trainer run per interval of ``Setup.save_intervals``, saving
        in the background every that many steps (and every epoch), and one hand-written loop, all at once,
        taking turns (``time_sliced``). Returns (seconds per epoch of the hand loop, the runs by interval), in
        running clock."""
        s, epochs, intervals = self.setup, SAVE_INTERVAL_EPOCHS, self.setup.save_intervals
        jobs, roots = [], {}
        for n in intervals:
            roots[n] = self.work / f"every{n}"
            extra = ("--set", "checkpoint.async_save=true", "--set", f"checkpoint.save_every_n_steps={n}")
            args = self.trainer_args(roots[n], steps=s.steps, epochs=epochs, extra=extra)
            jobs.append(Job(self.command("train_base.py", args), self.logs / f"every{n}.log", finite=True))
        hand = hand_loop.command_args(
            self.data_root, batch=s.batch, steps=s.steps, epochs=10 * len(jobs) * epochs
        )
        jobs.append(Job(self.command(HAND_LOOP, hand), self.logs / "hand_loop_intervals.log", finite=False))
        print(f"  {len(intervals)} x train_base.py ({epochs} epochs of {s.steps} steps, a save every "
              f"{', '.join(map(str, intervals))} steps) and a hand-written loop, taking turns of "
              f"{s.slice_seconds:g} s ...", flush=True)  # fmt: skip
        *launches, loop = time_sliced(jobs, slice_seconds=s.slice_seconds)
        runs = {n: trainer_run(result, roots[n]) for n, result in zip(intervals, launches)}
        return [b - a for a, b in itertools.pairwise(epoch_stamps(loop))], runs

    @property
    def baseline(self) -> list[float]:
        """Seconds per epoch of the hand-written loop."""
        return self.interleaved.loop

    @property
    def trainer_runs(self) -> list[TrainerRun]:
        """The trainer as users run it (async saves every epoch, progress bar, tensorboard logging), timed
        in running clock: the overhead figure's runs."""
        return self.interleaved.runs

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

    def lora_args(self, root: Path, *, steps: int, epochs: int, extra: tuple[str, ...] = ()) -> list[str]:
        """``train_lora.py``'s flags: the synchronous run's model adapted on CIFAR-100 trees (the default
        blockwise config), as ``trainer_args`` trains the base."""
        args = ["--base-checkpoint", str(self.sync_run.path), "--data", "cifar100_trees_only",
                "--set", f"data.root={self.data_root}", "--batch-size", str(self.setup.batch),
                "--max-steps-per-epoch", str(steps), "--epochs", str(epochs), "--set", "warmup_steps=0",
                "--set", "logging.sample_every_n_epochs=0", "--checkpoint-root", str(root)]  # fmt: skip
        return args + list(extra)

    @cached_property
    def lora_run(self) -> RunLayout:
        """A LoRA run of one step on the synchronous run's model (CIFAR-100 trees; blockwise, the default)."""
        root = self.work / "lora"
        print("  train_lora.py: 1 step ...", flush=True)
        launch(self.command("train_lora.py", self.lora_args(root, steps=1, epochs=1)), self.logs / "lora.log")
        return RunLayout.of(root, "lora", 1)

    def lora_and_base_steps(self, config: str | None = None) -> tuple[TrainerRun, TrainerRun]:
        """The lora-step figure's launches: LoRA and base training of the same model, batch and processes,
        at once, taking turns (``time_sliced``); (the LoRA run, the base run), in running clock. Launched as
        ``setup`` says, or with ``config`` on 2 processes under ``configs/accelerate/<config>.yaml``; each
        made once. Each saves only after epoch 1 (its warm-up) and with its last epoch: the figure times
        training steps."""
        steps, epochs = LORA_STEPS_PER_EPOCH, LORA_EPOCHS
        s = self.setup if config is None else replace(self.setup, accelerate_config=config, num_processes=2)
        if s in self._lora_steps:  # a setup already on 2 processes under ``config`` is launched once
            return self._lora_steps[s]
        name = "" if s == self.setup else f"{s.accelerate_config}_{s.num_processes}p_"  # folders and logs
        # a falling loss is never again the best in mode max: saved after epoch 1 (the best) and the last
        saves = ("--set", "checkpoint.save_every_n_epochs=1000", "--set", "checkpoint.monitor=train_loss",
                 "--set", "checkpoint.mode=max")  # fmt: skip
        roots = (self.work / f"{name}lora_steps", self.work / f"{name}base_steps")
        args = (self.lora_args(roots[0], steps=steps, epochs=epochs, extra=saves),
                self.trainer_args(roots[1], steps=steps, epochs=epochs, extra=saves))  # fmt: skip
        jobs = [
            Job(command(script, a, s.accelerate_config, s.num_processes), self.logs / f"{name}{log}.log",
                finite=True)
            for script, a, log in zip(("train_lora.py", "train_base.py"), args, ("lora_steps", "base_steps"))
        ]  # fmt: skip
        print(f"  train_lora.py and train_base.py ({epochs} epochs of {steps} steps), {s.describe()}, taking "
              f"turns of {s.slice_seconds:g} s ...", flush=True)  # fmt: skip
        lora, base = time_sliced(jobs, slice_seconds=s.slice_seconds)
        self._lora_steps[s] = trainer_run(lora, roots[0], "lora"), trainer_run(base, roots[1])
        return self._lora_steps[s]

    def peer_timings(self, config: str, width: int = 1) -> dict[str, Any]:
        """The peers figure's launches of diffit_cifar widened ``width`` times, under
        ``configs/accelerate/<config>.yaml``: ``peer_timings.py save`` on 2 processes, then ``resume`` on 1;
        their records (``save``, ``resume``), each made once. Widened, its training step takes one image per
        process.

        At ``LARGEST_WIDTH`` the sides do not fit in memory in the same processes (the peers' loads on the
        DeepSpeed engine leave ~1 GB more per rank each time under ZeRO-3): the trainer's, the peers' on the
        engine and DCP's on its FSDP2 twin save in launches of their own (``--sides``), with
        ``PEER_LARGEST_REPS`` repetitions after the warm-up, and the resume on 1 process times the engine's
        sides once, without DCP's resharding load. The launches' files are removed after them (at 244 M the
        newest saves of the sides alone take ~20 GB)."""
        key = f"peers-{config}" + (f"-w{width}" if width > 1 else "")
        if key not in self._runs:
            work = self.work / key
            batch = self.setup.batch if width == 1 else 2  # widened: one image per process, as in scale_run
            args = [str(self.data_root), str(work), "--model", MODEL, "--batch-size", str(batch)]
            # (phase, sides, processes, repetitions after the warm-up: 0, the one repetition counts)
            launches = [("save", "all", 2, PEER_REPS), ("resume", "all", 1, PEER_REPS)]
            if width > 1:
                args += ["--width", str(width)]
            if width >= LARGEST_WIDTH:
                saves = [
                    ("save", sides, 2, PEER_LARGEST_REPS) for sides in ("trainer", "engine_peers", "twin")
                ]
                launches = [*saves, ("resume", "engine", 1, 0)]
            print(f"  peer_timings.py: diffit_cifar x{width}, saves and loads on 2 processes ({config}), then "
                  "loads on 1 ...", flush=True)  # fmt: skip
            records: dict[str, dict[str, Any]] = {}
            for phase, sides, processes, reps in launches:
                cmd = command(PEER_TIMINGS, [phase, *args, "--sides", sides, "--reps", str(reps)], config,
                              num_processes=processes)  # fmt: skip
                launch(cmd, self.logs / f"{key}_{phase}_{sides}.log", timeout=1800)
                name = phase if sides == "all" else f"{phase}_{sides}"
                merge_records(records.setdefault(phase, {}), json.loads((work / f"{name}.json").read_text()))
            shutil.rmtree(work, ignore_errors=True)
            self._runs[key] = records
        return self._runs[key]

    def scale_run(self, width: int, config: str | None) -> dict[str, Any]:
        """The scaling figures' launch of diffit_cifar widened ``width`` times, in one process (``config``
        None) or on 2 under ``configs/accelerate/<config>.yaml``, each made once: every rank's record of
        ``scale_timings.py`` (``ranks``). Its files are removed after."""
        key = f"scale-w{width}-{config or 'single'}"
        if key not in self._runs:
            work = self.work / key
            args = [str(self.data_root), str(work), "--width", str(width)]
            processes = 2 if config else None
            where = f"2 processes ({config})" if config else "one process"
            print(f"  scale_timings.py: diffit_cifar x{width}, {where} ...", flush=True)
            launch(command(SCALE_TIMINGS, args, config, processes), self.logs / f"{key}.log", timeout=1800)
            ranks = [json.loads(p.read_text()) for p in sorted(work.glob("scale_rank*.json"))]
            record: dict[str, Any] = {"ranks": ranks}
            shutil.rmtree(work, ignore_errors=True)
            self._runs[key] = record
        return self._runs[key]

    @cached_property
    def write_rates(self) -> tuple[list[float], list[float], float]:
        """(checkpoint bytes/s per synchronous save, plain-file bytes/s per repetition, bytes), after a warm-up
        of each: ``WRITE_REPS`` turns of a save then a plain fsynced file of as many bytes, in one process
        (``scale_timings.py --write-only``)."""
        work = self.work / "write"
        args = [str(self.data_root), str(work), "--reps", str(WRITE_REPS), "--write-only"]
        print(f"  scale_timings.py --write-only: {WRITE_REPS} synchronous saves and plain files in turns ...",
              flush=True)  # fmt: skip
        launch(command(SCALE_TIMINGS, args, None, None), self.logs / "write.log")
        times = json.loads((work / "scale_rank0.json").read_text())["times"]
        shutil.rmtree(work, ignore_errors=True)
        saves = list(zip(times["write"]["bytes"], times["write"]["seconds"]))[1:]
        plain = [b / s for b, s in zip(times["write"]["bytes"], times["plain"]["seconds"])][1:]
        return [b / s for b, s in saves], plain, median([b for b, _ in saves])


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


def merge_records(into: dict[str, Any], record: dict[str, Any]) -> None:
    """Add one launch's record of ``peer_timings.py`` to ``into``: times by kind, then side; other mappings
    (bytes, fingerprints, newest saves) by side; anything else as the first launch recorded it."""
    for key, value in record.items():
        if key == "times":
            for kind, sides in value.items():
                into.setdefault("times", {}).setdefault(kind, {}).update(sides)
        elif isinstance(value, dict):
            into.setdefault(key, {}).update(value)
        else:
            into.setdefault(key, value)
