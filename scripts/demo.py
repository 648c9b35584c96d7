"""`make demo`: the main workflow, offline, on the bundled digits dataset, on a CPU in under 10 minutes.

1. base training of DiffiT under `accelerate launch` with 2 processes and DeepSpeed ZeRO-2
   (one process without DeepSpeed where DeepSpeed is unavailable);
2. LoRA fine-tuning of that base model on the digits 0-4 only, the same way;
3. the listings of both kinds of runs, with a plot of their validation loss per epoch;
leaving sample grids in demo_output/checkpoints/{base_training,lora_finetuning}/run_NNN/logs/samples/.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "demo_output" / "checkpoints"


def step(title: str, cmd: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "DS_ACCELERATOR": "cpu"}
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def launcher() -> tuple[list[str], str]:
    """The command prefix that starts a training script, and how it runs."""
    if sys.platform == "linux" and importlib.util.find_spec("deepspeed") is not None:
        config = str(REPO / "configs" / "accelerate" / "cpu_zero2.yaml")
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config], (
            "2 processes, DeepSpeed ZeRO-2 on the CPU"
        )
    return [sys.executable], "one process (DeepSpeed unavailable)"


def train_base(root: Path = ROOT) -> None:
    """The demo's base training (also what benchmarks/sample_quality.py measures)."""
    prefix, how = launcher()
    script = [str(REPO / "scripts" / "train_base.py"), "--checkpoint-root", str(root)]
    step(f"Base training: {how}", [*prefix, *script])


def main(root: Path = ROOT) -> int:
    start = time.perf_counter()
    train_base(root)
    prefix, how = launcher()
    lora = [str(REPO / "scripts" / "train_lora.py"), "--checkpoint-root", str(root)]
    step(
        f"LoRA fine-tuning of the newest base run on digits 0-4: {how}",
        [*prefix, *lora, "--data", "digits_0_4", "--experiment", "diffit_lora_digits", "--epochs", "3"],
    )
    for kind in ("base", "lora"):
        script = REPO / "scripts" / f"train_{kind}.py"
        plot = root.parent / f"{kind}_runs.png"  # the monitored metric per epoch of every run
        listing = ["--checkpoint-root", str(root), "--list-runs", "--plot", str(plot)]
        step(f"{kind} runs so far", [sys.executable, str(script), *listing])
    grids = sorted(root.glob("*/run_*/logs/samples/*.png"))
    print(f"\nSample grids ({len(grids)}), newest of each run:")
    for run in sorted({g.parent.parent.parent for g in grids}):
        newest = sorted((run / "logs" / "samples").glob("*.png"))[-1]
        print(f"  {newest.relative_to(REPO) if newest.is_relative_to(REPO) else newest}")
    print(f"\nDemo finished in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
