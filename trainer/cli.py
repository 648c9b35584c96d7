"""Command line of the training scripts: parse → resolve the run → build → train, or list runs.

Bad input of any kind ends in one ``error: ...`` line (printed by global rank 0) and exit code 2; nothing
is created on disk before the config, the data and the model have been validated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trainer.checkpoint.io.atomic import atomic_write_json
from trainer.config import (
    CONFIG_DIR,
    ConfigError,
    ModelConfig,
    TrainConfig,
    build_config,
    diff_keys,
    from_dict,
    parse_override,
)
from trainer.errors import Interrupted, SaveFailed, UserError, exit_code
from trainer.runs.store import (
    SORT_KEYS,
    RunHandle,
    allocate_run,
    filter_keys,
    filter_runs,
    format_table,
    kind_root,
    list_runs,
    mark_best,
    new_metadata,
    resolve_run,
    run_dir,
    sort_runs,
    write_metadata,
)

DEFAULT_CONFIGS = {
    "base": CONFIG_DIR / "training" / "base_training.yaml",
    "lora": CONFIG_DIR / "training" / "lora_finetuning.yaml",
}
TITLES = {"base": "Base model training runs", "lora": "LoRA fine-tuning runs"}
HEADLINES = {"base": "Base model training", "lora": "LoRA fine-tuning"}
# Without --base-checkpoint a LoRA run uses this file if present (the seed workflow's hand-off point).
DEFAULT_BASE = Path("base") / "base_model_last.ckpt"


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
    if kind == "lora":
        parser.add_argument(
            "--base-checkpoint",
            help="base .ckpt file or base run folder (its best.ckpt); default: <checkpoint-root>/"
            f"{DEFAULT_BASE}, else the best checkpoint of the newest completed base run",
        )
        parser.add_argument("--lora-config", help="LoRA preset name (configs/lora/) or YAML path")
    parser.add_argument("--list-runs", action="store_true", help="print the runs and exit")
    parser.add_argument("--json", action="store_true", help="with --list-runs: print JSON")
    sort_help = "; ".join(f"{k}: {v}" for k, v in SORT_KEYS.items())
    parser.add_argument(
        "--sort",
        choices=list(SORT_KEYS),
        metavar="KEY",
        help=f"with --list-runs: order rows by KEY ({sort_help})",
    )
    parser.add_argument(
        "--filter",
        dest="filters",
        action="append",
        default=[],
        metavar="EXPR",
        help="with --list-runs: keep runs where KEY=VALUE (equal) or KEY~TEXT (contains, any case); "
        "repeatable, all must match. Keys: " + ", ".join(filter_keys()),
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="OUT.png",
        help="with --list-runs: also draw the monitored metric per epoch of every listed run into OUT.png",
    )
    return parser


def main(argv: list[str] | None = None, kind: str = "base") -> int:
    args = build_parser(kind).parse_args(argv)
    return exit_code(lambda: _dispatch(args, kind))


def _dispatch(args: argparse.Namespace, kind: str) -> int:
    if args.list_runs:
        return print_runs(
            args.checkpoint_root,
            kind,
            as_json=args.json,
            sort=args.sort,
            filters=args.filters,
            plot=args.plot,
        )
    if args.sort or args.filters or args.plot:
        raise UserError("--sort, --filter and --plot only apply to --list-runs")
    return train(args, kind)


def print_runs(
    checkpoint_root: Path,
    kind: str,
    *,
    as_json: bool,
    sort: str | None = None,
    filters: list[str] | None = None,
    plot: Path | None = None,
) -> int:
    """The ``--list-runs`` output: runs filtered, sorted, best marked among those shown; optionally a chart."""
    root = kind_root(checkpoint_root, kind)
    rows = filter_runs(list_runs(root), filters or [])
    rows = mark_best(sort_runs(rows, sort or "run"))
    title = f"{TITLES[kind]} in {root}"
    if plot is not None:
        from trainer.runs.plots import metric_figure, save_figure  # matplotlib only when a chart is asked for

        save_figure(metric_figure(rows, title=TITLES[kind]), plot)
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(format_table(rows, title))
    if plot is not None:  # stderr: keeps --json output parseable
        print(f"Wrote {plot}", file=sys.stderr)
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
        "lora": getattr(args, "lora_config", None),
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
    resuming, wanted = resume_number(args)
    overrides, set_keys = cli_overrides(args)
    root = kind_root(args.checkpoint_root, kind)
    if not resuming:  # a bad config is refused before torch is even imported
        config = build_config(args.config or DEFAULT_CONFIGS[kind], overrides, TrainConfig)

    # Heavy imports (torch, accelerate) only here, so --list-runs, --help and config errors are instant.
    from launch import build_accelerator, decide_on_rank0, release_shm_segment, topology
    from trainer.checkpoint.io.staging import retain_freed_heap
    from trainer.factory import (
        base_weights,
        build_lora_model,
        build_model,
        load_data,
        resolve_model_against_data,
    )
    from trainer.loop import Trainer, plan_steps

    retain_freed_heap()  # before training's allocations: its steps then page-fault no memory back in
    accelerator = build_accelerator()
    topo = topology(accelerator)

    number: int | None = None
    base: dict[str, Any] | None = None
    if resuming:
        number = decide_on_rank0(topo, lambda: resolve_run(root, wanted))
        stored = json.loads((run_dir(root, number) / "config.json").read_text())
        config = build_config(stored, overrides, TrainConfig)
        if kind == "lora":
            base = load_stored_base(run_dir(root, number))
    elif kind == "lora":
        if args.model is not None:
            raise ConfigError("a LoRA run adapts the base checkpoint's model; drop --model")
        path = resolve_base_checkpoint(args.base_checkpoint, args.checkpoint_root)
        base = load_base_checkpoint(path)
        config.model = from_dict(ModelConfig, base["config"]["model"], "model.")
        config.base_checkpoint = str(path.resolve())

    splits = load_data(config)
    resolve_model_against_data(config, splits)
    if number is not None:
        _refuse_model_change(stored["model"], config, set_keys, number)
    if kind == "lora":
        if config.lora is None:
            raise ConfigError("a LoRA run needs a 'lora' section: pass --lora-config NAME|PATH")
        if config.lora.num_classes is None:
            config.lora.num_classes = splits.num_classes
        assert base is not None
        build_lora_model(config, base_weights(base))  # bad targets surface before anything is written
    else:
        build_model(config)  # architecture errors surface before anything is written
    plan_steps(config, len(splits.train), topo.world_size)

    if not resuming:
        number = decide_on_rank0(topo, lambda: _create_run(root, args.run_number, config, splits, topo, kind))
    assert number is not None

    run = RunHandle(run_dir(root, number), number, is_main=topo.is_main)
    try:
        trainer = Trainer(config, accelerator, topo, run, splits, kind=kind)
        if resuming:
            trainer.resume()
            if topo.is_main:  # only now: a refused resume leaves the run exactly as it was
                atomic_write_json(run.path / "config.json", config.to_dict())
        else:
            run.print(f"{HEADLINES[kind]} - run {number:03d} ({run.path})")
        trainer.fit()
    except UserError:
        raise
    except Interrupted as e:
        run.finish("interrupted")
        run.print(
            f"Interrupted ({e}): run {number:03d} saved a resumable checkpoint and is marked interrupted; "
            f"continue it with --resume {number}"
        )
        return 0
    except SaveFailed as e:
        run.finish("failed")
        if topo.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        run.finish("interrupted")
        run.print(
            f"Interrupted: run {number:03d} is marked interrupted; continue it from its last checkpoint with "
            f"--resume {number}"
        )
        raise
    except BaseException:
        run.finish("failed")
        raise
    finally:
        accelerator.end_training()
        release_shm_segment()
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
    (path / "logs").mkdir()
    base_record = None
    if kind == "lora":
        from trainer.checkpoint.io.atomic import link_or_copy
        from trainer.factory import sha256_of

        assert config.base_checkpoint is not None
        (path / "base_model").mkdir()
        stored_base = path / "base_model" / "base_model.ckpt"
        link_or_copy(Path(config.base_checkpoint), stored_base)  # stored once; a hard link costs no disk
        base_record = {"source": config.base_checkpoint, "sha256": sha256_of(stored_base)}
    else:
        (path / "checkpoints").mkdir()
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
    if base_record is not None:
        metadata["base_checkpoint"] = base_record
    write_metadata(path, metadata)
    return number


# --------------------------------------------------------------------------------------------------
# The base model of a LoRA run
# --------------------------------------------------------------------------------------------------


def resolve_base_checkpoint(given: str | None, checkpoint_root: Path) -> Path:
    """``--base-checkpoint`` (file or base run folder), else the default file, else the newest base run's best."""
    if given is not None:
        path = Path(given)
        if path.is_dir():
            path = path / "checkpoints" / "best.ckpt"
        if not path.is_file():
            raise UserError(f"base checkpoint not found: {path}")
        return path
    default = checkpoint_root / DEFAULT_BASE
    if default.is_file():
        return default
    for row in reversed(list_runs(kind_root(checkpoint_root, "base"))):
        best = Path(row.path) / "checkpoints" / "best.ckpt"
        if row.status == "completed" and best.is_file():
            return best
    raise UserError(
        f"no base model to fine-tune: neither {default} nor a completed base run under "
        f"{kind_root(checkpoint_root, 'base')}. Train one first (python scripts/train_base.py) or pass "
        "--base-checkpoint PATH"
    )


