"""One launch of a training script, on every process: find the run, build, train, and end it cleanly.

The config, the data and the model are validated before anything is created on disk; global rank 0 decides
which run (new, resumed, gone back in, forked, or the job's own with ``--auto-resume``), holds its lock, and
every process learns the decision. However training ends, the run's status says so: ``completed``,
``interrupted`` (a stop signal: a resumable checkpoint was saved, exit 0) or ``failed``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from trainer.config.changes import Change, config_changes, resume_changes, with_added_keys
from trainer.config.files import build_config, diff_keys
from trainer.config.request import RunRequest, attempt_record, cli_overrides
from trainer.config.schema import ConfigError, TrainConfig
from trainer.errors import INTERRUPTED, Interrupted, SaveFailed, UserError, interrupts_held
from trainer.runs.layout import RunLayout, kind_root, run_dir
from trainer.runs.lock import JobLock, RunLock
from trainer.runs.metadata import RunHandle, new_metadata
from trainer.runs.store import create_run, read_config, run_numbers, write_config
from trainer.training.kinds import RunKind


@dataclass
class Plan:
    """What this launch trains, as every process knows it once rank 0 has decided."""

    config: TrainConfig
    layout: RunLayout | None = None
    """The run; None until a new one is created."""
    stored: dict[str, Any] = field(default_factory=dict)
    """The config the run (or the run it forks) was trained with."""
    store: Path | None = None
    """A file a new run stores (a LoRA run's base)."""
    claim: Any = None
    changes: list[Change] = field(default_factory=list)

    @property
    def continues(self) -> bool:
        """Whether training continues from a checkpoint (a resume or a fork), rather than starting."""
        return self.claim.resuming or self.claim.fork is not None


@dataclass(frozen=True)
class Continued:
    """The config of the run a launch continues, read by every process before any process group exists."""

    path: Path
    stored: dict[str, Any]
    config: TrainConfig
    """``stored`` with this launch's overrides."""


def train(args: argparse.Namespace, kind: RunKind) -> int:
    request = RunRequest.from_args(args)
    overrides, set_keys = cli_overrides(args)
    ahead = _read_ahead(args, kind, request, overrides)
    flags_config = None
    if ahead is None and request.mode in ("new", "auto"):  # a bad config is refused before torch is imported
        flags_config = build_config(args.config or kind.default_config, overrides, TrainConfig)

    known = flags_config or (ahead.config if ahead is not None else TrainConfig())
    timeout = timedelta(minutes=known.distributed.timeout_minutes)
    with interrupts_held():  # torch's, Accelerate's and DeepSpeed's imports: a Ctrl-C waits for their end
        from launch import PeerLost, build_accelerator, decide_on_rank0, release_shm_segment, topology
        from trainer.storage.staging import retain_freed_heap

        retain_freed_heap()  # process-wide, before training's allocations: its steps page-fault nothing back in
        accelerator = build_accelerator(timeout, accept_shape=args.accept_launch)
    locks: list[RunLock] = []  # rank 0's, once it holds the run
    try:
        topo = topology(accelerator, timeout)
        claim = decide_on_rank0(topo.comm, topo.is_main, lambda: _claim(args, kind, request, locks),
                                errors=(UserError,), what="finding the run to train")  # fmt: skip
        for note in claim.notes:
            _print_main(topo, f"warning: {note}")
        if claim.done:
            _print_main(topo, claim.done)
            return 0
        plan = _configure(args, kind, claim, flags_config or ahead, overrides)
        splits = _validate(plan.config, kind, topo)
        _check_changes(plan, set_keys)
        if request.init_from is not None:  # another architecture is refused before a run is created
            from trainer.runs.claim import init_checkpoint
            from trainer.training.base_model import load_init_weights

            load_init_weights(init_checkpoint(request.init_from), plan.config)
        if kind.note:
            _print_main(topo, kind.note)
        if plan.layout is None:
            plan.layout = decide_on_rank0(topo.comm, topo.is_main, lambda: _create(args, kind, request, plan,
                                          splits, topo, locks), errors=(UserError,), what="creating the run")  # fmt: skip
        for lock in locks:
            lock.start_heartbeat()
        run = RunHandle(plan.layout, is_main=topo.is_main)
        if request.key is not None:
            run.record_attempt(request.key, attempt_record())
        return _run(
            plan, accelerator, topo, run, splits, kind, request.init_from, auto=request.key is not None
        )
    except PeerLost as e:  # before training began: no run of this launch to mark
        print(f"error: rank {accelerator.process_index}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        for lock in locks:
            lock.release()
        # On every way out, refusals included: a process group left to the interpreter's exit can abort the
        # process (a joinable thread destroyed: "terminate called without an active exception").
        accelerator.end_training()
        release_shm_segment()


def _claim(args: argparse.Namespace, kind: RunKind, request: RunRequest, locks: list[RunLock]) -> Any:
    from trainer.runs.claim import claim_run

    claim, lock = claim_run(args.checkpoint_root, kind.name, request)
    locks += [lock] if lock is not None else []
    return claim


def _read_ahead(args: argparse.Namespace, kind: RunKind, request: RunRequest,
                overrides: list[tuple[str, Any]]) -> Continued | None:  # fmt: skip
    """Every process, before any process group exists (its timeout is the config's): the config of the run a
    resume or fork names (a bare ``--resume``: the newest run), or the job's own run with ``--auto-resume``,
    with this launch's overrides. None when there is none or it cannot be read: rank 0's claim then finds the
    run (and repairs or refuses it), and the config is built from what it found."""
    from trainer.runs.claim import run_with_key

    root = kind_root(args.checkpoint_root, kind.name)
    try:
        if request.mode == "auto":
            assert request.key is not None
            layout = run_with_key(args.checkpoint_root, kind.name, request.key)
        elif request.mode in ("resume", "fork"):
            numbers = run_numbers(root)
            wanted = request.source if request.mode == "fork" else request.number
            number = wanted if wanted is not None else (numbers[-1] if numbers else None)
            layout = RunLayout(run_dir(root, number), kind.name) if number in numbers else None
        else:
            layout = None
        if layout is None:
            return None
        stored = read_config(layout.config)
        return Continued(layout.path, stored, build_config(stored, overrides, TrainConfig))
    except UserError:
        return None


def _configure(args: argparse.Namespace, kind: RunKind, claim: Any, known: TrainConfig | Continued | None,
               overrides: list[tuple[str, Any]]) -> Plan:  # fmt: skip
    """A resumed run's own config with this launch's overrides; a fork's, its source's with them; a new
    run's from the flags. ``known``: the config read before the claim, used when it is of the run claimed."""
    source = claim.layout if claim.resuming else (claim.fork.layout if claim.fork is not None else None)
    if source is None:
        config = known if isinstance(known, TrainConfig) else build_config(args.config or kind.default_config,
                                                                             overrides, TrainConfig)  # fmt: skip
        return Plan(config, store=kind.prepare(config, args, None), claim=claim)
    if isinstance(known, Continued) and known.path == source.path:
        stored, config = known.stored, known.config
    else:  # read before the claim from another run (a new one raced a bare --resume), or not at all
        stored = read_config(source.config)
        config = build_config(stored, overrides, TrainConfig)
    store = kind.prepare(config, args, source)
    return Plan(
        config, layout=claim.layout if claim.resuming else None, stored=stored, store=store, claim=claim
    )


def _validate(config: TrainConfig, kind: RunKind, topo: Any) -> Any:
    """Load the data and build the model once, so that any error surfaces before a run is created."""
    from trainer.config.plan import plan_steps
    from trainer.training.factory import load_data, resolve_model_against_data

    splits = load_data(config)
    resolve_model_against_data(config, splits)
    kind.complete(config, splits.num_classes)
    plan_steps(config, len(splits.train), topo.world_size, topo.asks)
    return splits


def _check_changes(plan: Plan, set_keys: set[str]) -> None:
    """What a resume or a fork changes of the config it continues: never the architecture (its checkpoint
    would not load); for a resume, only how training goes on (``changes.py``); for a fork, anything else."""
    if not plan.continues:
        return
    claim = plan.claim
    what = (
        f"resuming run {claim.layout.number:03d}"
        if claim.resuming
        else f"forking run {claim.fork.layout.number:03d}"
    )
    _refuse_model_change(with_added_keys(plan.stored)["model"], plan.config, set_keys, what)
    new = plan.config.to_dict()
    plan.changes = (
        resume_changes(plan.stored, new, set_keys)
        if plan.claim.resuming
        else config_changes(plan.stored, new)
    )


def _create(args: argparse.Namespace, kind: RunKind, request: RunRequest, plan: Plan, splits: Any, topo: Any,
            locks: list[RunLock]) -> RunLayout:  # fmt: skip
    """Rank 0: a new run of the plan's config, its lock held; a fork's checkpoint linked into it."""
    from trainer.runs.claim import start_fork, start_from_weights

    config = plan.config
    metadata = new_metadata(kind=kind.name, experiment=config.experiment, dataset=splits.name,
                            num_classes=splits.num_classes, world_size=topo.world_size,
                            distributed=topo.distributed, precision=topo.precision)  # fmt: skip
    metadata["config_summary"] = {"learning_rate": config.learning_rate, "batch_size": config.batch_size,
                                  "model": config.model.name, "seed": config.seed}  # fmt: skip
    if plan.claim.fork is not None:
        metadata.update(start_fork(plan.claim.fork, plan.changes))
    if request.init_from is not None:
        metadata["init_from"] = start_from_weights(Path(request.init_from))
    layout, lock = create_run(kind_root(args.checkpoint_root, kind.name), kind.name, request.number,
                              config=config.to_dict(), metadata=metadata, base=plan.store, key=request.key)  # fmt: skip
    for job in [held for held in locks if isinstance(held, JobLock)]:  # the job's run exists: its lock holds
        job.release()
        locks.remove(job)
    locks.append(lock)
    if plan.claim.fork is not None:
        from trainer.checkpoint.protocol import CommitProtocol

        CommitProtocol(plan.claim.fork.layout.checkpoint_folder).link_into(
            plan.claim.fork.manifest, layout.checkpoint_folder
        )
    return layout


def _run(plan: Plan, accelerator: Any, topo: Any, run: RunHandle, splits: Any, kind: RunKind,
         init_from: str | None, *, auto: bool) -> int:  # fmt: skip
    """Train the run (continuing from its checkpoint, or from the start); whatever happens, its status says
    how it ended (and how to continue it: ``auto``, a job's command line continues it as it is)."""
    from launch import PeerLost
    from trainer.faults import Faults
    from trainer.training.loop import Trainer

    number, config = run.number, plan.config
    again = "the same command (--auto-resume)" if auto else f"--resume {number}"
    try:
        start = None
        if init_from is not None:
            from trainer.runs.claim import init_checkpoint

            start = init_checkpoint(init_from)
        trainer = Trainer(config, accelerator, topo, run, splits, kind, Faults.from_environment(topo.rank),
                          init_from=start)  # fmt: skip
        fork = plan.claim.fork
        if fork is not None:
            run.print(f"{kind.headline} - run {number:03d} ({run.path}), forked from run "
                      f"{fork.layout.number:03d} at checkpoint {fork.manifest.tag} ({fork.layout.path})")  # fmt: skip
        if plan.continues:
            trainer.resume(plan.changes, forked=fork is not None)
            if topo.is_main:  # only now: a refused resume leaves the run exactly as it was
                write_config(run.layout.config, config.to_dict())
        else:
            run.print(f"{kind.headline} - run {number:03d} ({run.path})")
        if start is not None:
            run.print(
                f"Starting from the weights and EMA of {start} (a fresh optimizer, counters and schedule)"
            )
        run.print(topo.describe(trainer.steps.micro_batch, trainer.steps.accumulation))
        run.update(launch=topo.record(trainer.steps.micro_batch, trainer.steps.accumulation))
        trainer.fit()
    except UserError:
        raise
    except Interrupted as e:
        run.finish("interrupted")
        run.print(f"Interrupted ({e}): run {number:03d} saved a resumable checkpoint and is marked "
                  f"interrupted; continue it with {again}")  # fmt: skip
        return 0
    except (SaveFailed, PeerLost) as e:
        run.finish("failed")
        if topo.is_main or isinstance(e, PeerLost):  # a lost peer: every survivor says what it waited for
            where = f"rank {topo.rank}: " if isinstance(e, PeerLost) else ""
            hint = f"; committed checkpoints are intact: continue with {again}"
            print(f"error: {where}{e}{hint}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        run.finish("interrupted")
        run.print(f"Interrupted: run {number:03d} is marked interrupted; continue it from its last checkpoint "
                  f"with {again}")  # fmt: skip
        return INTERRUPTED
    except BaseException:
        run.finish("failed")
        raise
    return 0


def _print_main(topo: Any, message: str) -> None:
    if topo.is_main:
        print(message, file=sys.stderr if message.startswith("warning") else sys.stdout, flush=True)


def _refuse_model_change(stored: dict[str, Any], config: TrainConfig, set_keys: set[str], what: str) -> None:
    """A run continues with its architecture unless the user overrides a key on purpose with --set (its
    checkpoint must still fit: that is checked when it loads)."""
    changed = [k for k in diff_keys(stored, config.to_dict()["model"]) if f"model.{k}" not in set_keys]
    if not changed:
        return
    shapes = [k for k in changed if k in config.model.architecture()]
    if shapes:
        raise ConfigError(
            f"{what} would change model keys {', '.join(changed)}; {', '.join(shapes)} decide the shapes of its "
            "checkpoints' weights, which would not load. Drop the flag that changes them; another architecture "
            "is a new run (--init-from starts one from weights that fit)"
        )
    raise ConfigError(
        f"{what} would change model keys {', '.join(changed)}, which its checkpoints were trained with; drop the "
        "flag that changes them, or change them on purpose with --set model.KEY=VALUE"
    )
