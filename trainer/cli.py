"""Command line of the training scripts: parse → resolve the run → build → train, or list runs.

Bad input of any kind ends in one ``error: ...`` line (printed by global rank 0) and exit code 2; nothing
is created on disk before the config, the data and the model have been validated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from trainer.atomic import atomic_write_json
from trainer.config import CONFIG_DIR, ConfigError, TrainConfig, build_config, diff_keys, parse_override
from trainer.errors import UserError
from trainer.runs import (
    RunError,
    RunHandle,
    allocate_run,
    format_table,
    kind_root,
    list_runs,
    new_metadata,
    resolve_run,
    run_dir,
    write_metadata,
)

DEFAULT_CONFIGS = {"base": CONFIG_DIR / "training" / "base_training.yaml"}
TITLES = {"base": "Base model training runs"}


def build_parser(kind: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train DiffiT (EDM) with crash-proof run and checkpoint management.",
        epilog="Launch with `accelerate launch --config_file configs/accelerate/<name>.yaml` for several "
        "processes or DeepSpeed; plain `python` runs one process.",
    )
    parser.add_argument("--config", type=Path, help=f"training YAML (default {DEFAULT_CONFIGS[kind]})")
    parser.add_argument("--data", help="data preset name (configs/data/) or YAML path")
    parser.add_argument("--dataset", dest="data", help="alias of --data (CIFAR10, CIFAR100, digits)")
    parser.add_argument("--model", help="model preset name (configs/model/) or YAML path")
    parser.add_argument("--experiment", help="experiment name shown in listings")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch size (all processes together)")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap optimizer steps per epoch (smoke runs)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key (dotted, value parsed as YAML); repeatable",
    )
    parser.add_argument("--checkpoint-root", type=Path, default=Path("checkpoints"))
    parser.add_argument("--run-number", type=int, help="number of a new run, or of the run to --resume")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="N",
        help="continue run N (or --run-number N, or the newest run when no number is given)",
    )
    parser.add_argument("--list-runs", action="store_true", help="print the runs and exit")
    parser.add_argument("--json", action="store_true", help="with --list-runs: print JSON")
    return parser


def main(argv: list[str] | None = None, kind: str = "base") -> int:
    args = build_parser(kind).parse_args(argv)
    try:
        if args.list_runs:
            return print_runs(args.checkpoint_root, kind, as_json=args.json)
        return train(args, kind)
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def print_runs(checkpoint_root: Path, kind: str, *, as_json: bool) -> int:
    rows = list_runs(kind_root(checkpoint_root, kind))
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(format_table(rows, f"{TITLES[kind]} in {kind_root(checkpoint_root, kind)}"))
    return 0


def cli_overrides(args: argparse.Namespace) -> tuple[list[tuple[str, Any]], set[str]]:
    """(overrides in order, keys given through --set) from the flags the user actually passed."""
    flags = {
        "data": args.data,
        "model": args.model,
        "experiment": args.experiment,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "max_steps_per_epoch": args.max_steps_per_epoch,
    }
    overrides = [(k, v) for k, v in flags.items() if v is not None]
    explicit = [parse_override(text) for text in args.overrides]
    return overrides + explicit, {k for k, _ in explicit}


def resume_number(args: argparse.Namespace) -> tuple[bool, int | None]:
    """(resuming?, run number or None for the newest)."""
    if args.resume is None:
        return False, None
    if args.resume == "latest":
        return True, args.run_number
    try:
        number = int(args.resume)
    except ValueError:
        raise UserError(f"--resume takes a run number, got {args.resume!r}") from None
    if args.run_number is not None and args.run_number != number:
        raise UserError(f"--resume {number} and --run-number {args.run_number} name different runs")
    return True, number


def train(args: argparse.Namespace, kind: str) -> int:
    # Heavy imports (torch, accelerate) only here, so --list-runs and --help start instantly.
    from launch import broadcast_object, build_accelerator, topology
    from trainer.factory import build_model, load_data, resolve_model_against_data
    from trainer.loop import Trainer, plan_steps

    resuming, wanted = resume_number(args)
    overrides, set_keys = cli_overrides(args)
    root = kind_root(args.checkpoint_root, kind)
    accelerator = build_accelerator()
    topo = topology(accelerator)

    number: int | None = None
    if resuming:
        number = _on_rank0(topo, lambda: resolve_run(root, wanted), broadcast_object)
        stored = json.loads((run_dir(root, number) / "config.json").read_text())
        config: TrainConfig = build_config(stored, overrides)
    else:
        config = build_config(args.config or DEFAULT_CONFIGS[kind], overrides, TrainConfig)

    splits = load_data(config)
    resolve_model_against_data(config, splits)
    if number is not None:
        _refuse_model_change(stored["model"], config, set_keys, number)
    build_model(config)  # architecture errors surface before anything is written
    plan_steps(config, len(splits.train), topo.world_size)

    if not resuming:
        number = _on_rank0(
            topo, lambda: _create_run(root, args.run_number, config, splits, topo, kind), broadcast_object
        )
    assert number is not None

    run = RunHandle(run_dir(root, number), number, is_main=topo.is_main)
    try:
        trainer = Trainer(config, accelerator, topo, run, splits)
        if resuming:
            trainer.resume()
            if topo.is_main:  # only now: a refused resume leaves the run exactly as it was
                atomic_write_json(run.path / "config.json", config.to_dict())
        else:
            run.print(f"Base model training - run {number:03d} ({run.path})")
        trainer.fit()
    except UserError:
        raise
    except KeyboardInterrupt:
        run.finish("interrupted")
        raise
    except BaseException:
        run.finish("failed")
        raise
    finally:
        accelerator.end_training()
    return 0


def _refuse_model_change(
    stored: dict[str, Any], config: TrainConfig, set_keys: set[str], number: int
) -> None:
    """A resumed run keeps its architecture unless the user overrides a key on purpose with --set."""
    changed = [k for k in diff_keys(stored, config.to_dict()["model"]) if f"model.{k}" not in set_keys]
    if changed:
        raise ConfigError(
            f"resuming run {number:03d} would change model keys {', '.join(changed)}, which must match its "
            "checkpoints; drop the flag that changes them, or override on purpose with --set model.KEY=VALUE"
        )


def _create_run(
    root: Path, number: int | None, config: TrainConfig, splits: Any, topo: Any, kind: str
) -> int:
    number = allocate_run(root, number)
    path = run_dir(root, number)
    (path / "checkpoints").mkdir()
    (path / "logs").mkdir()
    atomic_write_json(path / "config.json", config.to_dict())
    metadata = new_metadata(
        number=number,
        kind=kind,
        experiment=config.experiment,
        dataset=splits.name,
        num_classes=splits.num_classes,
        world_size=topo.world_size,
        distributed=topo.distributed,
    )
    metadata["config_summary"] = {
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "model": config.model.name,
        "seed": config.seed,
    }
    write_metadata(path, metadata)
    return number


def _on_rank0(topo: Any, decide: Any, broadcast_object: Any) -> Any:
    """Run ``decide`` on global rank 0 only and give its result (or its user error) to every rank."""
    outcome: tuple[Any, str | None] = (None, None)
    if topo.is_main:
        try:
            outcome = (decide(), None)
        except UserError as e:
            outcome = (None, str(e))
    value, error = broadcast_object(outcome, topo)
    if error is not None:
        raise RunError(error)
    return value
