"""`make demo`: the main workflow, offline, on the bundled digits dataset, on a CPU in under 10 minutes.

1. base training of DiffiT under `accelerate launch` with 2 processes and DeepSpeed ZeRO-2
   (one process without DeepSpeed where DeepSpeed is unavailable);
2. the run listing;
leaving sample grids in demo_output/checkpoints/base_training/run_NNN/logs/samples/.
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


def main() -> int:
    start = time.perf_counter()
    train = [str(REPO / "scripts" / "train_base.py"), "--checkpoint-root", str(ROOT)]
    if sys.platform == "linux" and importlib.util.find_spec("deepspeed") is not None:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "configs" / "accelerate" / "cpu_zero2.yaml")]  # fmt: skip
        step("Base training: 2 processes, DeepSpeed ZeRO-2 on the CPU", [*launcher, *train])
    else:
        step("Base training: one process (DeepSpeed unavailable)", [sys.executable, *train])
    step("Runs so far", [sys.executable, *train, "--list-runs"])
    grids = sorted(ROOT.glob("base_training/run_*/logs/samples/*.png"))
    print(f"\nSample grids ({len(grids)}), newest last:")
    for grid in grids[-3:]:
        print(f"  {grid.relative_to(REPO)}")
    print(f"\nDemo finished in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
