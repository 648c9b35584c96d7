"""The project's promises on one GPU, in one table: `make gpu-check` (``python scripts/gpu_check.py``).

    python scripts/gpu_check.py                       # on a 1-GPU machine after `make install`: sized for < 8 min
    python scripts/gpu_check.py --peak-tflops 835     # a GPU the peak table does not know (dense bf16)
    python scripts/gpu_check.py --cpu                 # the same checks at toy sizes on 2 CPU processes (CI)

It trains ``diffit_cifar`` in bf16 under DeepSpeed ZeRO-2 (``accelerate launch --config_file
configs/accelerate/multi_gpu_zero2.yaml --num_processes 1``) on a fake CIFAR-10 folder (no download), then:
kills the whole launch (``kill -9`` of the launcher and its workers) in the middle of the same training in
another folder and resumes it with ``--resume 1``; fine-tunes LoRA adapters on the trained base; exports the
base in bf16; trains the paper preset for one short epoch and takes its FID (``scripts/evaluate.py``). It prints one markdown table (check, value, target, PASS/FAIL) and exits 1 if a check fails.

- images/s: the median of the base run's epochs after the first (``images_per_sec`` in metadata.json);
  MFU = images/s x training FLOPs per image (``benchmarks/flops.py``) / the GPU's dense bf16 peak.
- blocked per save and the durable save: what the trainer recorded for each epoch save after the first
  (``save_blocked_seconds`` in metadata.json's history, ``write_seconds`` in logs/events.jsonl).
- ``--cpu``: ``diffit_tiny`` on the digits, 2 processes with ``cpu_zero2_bf16.yaml``; timings are not judged.
Everything goes under ``--workdir`` (default: a new temporary folder, printed first, kept afterwards).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.figures.stall import TARGET as STALL_TARGET  # noqa: E402
from benchmarks.gpu_sizes import Sizes, cpu_sizes, gpu_sizes  # noqa: E402
from benchmarks.launching import command, kill_tree, launch, remove_deepspeed_shm, start_process  # noqa: E402
from trainer.runs.layout import RunLayout  # noqa: E402

RESUMED_FROM = re.compile(r"Resuming .* \(checkpoint (\S+?), ")
"""The trainer's line when a resume continues from a checkpoint (rank 0)."""
BLOCKED_SHARE = STALL_TARGET[1]
"""A background save may block training for at most this share of the whole save (as `make bench`'s stall)."""

PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756.0), (r"H100.*(SXM|HBM3)", 989.0), (r"H200", 989.0), (r"A100", 312.0), (r"L40S", 362.0),
    (r"\bA10\b", 125.0), (r"RTX 4090", 165.0),
]  # fmt: skip
"""Dense (no sparsity) bf16 tensor-core peaks of known GPUs, by a pattern of ``torch.cuda.get_device_name()``,
first match wins; other GPUs (an H100 NVL, an A10G) need ``--peak-tflops``."""


THROUGHPUT = "bf16 ZeRO-2 training throughput"
MFU = "MFU (model FLOPs utilisation)"
DURABLE = "durable save (background, start to commit)"
BLOCKED = "training blocked per background save"
RESUME = "kill -9 mid-training, then --resume 1: final weights + EMA"
LORA = "LoRA fine-tuning on the trained base, then trainer.load_model"
EXPORT = "export --dtype bf16, then torch.load(weights_only=True)"
FID = "paper preset: a short run, then scripts/evaluate.py's FID"
CHECKS = (THROUGHPUT, MFU, DURABLE, BLOCKED, RESUME, LORA, EXPORT, FID)
"""The table's rows, in order."""

NO_TARGET = "measured (no target)"
TARGETS = {
    THROUGHPUT: NO_TARGET,
    MFU: NO_TARGET,
    DURABLE: NO_TARGET,
    BLOCKED: f"<= {BLOCKED_SHARE:g} of the durable save",
    RESUME: "bit-identical to the uninterrupted run",
    LORA: "completes and loads",
    EXPORT: "loads; every floating tensor bf16",
    FID: "finite, in training and by evaluate.py, and recorded",
}


@dataclass
class Row:
    check: str
    value: str
    target: str
    passed: bool


