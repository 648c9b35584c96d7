"""Draw a sample grid from any base or LoRA run (EMA weights): one row per class.

    python scripts/sample.py checkpoints/base_training/run_001 --classes 0,3,7 --n 30 --out grid.png
    python scripts/sample.py checkpoints/lora_finetuning/run_002 --which last --classes oak,maple
    python scripts/sample.py some/epoch_004.ckpt --steps 32 --guidance 3 --seed 1

Classes are indices or names of the run's dataset (names need the dataset on disk; without it the rows are
"class i").
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainer.errors import UserError, exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", metavar="RUN_OR_CKPT", help="base or LoRA run folder, or a .ckpt file")
    parser.add_argument("--which", default="best", help="best, last, an epoch number or a tag (default best)")
    parser.add_argument(
        "--classes", help="comma-separated class names or indices (a name wins where both fit; default all)"
    )
    parser.add_argument("--n", type=int, default=64,
                        help="images in all, spread evenly over the classes: at least one per class drawn")  # fmt: skip
    parser.add_argument("--steps", type=int, default=18, help="sampler steps (EDM Heun)")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (default 0)")
    parser.add_argument("--out", type=Path, default=Path("grid.png"), help="PNG to write (default grid.png)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser


def class_names(config: dict[str, Any], num_classes: int) -> list[str]:
    """The dataset's class names when the data is at hand (digits always is), else ``class i`` and a note
    saying why (the data absent offline, a file refused, an older config)."""
    fallback = [f"class {i}" for i in range(num_classes)]
    try:
        from trainer.config.schema import TrainConfig, from_dict
        from trainer.training.factory import load_data

        names = load_data(from_dict(TrainConfig, config)).class_names
    except (UserError, OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"warning: rows are labelled 'class i': the class names of the data are not at hand ({reason})",
              file=sys.stderr)  # fmt: skip
        return fallback
    return list(names) if len(names) == num_classes else fallback


def pick_classes(text: str | None, names: list[str]) -> list[int]:
    """Indices for ``--classes``: each item an index or a class name (case ignored)."""
    if text is None:
        return list(range(len(names)))
    lowered = [n.lower() for n in names]
    picked = []
    for item in (s.strip() for s in text.split(",")):
        if item.lower() in lowered:
            picked.append(lowered.index(item.lower()))
        elif item.lstrip("-").isdigit() and 0 <= int(item) < len(names):
            picked.append(int(item))
        else:
            raise UserError(
                f"--classes: {item!r} is neither a class index 0-{len(names) - 1} nor a class name "
                f"({', '.join(names)})"
            )
    return picked


def sample(args: argparse.Namespace) -> Path:
    import torch

    from model import EDMSchedule
    from model.lora import base_diffit
    from trainer.api import checkpoint_path, load_model
    from trainer.training.samples import sample_grid, save_grid

    if args.n < 1 or args.steps < 2:
        raise UserError("--n must be at least 1 and --steps at least 2")
    if args.out.exists() and not args.force:
        raise UserError(f"{args.out} exists; pass --force to replace it, or choose another --out")
    file = checkpoint_path(args.run, args.which)
    model = load_model(file, ema=True, device=args.device)
    config = torch.load(file, map_location="cpu", weights_only=True, mmap=True)["config"]
    num_classes = base_diffit(model).num_classes
    if num_classes:
        names = class_names(config, num_classes)
        rows = pick_classes(args.classes, names)
    elif args.classes is not None:
        raise UserError(f"{file} is an unconditional model; drop --classes")
    else:
        names, rows = ["samples"], [0]
    if args.n < len(rows):
        raise UserError(
            f"--n {args.n} is fewer than the {len(rows)} classes drawn (a row each): pass --n {len(rows)} or more, "
            "or choose classes with --classes"
        )
    per_class = math.ceil(args.n / len(rows))
    edm = config.get("edm") or {}
    schedule = EDMSchedule(
        args.steps, edm.get("sigma_min", 0.002), edm.get("sigma_max", 80.0), edm.get("rho", 7.0)
    )
    images = sample_grid(
        model,
        class_names=names,
        per_class=per_class,
        schedule=schedule,
        guidance=args.guidance,
        seed=args.seed,
        classes=rows,
    )
    save_grid(images, [names[r] for r in rows], per_class, args.out)
    print(f"Wrote {args.out}: {len(rows)} row(s) x {per_class} images from {file}")
    return args.out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        sample(args)

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
