"""Export a LoRA run for deployment: adapters merged into the base weights, one standalone base checkpoint.

    python scripts/export.py checkpoints/lora_finetuning/run_001 --which best --out trees_merged.ckpt

The result loads like any base checkpoint (`trainer.load_model`, or torch.load + build_model).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="LoRA run folder or lora_weights/*.ckpt file")
    parser.add_argument("--which", default="best", help="best, last or an epoch number (default best)")
    parser.add_argument("--out", type=Path, required=True, help="file to write (.ckpt)")
    args = parser.parse_args()

    import torch

    from trainer.api import merge_lora
    from trainer.checkpoint.io.atomic import atomic_write
    from trainer.errors import exit_code

    which = int(args.which) if args.which.isdigit() else args.which

    def export() -> None:
        payload = merge_lora(args.run, which)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, lambda f: torch.save(payload, f))
        print(f"Wrote {args.out} (merged from {payload['merged_from']})")

    return exit_code(export)


if __name__ == "__main__":
    sys.exit(main())