def table(rows: list[Row]) -> str:
    """The rows as one markdown table."""
    lines = ["| check | value | target | result |", "|---|---|---|---|"]
    for r in rows:
        cells = [r.check, r.value, r.target, "PASS" if r.passed else "FAIL"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def exit_code(rows: list[Row]) -> int:
    """0 when every row passed, else 1."""
    return 0 if rows and all(r.passed for r in rows) else 1


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s: ``override_tflops``, else the table's, else None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops * 1e12
    return None


class Check:
    """One check run: its folder, sizes, launches and logs; ``rows`` collects the table."""

    def __init__(self, work: Path, sizes: Sizes, *, cpu: bool, timeout: float) -> None:
        self.work, self.sizes, self.cpu, self.timeout = work, sizes, cpu, timeout
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # --cpu on a GPU machine too: DeepSpeed's CPU accelerator, no CUDA device. On the GPU, DeepSpeed's CUDA
        # accelerator even where the environment says cpu (the Makefile exports DS_ACCELERATOR=cpu for the tests).
        self.env = (
            {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""} if cpu else {"DS_ACCELERATOR": "cuda"}
        )
        self.rows: list[Row] = []

    def base_args(self, root: Path) -> list[str]:
        s = self.sizes
        return ["--model", s.model, *s.data, "--batch-size", str(s.batch), "--max-steps-per-epoch", str(s.steps),
                "--epochs", str(s.epochs), "--set", "warmup_steps=0", "--set", "logging.sample_every_n_epochs=0",
                *s.extra, "--checkpoint-root", str(root)]  # fmt: skip

    def run(self, script: str, args: list[str], log: str, *, accelerate: bool = True) -> list[str]:
        """Launch ``scripts/<script>`` to completion (``BenchError`` if it fails); its stdout lines."""
        s = self.sizes
        config, processes = (s.config, s.num_processes) if accelerate else (None, None)
        print(f"  {script} -> {self.logs / log}", flush=True)
        result = launch(
            command(script, args, config, processes), self.logs / log, timeout=self.timeout, env=self.env
        )
        return [line for _, line in result.lines]

    def guarded(self, checks: tuple[str, ...], measure: Callable[[], list[Row]]) -> bool:
        """Add ``measure()``'s rows; if it raises, a FAIL row for each of ``checks`` saying why. Returns whether
        it succeeded."""
        try:
            self.rows += measure()
            return True
        except Exception as e:  # a failed check is a row of the table, not the end of the script
            traceback.print_exc()
            first = str(e).splitlines()[0] if str(e) else ""
            self.rows += [Row(name, f"error: {type(e).__name__}: {first}"[:300], TARGETS[name], False)
                          for name in checks]  # fmt: skip
            return False


def history(run: RunLayout) -> list[dict[str, Any]]:
    """The per-epoch history in ``run``'s metadata.json."""
    return list(json.loads(run.metadata.read_text())["history"])


def throughput_rows(check: Check, base: RunLayout, peak: float | None, device: str) -> list[Row]:
    """Images/s of the base run's epochs after the first, and its MFU."""
    from benchmarks.flops import training_flops_per_image

    s, epochs = check.sizes, history(base)
    rate = statistics.median(float(e["images_per_sec"]) for e in epochs[1:])
    channels, pixels = s.flops_image
    flops = training_flops_per_image(model=s.model, image_size=pixels, channels=channels)
    value = (f"{rate:.1f} img/s ({s.model}, batch {s.batch}, {s.num_processes} x {device}; median of epochs "
             f"2-{len(epochs)})")  # fmt: skip
    if check.cpu:
        mfu = f"n/a (CPU; {flops / 1e9:.3g} GFLOP per image)"
    elif peak is None:
        mfu = f"n/a (pass --peak-tflops; {flops / 1e9:.3g} GFLOP per image)"
    else:
        mfu = f"{rate * flops / peak:.1%} ({flops / 1e9:.3g} GFLOP per image, peak {peak / 1e12:.0f} TFLOP/s)"
    return [Row(THROUGHPUT, value, NO_TARGET, rate > 0), Row(MFU, mfu, NO_TARGET, True)]


def save_rows(check: Check, base: RunLayout) -> list[Row]:
    """The background saves of the base run's epochs after the first: seconds training was blocked per save,
    and the durable save (start to commit), as the trainer recorded them."""
    from benchmarks.runs import read_saves

    blocked = {f"epoch_{e['epoch']:03d}": float(e["save_blocked_seconds"]) for e in history(base)[1:]}
    saves = [s for s in read_saves(base) if s.tag in blocked]
    if not saves or not all(s.background for s in saves):
        raise RuntimeError(f"{base.events} records no background epoch save after the first")
    durable = statistics.median(s.write_seconds for s in saves)
    blocked_s = statistics.median(blocked[s.tag] for s in saves)
    share = blocked_s / durable
    mb = statistics.median(s.nbytes for s in saves) / 1e6
    target = TARGETS[BLOCKED] + (" (not judged on the CPU)" if check.cpu else "")
    durable_row = Row(
        DURABLE, f"{durable:.3f} s for {mb:.1f} MB (median of {len(saves)} saves)", NO_TARGET, True
    )
    value = f"{blocked_s:.4f} s = {share:.3f} of the durable save"
    return [durable_row, Row(BLOCKED, value, target, check.cpu or share <= BLOCKED_SHARE)]


def power_off(proc: Any) -> None:
    """SIGKILL the launch ``proc`` and every process it started (torch elastic gives each worker its own
    session), then wait until each has ended: a killed process may hold the run's lock while it exits."""
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    kill_tree(proc.pid)  # every process group of the tree: each worker's too
    psutil.wait_procs(tree, timeout=60)
    proc.wait()


def cut_and_resume(check: Check) -> tuple[RunLayout, str]:
    """The base run's command in a folder of its own, killed (``kill -9`` of the whole launch) once a process
    has finished step ``cut_step``, then continued with ``--resume 1``; its run folder and the checkpoint the
    resume continued from."""
    s, root = check.sizes, check.work / "cut"
    marker, log = check.work / "paused.marker", check.logs / "cut.log"
    cmd = command("train_base.py", check.base_args(root), s.config, s.num_processes)
    env = {**check.env, "DIFFIT_FAULTS": f"pause@step:step={s.cut_step}", "DIFFIT_FAULT_MARKER": str(marker)}
    print(f"  train_base.py, killed after step {s.cut_step} -> {log}", flush=True)
    proc = start_process(cmd, log, env)
    deadline = time.monotonic() + check.timeout
    try:
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"step {s.cut_step} was never reached (exit {proc.poll()}); see {log}")
            time.sleep(0.1)
    finally:
        power_off(proc)
        remove_deepspeed_shm(cmd)
    lines = check.run("train_base.py", [*check.base_args(root), "--resume", "1"], "resume.log")
    # A resume that started over would end bit-identical too: it must say which checkpoint it continued from.
    resumed = [m[1] for m in map(RESUMED_FROM.search, lines) if m]
    if not resumed:
        raise RuntimeError(f"the resume did not continue from a checkpoint; see {check.logs / 'resume.log'}")
    return RunLayout.of(root, "base", 1), resumed[0]


