"""Inspect runs: one run's config, history and checkpoints, or the config keys two runs differ in; hand a base
run's checkpoint to LoRA fine-tuning.

    python scripts/runs.py show 3                     # base run 003 under ./checkpoints
    python scripts/runs.py diff 2 5 --kind lora --checkpoint-root /data/ckpts
    python scripts/runs.py hand-off 1                 # base run 001's best -> checkpoints/base/base_model_last.ckpt

To list and compare all runs use `scripts/train_base.py --list-runs` (with --sort, --filter, --plot).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainer.errors import exit_code
from trainer.runs.report import find_run, format_diff, format_show
from trainer.runs.store import hand_off


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kind", choices=["base", "lora"], default="base", help="run kind (default base)")
    common.add_argument("--checkpoint-root", type=Path, default=Path("checkpoints"),
                        help="the folder holding every run (default: checkpoints)")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", parents=[common], help="config, history and checkpoints of run N")
    show.add_argument("run", type=int, metavar="N", help="the run's number (3 for run_003)")
    diff = commands.add_parser("diff", parents=[common], help="config keys that differ between runs N and M")
    diff.add_argument("run", type=int, metavar="N", help="one run's number")
    diff.add_argument("other", type=int, metavar="M", help="the other run's number")
    hand_off = commands.add_parser("hand-off", help="copy base run N's checkpoint to where train_lora.py looks "
                                   "first (checkpoints/base/base_model_last.ckpt), replacing an earlier one")  # fmt: skip
    hand_off.add_argument("run", type=int, metavar="N", help="the base run's number")
    hand_off.add_argument(
        "--which", default="best", help="best, last, an epoch number or a tag (default best)"
    )
    hand_off.add_argument("--checkpoint-root", type=Path, default=Path("checkpoints"),
                          help="the folder holding every run (default: checkpoints)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def report() -> None:
        if args.command == "hand-off":
            target = hand_off(args.checkpoint_root, args.run, args.which)
            print(f"Handed off base run {args.run:03d}'s {args.which} checkpoint: {target}")
            return
        first = find_run(args.checkpoint_root, args.kind, args.run)
        if args.command == "show":
            print(format_show(first))
        else:
            print(format_diff(first, find_run(args.checkpoint_root, args.kind, args.other)))

    return exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
