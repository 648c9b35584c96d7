"""What a launch asks for, from its flags alone (no torch, no files): a new run, the resume of a run, or
``--auto-resume`` (the job's own run, whichever attempt this is), and the config overrides it passes."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trainer.config.files import parse_override
from trainer.errors import UserError


@dataclass(frozen=True)
class RunRequest:
    mode: Literal["new", "resume", "auto", "fork"]
    number: int | None
    """``--run-number`` (or ``--resume N``): the run's number; None for a new number, or the newest run."""
    key: str | None = None
    """With ``--auto-resume``: what identifies the job, the same for every attempt of it."""
    from_tag: str | None = None
    """``--from TAG``: the checkpoint to go back to (a resume) or to start from (a fork)."""
    source: int | None = None
    """``--fork N``: the run a new run starts from."""
    init_from: str | None = None
    """``--init-from RUN_OR_CKPT``: a new run's initial weights (and EMA)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunRequest:
        _refuse_contradictions(args)
        for flag, value in (("--run-number", args.run_number), ("--fork", args.fork)):
            if value is not None and value < 1:
                raise UserError(f"{flag} takes a run number (1 or more), got {value}")
        extra = {"from_tag": args.from_tag, "init_from": getattr(args, "init_from", None)}
        if args.auto_resume:
            return cls("auto", args.run_number, job_key(args.run_key), **extra)
        if args.fork is not None:
            return cls("fork", args.run_number, source=args.fork, **extra)
        if args.resume is None:
            return cls("new", args.run_number, **extra)
        if args.resume == "latest":
            return cls("resume", args.run_number, **extra)
        try:
            number = int(args.resume)
        except ValueError:
            raise UserError(f"--resume takes a run number, got {args.resume!r}") from None
        if number < 1:
            raise UserError(f"--resume takes a run number (1 or more), got {number}")
        if args.run_number is not None and args.run_number != number:
            raise UserError(f"--resume {number} and --run-number {args.run_number} name different runs")
        return cls("resume", number, **extra)


def _refuse_contradictions(args: argparse.Namespace) -> None:
    """Flags that cannot go together, each refused with what to do instead."""
    init_from = getattr(args, "init_from", None)
    if args.auto_resume and (args.resume is not None or args.fork is not None):
        raise UserError(
            "--auto-resume decides by itself whether to resume (the job's run if it has one, else a new run): "
            "drop --resume/--fork"
        )
    if args.run_key is not None and not args.auto_resume:
        raise UserError("--run-key only applies with --auto-resume")
    if args.fork is not None and args.resume is not None:
        raise UserError("--fork starts a new run from another; --resume continues one: use one of them")
    if args.from_tag is not None and args.resume is None and args.fork is None:
        raise UserError(
            "--from TAG goes with --resume N (go back in run N) or --fork N (start a new run there)"
        )
    if init_from is not None and (args.resume is not None or args.fork is not None):
        raise UserError(
            "--init-from starts a new run from other weights; it does not go with --resume or --fork"
        )


def job_key(given: str | None) -> str:
    """The key of this job, the same across its attempts: ``--run-key``, else SLURM's job id (with the array
    index), else the torch elastic launch (its run id, or its agent process: the same across restarts)."""
    if given is not None:
        if not given.strip():
            raise UserError("--run-key must not be empty")
        return given.strip()
    slurm = os.environ.get("SLURM_JOB_ID")
    if slurm:
        array = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{os.environ.get('SLURM_ARRAY_JOB_ID', slurm)}_{array}" if array else f"slurm-{slurm}"
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id != "none":
            return f"elastic-{run_id}"
        agent = os.getppid()  # accelerate's static rendezvous: run id "none"; the agent outlives restarts
        return f"elastic-{socket.gethostname()}-{agent}-{_started(agent)}"
    raise UserError(
        "--auto-resume cannot tell which job this is: pass --run-key KEY (the same for every attempt), or run "
        "under SLURM or accelerate launch --max_restarts"
    )


def _started(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def attempt_record() -> dict[str, Any]:
    """What this launch knows of the job it belongs to (recorded with each ``--auto-resume`` attempt)."""
    env = os.environ
    restarts = env.get("SLURM_RESTART_COUNT") or env.get("TORCHELASTIC_RESTART_COUNT") or "0"
    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "restart_count": int(restarts) if restarts.isdigit() else restarts,
        "host": socket.gethostname(),
    }


def cli_overrides(args: argparse.Namespace) -> tuple[list[tuple[str, Any]], set[str]]:
    """(overrides in order, keys given through --set) from the flags the user actually passed."""
    flags = {
        "data": args.data,
        "model": args.model,
        "experiment": args.experiment,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "distributed.gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "lora": getattr(args, "lora_config", None),
    }
    overrides = [(k, v) for k, v in flags.items() if v is not None]
    explicit = [parse_override(text) for text in args.overrides]
    return overrides + explicit, {k for k, _ in explicit}