def final_weights(run: RunLayout, epochs: int) -> dict[str, Any]:
    """The weights and EMA of ``run``'s last epoch checkpoint, by name."""
    import torch

    ckpt = torch.load(run.ckpt(f"epoch_{epochs:03d}"), map_location="cpu", weights_only=True)
    return {f"{part}.{k}": v for part in ("state_dict", "ema_state_dict") for k, v in ckpt[part].items()}


def identity_row(check: Check, base: RunLayout, cut: tuple[RunLayout, str]) -> Row:
    """Whether the killed and resumed run ends with the base run's weights and EMA, to the last bit."""
    s, (resumed, tag) = check.sizes, cut
    a, b = final_weights(base, s.epochs), final_weights(resumed, s.epochs)
    if a.keys() != b.keys():
        raise RuntimeError(f"the runs' checkpoints hold different tensors: {sorted(a.keys() ^ b.keys())[:3]}")
    differ = [k for k in a if not a[k].equal(b[k])]
    worst = max((float((a[k].double() - b[k].double()).abs().max()) for k in differ), default=0.0)
    value = (
        f"bit-identical ({len(a)} tensors)"
        if not differ
        else f"{len(differ)} of {len(a)} tensors differ, max abs diff {worst:.3g}"
    )
    if differ and not check.cpu:
        value += " (the trainer sets no deterministic-kernel flags on GPUs)"
    return Row(RESUME, f"killed after step {s.cut_step} of {s.epochs * s.steps}, resumed from {tag}: {value}", TARGETS[RESUME],
               not differ)  # fmt: skip


def lora_row(check: Check, base: RunLayout) -> Row:
    """A 1-epoch LoRA run on the base run, and ``trainer.load_model`` of it."""
    root = check.work / "lora"
    args = ["--base-checkpoint", str(base.path), *check.sizes.lora_data, "--max-steps-per-epoch", "2",
            "--epochs", "1", "--set", "warmup_steps=0", "--set", "logging.sample_every_n_epochs=0",
            *check.sizes.extra, "--checkpoint-root", str(root)]  # fmt: skip
    check.run("train_lora.py", args, "lora.log")
    from trainer.api import load_model

    model = load_model(RunLayout.of(root, "lora", 1).path)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    value = f"trained 1 epoch; load_model: {type(model).__name__} with {adapters:,} adapter weights"
    return Row(LORA, value, TARGETS[LORA], adapters > 0)


