"""One launch of a training script, on every process: resolve the run, build, train, and end it cleanly.

The config, the data and the model are validated before anything is created on disk; global rank 0 decides
which run (new or resumed) and every process learns it. However training ends, the run's status says so:
``completed``, ``interrupted`` (a stop signal: a resumable checkpoint was saved, exit 0) or ``failed``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.config_files import build_config, diff_keys, parse_override
from trainer.errors import Interrupted, SaveFailed, UserError
from trainer.kinds import RunKind
from trainer.runs.layout import RunLayout, kind_root
from trainer.runs.metadata import RunHandle, new_metadata
from trainer.runs.store import RunError, clear_leftovers, create_run, resolve_run


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


def train(args: argparse.Namespace, kind: RunKind) -> int:
    resuming, wanted = resume_number(args)
    overrides, set_keys = cli_overrides(args)
    root = kind_root(args.checkpoint_root, kind.name)
    config = None if resuming else build_config(args.config or kind.default_config, overrides, TrainConfig)

    # Heavy imports (torch, accelerate) only from here on: config errors above are instant.
    from launch import build_accelerator, decide_on_rank0, topology
    from trainer.checkpoint.io.staging import retain_freed_heap

    retain_freed_heap()  # process-wide, before training's allocations: its steps page-fault nothing back in
    timeout = timedelta(minutes=_timeout_minutes(config, root, wanted, overrides))
    accelerator = build_accelerator(timeout)
    topo = topology(accelerator, timeout)

    layout: RunLayout | None = None
    if resuming:

        def resolve() -> RunLayout:
            found = RunLayout.of(args.checkpoint_root, kind.name, resolve_run(root, wanted))
            clear_leftovers(found)
            return found

        layout = decide_on_rank0(topo.comm, topo.is_main, resolve, errors=(UserError,),
                                 what="choosing the run to resume")  # fmt: skip
        stored = read_config(layout)
        config = build_config(stored, overrides, TrainConfig)
        kind.prepare(config, args, layout)
        store = None
    else:
        assert config is not None
        store = kind.prepare(config, args, None)
    splits = _load_data(config)
    if layout is not None:
        _refuse_model_change(stored["model"], config, set_keys, layout.number)
    kind.complete(config, splits.num_classes)
    from trainer.plan import plan_steps

    plan_steps(config, len(splits.train), topo.world_size)
    if layout is None:
        metadata = new_metadata(kind=kind.name, experiment=config.experiment, dataset=splits.name,
                                num_classes=splits.num_classes, world_size=topo.world_size,
                                distributed=topo.distributed)  # fmt: skip
        metadata["config_summary"] = _summary(config)
        layout = decide_on_rank0(
            topo.comm, topo.is_main,
            lambda: create_run(root, kind.name, args.run_number, config=config.to_dict(), metadata=metadata, base=store),
            errors=(UserError,), what="creating the run",
        )  # fmt: skip
    return _run(config, accelerator, topo, RunHandle(layout, is_main=topo.is_main), splits, kind, resuming)


def _run(config: TrainConfig, accelerator: Any, topo: Any, run: RunHandle, splits: Any, kind: RunKind,
         resuming: bool) -> int:  # fmt: skip
    """Train the run; whatever happens, its status says how it ended."""
    from launch import PeerLost, release_shm_segment
    from trainer.faults import Faults
    from trainer.loop import Trainer

    number = run.number
    try:
        trainer = Trainer(config, accelerator, topo, run, splits, kind, Faults.from_environment(topo.rank))
        if resuming:
            trainer.resume()
            if topo.is_main:  # only now: a refused resume leaves the run exactly as it was
                from trainer.checkpoint.io.atomic import atomic_write_json

                atomic_write_json(run.layout.config, config.to_dict())
        else:
            run.print(f"{kind.headline} - run {number:03d} ({run.path})")
        trainer.fit()
    except UserError:
        raise
    except Interrupted as e:
        run.finish("interrupted")
        run.print(f"Interrupted ({e}): run {number:03d} saved a resumable checkpoint and is marked "
                  f"interrupted; continue it with --resume {number}")  # fmt: skip
        return 0
    except (SaveFailed, PeerLost) as e:
        run.finish("failed")
        if topo.is_main or isinstance(e, PeerLost):  # a lost peer: every survivor says what it waited for
            where = f"rank {topo.rank}: " if isinstance(e, PeerLost) else ""
            hint = f"; committed checkpoints are intact: continue with --resume {number}" if where else ""
            print(f"error: {where}{e}{hint}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        run.finish("interrupted")
        run.print(f"Interrupted: run {number:03d} is marked interrupted; continue it from its last checkpoint "
                  f"with --resume {number}")  # fmt: skip
        raise
    except BaseException:
        run.finish("failed")
        raise
    finally:
        accelerator.end_training()
        release_shm_segment()
    return 0


def read_config(layout: RunLayout) -> dict[str, Any]:
    try:
        data = json.loads(layout.config.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {layout.config}: {e}") from None
    if not isinstance(data, dict):
        raise RunError(f"{layout.config} does not hold an object")
    return data


def _timeout_minutes(config: TrainConfig | None, root: Path, wanted: int | None,
                     overrides: list[tuple[str, Any]]) -> float:  # fmt: skip
    """``distributed.timeout_minutes`` before any process group exists: a new run's config, or (best effort,
    read by every process) the stored config of the run to resume with this launch's overrides."""
    if config is None:
        from trainer.runs.store import run_numbers

        numbers = run_numbers(root)
        number = wanted if wanted is not None else (numbers[-1] if numbers else None)
        try:
            stored = read_config(RunLayout(root / f"run_{number:03d}", "base")) if number is not None else {}
            config = build_config(stored, overrides, TrainConfig)
        except UserError:
            return TrainConfig().distributed.timeout_minutes
    return config.distributed.timeout_minutes


def _load_data(config: TrainConfig) -> Any:
    from trainer.factory import load_data, resolve_model_against_data

    splits = load_data(config)
    resolve_model_against_data(config, splits)
    return splits


def _summary(config: TrainConfig) -> dict[str, Any]:
    return {"learning_rate": config.learning_rate, "batch_size": config.batch_size,
            "model": config.model.name, "seed": config.seed}  # fmt: skip


def _refuse_model_change(
    stored: dict[str, Any], config: TrainConfig, set_keys: set[str], number: int
) -> None:
    """A resumed run keeps its architecture unless the user overrides a key on purpose with --set."""
    changed = [k for k in diff_keys(stored, config.to_dict()["model"]) if f"model.{k}" not in set_keys]
    if changed:
        from trainer.config import ConfigError

        raise ConfigError(
            f"resuming run {number:03d} would change model keys {', '.join(changed)}, which must match its "
            "checkpoints; drop the flag that changes them, or override on purpose with --set model.KEY=VALUE"
        )
