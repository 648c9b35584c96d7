"""Export a checkpoint of a base or LoRA run for other tools: a standalone .ckpt or safetensors + config JSON.

    python scripts/export.py checkpoints/base_training/run_001 --out model.safetensors --format safetensors
    python scripts/export.py checkpoints/base_training/run_001 --which step_0000120 --dtype bf16 --out m.ckpt
    python scripts/export.py checkpoints/lora_finetuning/run_001 --which best --out trees_merged.ckpt

A LoRA run is exported with its adapters merged into the base (``--adapter``: the adapter tensors alone). The
result loads like any base checkpoint (`trainer.load_model`, torch.load + build_model, or
safetensors.torch.load_file + load_state_dict(strict=True) with the config beside it).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder (base or LoRA) or a .ckpt file")
    parser.add_argument("--which", default="best", help="best, last, an epoch number or a tag (default best)")
    parser.add_argument("--out", type=Path, required=True, help="file to write (.ckpt or .safetensors)")
    parser.add_argument("--format", choices=["ckpt", "safetensors"], help="default: from --out's suffix")
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA weights")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="floating dtype of the exported tensors (default fp32)")  # fmt: skip
    parser.add_argument("--adapter", action="store_true", help="LoRA runs: the adapter tensors, not merged")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.errors import UserError, exit_code

    def export() -> None:
        from trainer.export import exported, write_export

        suffixes = {".ckpt": "ckpt", ".safetensors": "safetensors"}
        if args.format is None and args.out.suffix not in suffixes:
            raise UserError(
                f"--out {args.out}: name a .ckpt or .safetensors file, or pass --format ckpt|safetensors"
            )
        fmt = args.format or suffixes[args.out.suffix]
        written = [args.out, args.out.with_suffix(".json")] if fmt == "safetensors" else [args.out]
        existing = [str(p) for p in written if p.exists()]
        if existing and not args.force:
            raise UserError(
                f"{' and '.join(existing)} {'exist' if len(existing) > 1 else 'exists'}; pass --force to replace "
                f"{'them' if len(existing) > 1 else 'it'}, or choose another --out"
            )
        ckpt = exported(Path(args.run), args.which, raw=args.raw, adapter=args.adapter)
        paths = write_export(ckpt, args.out, fmt=fmt, raw=args.raw, dtype=args.dtype)
        what = "raw" if args.raw else "EMA"
        print(f"Wrote {', '.join(map(str, paths))} ({what} weights, {args.dtype}, epoch {ckpt.get('epoch')})")

    return exit_code(export)


if __name__ == "__main__":
    sys.exit(main())