def export_row(check: Check, base: RunLayout) -> Row:
    """``scripts/export.py <base> --dtype bf16``, and the file loaded with ``weights_only=True``."""
    import torch

    out = check.work / "export" / "base_bf16.ckpt"
    args = [str(base.path), "--dtype", "bf16", "--out", str(out)]
    check.run("export.py", args, "export.log", accelerate=False)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    tensors = [t for part in ("state_dict", "ema_state_dict") for t in ckpt[part].values()]
    floats = [t for t in tensors if t.is_floating_point()]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in floats})
    value = f"{len(floats)} floating tensors ({', '.join(dtypes)}), {out.stat().st_size / 1e6:.1f} MB"
    return Row(EXPORT, value, TARGETS[EXPORT], bool(floats) and dtypes == ["bfloat16"])


def fid_row(check: Check) -> Row:
    """The paper preset trained for one short epoch with an FID at its end (best chosen by it), then
    ``scripts/evaluate.py`` on it: Inception-v3 (its weights in torch's hub cache, or downloaded), the
    reference statistics of the data, EMA samples from EDM's sampler on the GPU."""
    root, (features, samples) = check.work / "paper", check.sizes.fid
    check.run("train_base.py", [*check.sizes.paper, "--checkpoint-root", str(root)], "paper.log")
    run = RunLayout.of(root, "base", 1)
    started = time.perf_counter()
    args = [str(run.path), "--num-samples", str(samples), "--features", features]
    check.run("evaluate.py", args, "evaluate.log")
    seconds = time.perf_counter() - started
    meta = json.loads(run.metadata.read_text())
    in_training, evaluated = meta["best"], meta["evaluations"][-1]
    value = (f"{evaluated['value']:.2f} ({samples:,} samples, {features}; {samples / seconds:.0f} samples/s with "
             f"the launch); in training: {in_training['value']:.2f} ({in_training['metric']})")  # fmt: skip
    finite = all(math.isfinite(v) for v in (evaluated["value"], in_training["value"]))
    return Row(FID, value, TARGETS[FID], finite and in_training["metric"] == "fid")


def run_checks(check: Check, peak: float | None, device: str) -> None:
    """Every check, in order; those that need the base run fail with it."""
    base = RunLayout.of(check.work / "base", "base", 1)

    def train_base() -> list[Row]:
        check.run("train_base.py", check.base_args(check.work / "base"), "base.log")
        return []

    if not check.guarded(CHECKS, train_base):
        return
    check.guarded((THROUGHPUT, MFU), lambda: throughput_rows(check, base, peak, device))
    check.guarded((DURABLE, BLOCKED), lambda: save_rows(check, base))
    check.guarded((RESUME,), lambda: [identity_row(check, base, cut_and_resume(check))])
    check.guarded((LORA,), lambda: [lora_row(check, base)])
    check.guarded((EXPORT,), lambda: [export_row(check, base)])
    check.guarded((FID,), lambda: [fid_row(check)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="dry mode: toy sizes on 2 CPU processes (CI)")
    parser.add_argument("--workdir", type=Path, help="a new or empty folder for everything written "
                        "(default: a new temporary folder)")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak in TFLOP/s, for the MFU "
                        f"(default: known GPUs: {', '.join(p for p, _ in PEAK_BF16_TFLOPS)})")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600, help="seconds per launch (default 600)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start, device = time.perf_counter(), "CPU"
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device; pass --cpu for the dry run on the CPU", file=sys.stderr)
            return 2
        device = torch.cuda.get_device_name()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if work.is_dir() and any(work.iterdir()):
        print(f"error: --workdir {work} is not empty; name a new or empty folder", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    print(f"Work folder: {work}", flush=True)
    sizes = cpu_sizes(work) if args.cpu else gpu_sizes(work)
    check = Check(work, sizes, cpu=args.cpu, timeout=args.timeout)
    run_checks(check, peak_flops(device, args.peak_tflops), device)
    print(f"\n{'Dry run on the CPU' if args.cpu else device}: {time.perf_counter() - start:.0f} s, logs in "
          f"{check.logs}\n")  # fmt: skip
    print(table(check.rows), flush=True)
    return exit_code(check.rows)


if __name__ == "__main__":
    sys.exit(main())
