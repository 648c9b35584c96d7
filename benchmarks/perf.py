"""Performance benchmarks as side-by-side ratios: `make bench`.

    python benchmarks/perf.py                      # the headline figures (`make bench`); prints the table
    python benchmarks/perf.py --full               # every figure at every size (`make bench-full`); writes
                                                   # benchmarks/results.md
    python benchmarks/perf.py --only stall,write   # some figures (the runs they need are made too)
    python benchmarks/perf.py --keep               # keep the scratch folder (runs and logs) for inspection
    python benchmarks/perf.py --flops              # training FLOPs per image of the model (for MFU, gpu.md)

Every figure is a ratio of two things measured in this run on this machine, each timed side the median of
repetitions after a warm-up (5 or more; 3 for the peers, 1 for the peers at 244 M parameters, 2 per size for
the scale figures, whose saves write up to 7 GB each; sizes are measured once), never an absolute time; the
one exception is the listing time, which is bounded by reading metadata. The model is ``diffit_cifar`` (15.3 M
parameters, 61 MB of fp32 weights; a checkpoint with EMA, Adam moments and the merged file is 367 MB), so
checkpoint I/O is far above noise; the scale figures widen it to 61 M and 244 M, and the peers figure compares
at 244 M too. Data: a fake CIFAR-10 folder of random images in the official pickle layout, written here (no
download). In the overhead, zero-overhead, save-interval and lora-step figures the sides' processes take
turns, and the peers figure's sides take turns in the same processes (at 244 M, DCP's in a launch of its
own); elsewhere the sides of a ratio run one after the other, so run it on a quiet machine: other load during
one side only moves the figure.

Saves are read from each run's ``logs/events.jsonl`` (one JSON line per finished save, written by the
trainer), never from its stdout; stdout gives only the times of the "Epoch N/M" lines, stamped by this
process as they arrive. What each side of each figure is: the docstring of its module in
``benchmarks/figures/`` (registered in ``benchmarks/figures/__init__.py``; below in ``--help``). The
launches the figures share are made by ``benchmarks/measurements.py``, each once.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script: import from the checkout, and this folder's modules as benchmarks.*
    sys.path[0] = str(REPO)

from benchmarks.figures import FIGURES, HEADLINE, explain  # noqa: E402
from benchmarks.harness import BenchError, Figure, markdown, table  # noqa: E402
from benchmarks.measurements import Measurements  # noqa: E402
from benchmarks.settings import (  # noqa: E402
    BATCH,
    EPOCHS,
    HAND_LOOP_WARMUP_STEPS,
    HEADLINE_RESULTS,
    MODEL,
    RESULTS,
    ROUNDS,
    SLICE_SECONDS,
    STEPS_PER_EPOCH,
    Setup,
)

ORDER = list(FIGURES)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def commit() -> str:
    """The checkout's commit, with ``+changes`` when files differ from it (``unknown`` outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return (head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"


def description() -> str:
    """This docstring, then what each figure compares (its module's docstring)."""
    figures = [textwrap.indent(explain(key), "    ").replace("    ", "", 1) for key in ORDER]
    return (__doc__ or "") + "\nThe figures:\n\n" + "\n\n".join(figures)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help=f"comma-separated figures to measure (default: {','.join(HEADLINE)}; "
                        f"with --full: {','.join(ORDER)})")  # fmt: skip
    parser.add_argument(
        "--full", action="store_true", help="every figure, each at every size (make bench-full)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    parser.add_argument("--no-record", action="store_true", help=f"don't write {HEADLINE_RESULTS.relative_to(REPO)} "
                        f"(with --full: {RESULTS.relative_to(REPO)})")  # fmt: skip
    parser.add_argument(
        "--note", help="a line about this run for results.md (e.g. what else ran on the machine)"
    )
    parser.add_argument("--accelerate-config", metavar="NAME", help="configs/accelerate/NAME.yaml for the trainer "
                        "and the hand loop (default: one process, plain python)")  # fmt: skip
    parser.add_argument(
        "--num-processes", type=int, help="with --accelerate-config: accelerate's --num_processes"
    )
    parser.add_argument("--zero-config", default="cpu_zero2", metavar="NAME", help="ZeRO-2 accelerate config of the "
                        "runs on 2 processes (merge, peers, zero-overhead, scale; default cpu_zero2; multi_gpu_zero2 "
                        "on GPUs)")  # fmt: skip
    parser.add_argument("--zero3-config", default="cpu_zero3", metavar="NAME", help="ZeRO-3 accelerate config of the "
                        "peers and zero-overhead runs (default cpu_zero3; multi_gpu_zero3 on GPUs)")  # fmt: skip
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
    # The baseline's own process, as before benchmarks/hand_loop.py (which the benchmark now launches).
    parser.add_argument("--hand-loop", type=Path, metavar="DATA_ROOT", help=argparse.SUPPRESS)
    return parser