def load_base_checkpoint(path: Path) -> dict[str, Any]:
    from trainer.checkpoint.formats.base import load_checkpoint_file

    try:
        ckpt = load_checkpoint_file(path)
    except UserError as e:
        raise UserError(f"{e}; --base-checkpoint takes a base model .ckpt or a base run folder") from None
    if (
        ckpt.get("kind") != "base"
        or not isinstance(ckpt.get("config"), dict)
        or "model" not in ckpt["config"]
    ):
        raise UserError(f"{path} is not a base model checkpoint of this trainer (kind {ckpt.get('kind')!r})")
    return ckpt


def load_stored_base(run: Path) -> dict[str, Any]:
    """The base a LoRA run was started from, checked against the sha256 its metadata recorded."""
    from trainer.factory import sha256_of
    from trainer.runs.store import read_metadata

    stored = run / "base_model" / "base_model.ckpt"
    record = read_metadata(run).get("base_checkpoint") or {}
    if not stored.is_file():
        raise UserError(f"the stored base model of {run.name} is gone ({stored}); this run cannot be resumed")
    if record.get("sha256") != sha256_of(stored):
        raise UserError(
            f"the stored base model of {run.name} changed since the run started (sha256 differs from "
            "metadata.json); resuming would adapt a different model. Restore the original file or start a new run"
        )
    return load_base_checkpoint(stored)
