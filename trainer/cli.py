"""Command line of the training scripts: parse, then list runs or train (``train.py``).

Bad input of any kind ends in one ``error: ...`` line (printed by global rank 0) and exit code 2; nothing
is created on disk before the config, the data and the model have been validated. Nothing here imports
torch: ``--list-runs`` and ``--help`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.errors import launched_rank
from trainer.errors import UserError, exit_code
from trainer.runs.layout import kind_root
from trainer.runs.listing import (
    SORT_KEYS,
    filter_keys,
    filter_runs,
    format_table,
    list_runs,
    mark_best,
    sort_runs,
)
from trainer.training.kinds import RunKind, run_kind


def build_parser(kind: RunKind) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=kind.description,
        epilog="Settings not given take the --config file's values. Launch with `accelerate launch "
        "--config_file configs/accelerate/<name>.yaml` for several processes or DeepSpeed; plain `python` runs "
        "one process.",
    )
    parser.add_argument("--config", type=Path, help=f"training YAML (default {kind.default_config})")
    parser.add_argument("--data", help="data preset name (configs/data/) or YAML path")
    parser.add_argument("--dataset", dest="data", help="alias of --data (CIFAR10, CIFAR100, digits)")
    parser.add_argument("--experiment", help="experiment name shown in listings")
    parser.add_argument("--epochs", type=int, help="epochs to train in all (a resume may raise it)")
    parser.add_argument("--batch-size", type=int, help="global batch size (all processes together)")
    parser.add_argument("--gradient-accumulation-steps", type=int, metavar="N",
                        help="micro-batches each process sums per optimizer step (default: the accelerate or "
                        "DeepSpeed config's, else 1); the global batch stays --batch-size")  # fmt: skip
    parser.add_argument("--learning-rate", type=float, help="peak learning rate")
    parser.add_argument("--seed", type=int, help="seed of the data order, noise and initial weights")
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap optimizer steps per epoch (smoke runs)")
    parser.add_argument("--accept-launch", action="store_true",
                        help="train as launched where the launch differs from what its config evidently asked for "
                        "(more processes than CPU cores without a GPU; one process where several were asked)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key (dotted, value parsed as YAML); repeatable")  # fmt: skip
    parser.add_argument("--checkpoint-root", type=Path, default=Path("checkpoints"),
                        help="the folder holding every run (default: checkpoints)")  # fmt: skip
    parser.add_argument("--run-number", type=int, help="number of a new run, or of the run to --resume")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="N",
                        help="continue run N (or --run-number N, or the newest run when no number is given)")  # fmt: skip
    parser.add_argument(
        "--auto-resume", action="store_true",
        help="the same command for every attempt of a job: continue the job's run if it has one (identified by "
        "--run-key, else SLURM's job id, else the torch elastic launch), else start it; a completed one is left "
        "alone",
    )  # fmt: skip
    parser.add_argument("--run-key", metavar="KEY", help="with --auto-resume: what identifies the job")
    parser.add_argument("--fork", type=int, metavar="N",
                        help="start a new run from run N's checkpoint (--from TAG, default its newest) with its "
                        "whole state; run N is not touched")  # fmt: skip
    parser.add_argument("--from", dest="from_tag", metavar="TAG",
                        help="with --resume N: go back to checkpoint TAG (an epoch number, epoch_005, "
                        "step_0000120, best, last); newer ones move to superseded/. With --fork N: start there")  # fmt: skip
    kind.add_arguments(parser)
    listing = parser.add_argument_group("listing runs")
    listing.add_argument("--list-runs", action="store_true", help="print the runs and exit")
    listing.add_argument("--json", action="store_true", help="with --list-runs: print JSON")
    sort_help = "; ".join(f"{k}: {v}" for k, v in SORT_KEYS.items())
    listing.add_argument("--sort", choices=list(SORT_KEYS), metavar="KEY",
                         help=f"with --list-runs: order rows by KEY ({sort_help})")  # fmt: skip
    listing.add_argument(
        "--filter", dest="filters", action="append", default=[], metavar="EXPR",
        help="with --list-runs: keep runs where KEY=VALUE (equal) or KEY~TEXT (contains, any case); "
        "repeatable, all must match. Keys: " + ", ".join(filter_keys()),
    )  # fmt: skip
    listing.add_argument("--plot", type=Path, metavar="OUT.png",
                         help="with --list-runs: also draw the monitored metric per epoch of every listed run "
                         "into OUT.png")  # fmt: skip
    return parser


def main(argv: list[str] | None = None, kind: str = "base") -> int:
    run_kind_ = run_kind(kind)
    args = build_parser(run_kind_).parse_args(argv)
    return exit_code(lambda: _dispatch(args, run_kind_))


def _dispatch(args: argparse.Namespace, kind: RunKind) -> int:
    if args.list_runs:
        if launched_rank() != 0:  # under a launcher every process gets here: the table and chart are rank 0's
            return 0
        return print_runs(args.checkpoint_root, kind, as_json=args.json, sort=args.sort, filters=args.filters,
                          plot=args.plot)  # fmt: skip
    given = [flag for flag, value in (("--json", args.json), ("--sort", args.sort), ("--filter", args.filters),
                                      ("--plot", args.plot)) if value]  # fmt: skip
    if given:
        raise UserError(f"{', '.join(given)} only apply to --list-runs: add --list-runs to list the runs")
    from trainer.training.train import train

    return train(args, kind)


def print_runs(
    checkpoint_root: Path,
    kind: RunKind,
    *,
    as_json: bool,
    sort: str | None = None,
    filters: list[str] | None = None,
    plot: Path | None = None,
) -> int:
    """The ``--list-runs`` output: runs filtered, sorted, best marked among those shown; optionally a chart."""
    if checkpoint_root.exists() and not checkpoint_root.is_dir():
        raise UserError(f"--checkpoint-root {checkpoint_root} is a file, not a folder of runs")
    root = kind_root(checkpoint_root, kind.name)
    rows = filter_runs(list_runs(root), filters or [])
    rows = mark_best(sort_runs(rows, sort or "run"))
    if plot is not None:
        from trainer.runs.plots import metric_figure, save_figure  # matplotlib only when a chart is asked for

        save_figure(metric_figure(rows, title=kind.title), plot)
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(format_table(rows, f"{kind.title} in {root}"))
    if plot is not None:  # stderr: keeps --json output parseable
        print(f"Wrote {plot}", file=sys.stderr)
    return 0