def checked(args: argparse.Namespace) -> tuple[list[str], Setup]:
    """The figures to measure and the setup, or SystemExit saying what is wrong with the flags."""
    default = ORDER if args.full else [key for key in ORDER if key in HEADLINE]
    wanted = default if not args.only else [k.strip() for k in args.only.split(",")]
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
                  args.zero_config, args.zero3_config, args.rounds, args.slice_seconds, args.full)  # fmt: skip
    return wanted, setup


def measure(
    wanted: list[str], setup: Setup, *, keep: bool, record: bool, start: float
) -> tuple[list[Figure], list[str]]:
    """The figures ``wanted``, measured in a scratch folder under demo_output/ (kept with ``keep``, and when
    a measurement fails: its launches' logs are there), and the markdown notes they add to results.md; with
    ``record``, the plots they drew go to docs/."""
    (REPO / "demo_output").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="perf_", dir=REPO / "demo_output"))
    print(f"Scratch folder: {work}", flush=True)
    figures: list[Figure] = []
    notes: list[str] = []
    try:
        m = Measurements(work, setup)
        notes = m.notes
        for key in wanted:
            print(f"[{time.perf_counter() - start:5.0f} s] {key}", flush=True)
            figures += FIGURES[key](m)
        for name, path in m.plots.items() if record else ():
            shutil.copyfile(path, REPO / "docs" / name)
            print(f"Wrote docs/{name}")
    except BaseException:
        print(f"The scratch folder is kept for its logs: {work}", file=sys.stderr, flush=True)
        raise
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return figures, notes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hand_loop is not None:  # the baseline's own process
        from benchmarks.hand_loop import hand_loop

        hand_loop(args.hand_loop, batch=args.batch_size, steps=args.steps_per_epoch, epochs=args.epochs,
                  warmup_steps=HAND_LOOP_WARMUP_STEPS)  # fmt: skip
        return 0
    if args.flops:
        from benchmarks.flops import training_flops_per_image

        print(
            f"{MODEL}: {training_flops_per_image() / 1e9:.2f} GFLOP per training image "
            "(forward + backward, 32x32)"
        )
        return 0
    wanted, setup = checked(args)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports DeepSpeed
    context = {
        "date (UTC)": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": commit(),
        "machine": machine(),
        "model": f"{MODEL}, global batch {setup.batch}, fake CIFAR-10 (random images), {setup.describe()}",
        "torch": torch.__version__,
    }
    if args.note:
        context = {"note": args.note, **context}
    start, load_at_start = time.perf_counter(), load_average()
    try:
        figures, notes = measure(wanted, setup, keep=args.keep, record=not args.no_record, start=start)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    context["load average (1, 5, 15 min)"] = f"{load_at_start} at the start, {load_average()} at the end"
    context["wall time of the whole benchmark"] = f"{time.perf_counter() - start:.0f} s"
    print("\n" + table(figures))
    print(f"\nWall time: {time.perf_counter() - start:.0f} s")
    if not args.no_record:
        results = RESULTS if args.full else HEADLINE_RESULTS
        results.write_text(markdown(figures, context, notes))
        print(f"Wrote {results.relative_to(REPO)}")
    return 0 if all(f.passed is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
