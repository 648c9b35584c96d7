"""FID of a run's checkpoint: EMA weights, EDM's Heun sampler, against the training split of the run's data.

    python scripts/evaluate.py checkpoints/base_training/run_001                   # best, 50,000 samples
    accelerate launch --num_processes 8 scripts/evaluate.py RUN --which last         # every GPU its share
    python scripts/evaluate.py RUN --which 20 --num-samples 2000 --features standin  # offline smoke test

The value is printed and recorded in the run's metadata.json (``evaluations``); ``--list-runs`` shows it.
Inception-v3's weights download once into torch's hub cache; the training split's statistics are computed
once and cached under the data root's fid_refs/. A stopped evaluation continues from its finished batches
when run again with the same arguments. A class-conditional model samples its classes in turn, unguided.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="base or LoRA run folder")
    parser.add_argument("--which", default="best", help="best, last, an epoch number or a tag (default best)")
    parser.add_argument("--num-samples", type=int, default=50_000,
                        help="samples drawn (default 50,000, as published FIDs)")  # fmt: skip
    parser.add_argument("--features", choices=["inception-v3", "standin"], default="inception-v3",
                        help="feature network (default inception-v3; standin: no download, not comparable "
                             "with published FIDs)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=250,
                        help="samples per model batch (default 250); the FID does not depend on the process count")  # fmt: skip
    parser.add_argument("--seed", type=int, help="seed of the samples' noise (default the run's seed)")
    parser.add_argument("--timeout-minutes", type=float, default=30.0,
                        help="how long a process waits for the others at a collective (default 30)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.errors import exit_code
    from trainer.evaluation import evaluate

    return exit_code(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
