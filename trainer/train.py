"""One launch of a training script, on every process: find the run, build, train, and end it cleanly.

The config, the data and the model are validated before anything is created on disk; global rank 0 decides
which run (new, resumed, or the job's own with ``--auto-resume``), holds its lock, and every process learns
the decision. However training ends, the run's status says so: ``completed``, ``interrupted`` (a stop
signal: a resumable checkpoint was saved, exit 0) or ``failed``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from typing import Any

from trainer.changes import Change, resume_changes
from trainer.config import TrainConfig
from trainer.config_files import build_config, diff_keys
from trainer.errors import Interrupted, SaveFailed, UserError
from trainer.kinds import RunKind
from trainer.request import RunRequest, attempt_record, cli_overrides
from trainer.runs.layout import RunLayout, kind_root
from trainer.runs.lock import RunLock
from trainer.runs.metadata import RunHandle, new_metadata
from trainer.runs.store import RunError, create_run, run_numbers


def train(args: argparse.Namespace, kind: RunKind) -> int:
    request = RunRequest.from_args(args)
    overrides, set_keys = cli_overrides(args)
    flags_config = None
    if request.mode != "resume":  # a bad config is refused before torch is even imported
        flags_config = build_config(args.config or kind.default_config, overrides, TrainConfig)

    from launch import build_accelerator, decide_on_rank0, topology
    from trainer.checkpoint.io.staging import retain_freed_heap

    retain_freed_heap()  # process-wide, before training's allocations: its steps page-fault nothing back in
    timeout = timedelta(minutes=_timeout_minutes(flags_config, args, kind, request, overrides))
    accelerator = build_accelerator(timeout)
    topo = topology(accelerator, timeout)
    locks: list[RunLock] = []  # rank 0's, once it holds the run
    try:
        claim = decide_on_rank0(topo.comm, topo.is_main, lambda: _claim(args, kind, request, locks),
                                errors=(UserError,), what="finding the run to train")  # fmt: skip
        for note in claim.notes:
            _print_main(topo, f"warning: {note}")
        if claim.done:
            _print_main(topo, claim.done)
            return 0
        layout, config, store, stored = _configure(args, kind, claim, flags_config, overrides)
        splits = _validate(config, kind, topo)
        if kind.note:
            _print_main(topo, kind.note)
        changes = []
        if layout is not None:
            _refuse_model_change(stored["model"], config, set_keys, layout.number)
            changes = resume_changes(stored, config.to_dict(), set_keys)
        else:
            layout = decide_on_rank0(topo.comm, topo.is_main, lambda: _create(args, kind, request, config, splits,
                                     topo, store, locks), errors=(UserError,), what="creating the run")  # fmt: skip
        for lock in locks:
            lock.start_heartbeat()
        run = RunHandle(layout, is_main=topo.is_main)
        if request.key is not None:
            run.record_attempt(request.key, attempt_record())
        return _run(config, accelerator, topo, run, splits, kind, changes if claim.resuming else None)
    finally:
        for lock in locks:
            lock.release()


def _claim(args: argparse.Namespace, kind: RunKind, request: RunRequest, locks: list[RunLock]) -> Any:
    from trainer.runs.claim import claim_run

    claim, lock = claim_run(args.checkpoint_root, kind.name, request)
    locks += [lock] if lock is not None else []
    return claim


def _configure(
    args: argparse.Namespace, kind: RunKind, claim: Any, flags_config: TrainConfig | None,
    overrides: list[tuple[str, Any]],
) -> tuple[Any, TrainConfig, Any, dict[str, Any]]:  # fmt: skip
    """(the run to resume or None, the config, the file a new run stores, the run's stored config): a resumed
    run's own config with this launch's overrides; a new run's from the flags."""
    if not claim.resuming:
        assert flags_config is not None
        return None, flags_config, kind.prepare(flags_config, args, None), {}
    layout = claim.layout
    stored = read_config(layout)
    config = build_config(stored, overrides, TrainConfig)
    kind.prepare(config, args, layout)
    return layout, config, None, stored


def _validate(config: TrainConfig, kind: RunKind, topo: Any) -> Any:
    """Load the data and build the model once, so that any error surfaces before a run is created."""
    from trainer.factory import load_data, resolve_model_against_data
    from trainer.plan import plan_steps

    splits = load_data(config)
    resolve_model_against_data(config, splits)
    kind.complete(config, splits.num_classes)
    plan_steps(config, len(splits.train), topo.world_size)
    return splits


def _create(args: argparse.Namespace, kind: RunKind, request: RunRequest, config: TrainConfig, splits: Any,
            topo: Any, store: Any, locks: list[RunLock]) -> RunLayout:  # fmt: skip
    """Rank 0: a new run of ``config``, its lock held."""
    metadata = new_metadata(kind=kind.name, experiment=config.experiment, dataset=splits.name,
                            num_classes=splits.num_classes, world_size=topo.world_size,
                            distributed=topo.distributed)  # fmt: skip
    metadata["config_summary"] = {"learning_rate": config.learning_rate, "batch_size": config.batch_size,
                                  "model": config.model.name, "seed": config.seed}  # fmt: skip
    layout, lock = create_run(kind_root(args.checkpoint_root, kind.name), kind.name, request.number,
                              config=config.to_dict(), metadata=metadata, base=store, key=request.key)  # fmt: skip
    locks.append(lock)
    return layout


def _run(config: TrainConfig, accelerator: Any, topo: Any, run: RunHandle, splits: Any, kind: RunKind,
         changes: list[Change] | None) -> int:  # fmt: skip
    """Train the run (resumed, with ``changes`` to its config, unless None); whatever happens, its status
    says how it ended."""
    from launch import PeerLost, release_shm_segment
    from trainer.faults import Faults
    from trainer.loop import Trainer

    number = run.number
    try:
        trainer = Trainer(config, accelerator, topo, run, splits, kind, Faults.from_environment(topo.rank))
        if changes is not None:
            trainer.resume(changes)
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


def _timeout_minutes(config: TrainConfig | None, args: argparse.Namespace, kind: RunKind, request: RunRequest,
                     overrides: list[tuple[str, Any]]) -> float:  # fmt: skip
    """``distributed.timeout_minutes`` before any process group exists: a new run's config, or (best effort,
    read by every process) the stored config of the run to resume with this launch's overrides."""
    if config is not None:
        return config.distributed.timeout_minutes
    root = kind_root(args.checkpoint_root, kind.name)
    numbers = run_numbers(root)
    number = request.number if request.number is not None else (numbers[-1] if numbers else None)
    try:
        if number is None:
            raise RunError("no run")
        return build_config(read_config(RunLayout.of(args.checkpoint_root, kind.name, number)), overrides,
                            TrainConfig).distributed.timeout_minutes  # fmt: skip
    except UserError:
        return TrainConfig().distributed.timeout_minutes


def _print_main(topo: Any, message: str) -> None:
    if topo.is_main:
        print(message, file=sys.stderr if message.startswith("warning") else sys.stdout, flush=True)


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
