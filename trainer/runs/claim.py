"""Global rank 0's first step on the run a launch asks for: find it, take its lock, clear a crash's leftovers.

Nothing of an existing run is touched before its lock is held. With ``--auto-resume`` the run is the one
whose ``run_key`` is this job's key: resumed, or left alone when it has completed; with none, a new run.
``--resume N --from TAG`` goes back in run N: the checkpoints newer than TAG move to ``superseded/``.
``--fork N [--from TAG]`` reads run N's committed checkpoint and touches nothing of run N (no lock either:
a run being trained can be forked).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.checkpoint.folder import MANIFESTS
from trainer.checkpoint.manifest import Manifest
from trainer.checkpoint.protocol import CommitProtocol
from trainer.config.request import RunRequest
from trainer.errors import UserError
from trainer.runs.layout import KIND_FOLDERS, RunLayout, kind_root, run_dir
from trainer.runs.lock import JobLock, RunLock
from trainer.runs.metadata import new_branch, now, read_metadata, write_metadata
from trainer.runs.repair import repair_run
from trainer.runs.store import RunError, clear_leftovers, resolve_run, run_numbers
from trainer.storage.checksums import sha256_file


@dataclass(frozen=True)
class ForkSource:
    """The run and checkpoint a new run starts from (``--fork``)."""

    layout: RunLayout
    manifest: Manifest
    sha256: str
    """Of the checkpoint's manifest: which state the fork started from, exactly."""

    def record(self) -> dict[str, Any]:
        return {"kind": self.layout.kind, "run": self.layout.number, "tag": self.manifest.tag,
                "manifest_sha256": self.sha256}  # fmt: skip


@dataclass
class Claim:
    """What rank 0 found for the launch (broadcast to every rank)."""

    layout: RunLayout | None
    """The run to resume, or None: a new run is created once the config is validated."""
    done: str | None = None
    """The job's run has completed: this message, and nothing to train."""
    notes: list[str] = field(default_factory=list)
    """Warnings to print (a dead launch's lock taken over, a damaged metadata.json rebuilt)."""
    fork: ForkSource | None = None
    """A new run starting from another run's checkpoint."""

    @property
    def resuming(self) -> bool:
        return self.layout is not None and self.done is None


def claim_run(checkpoint_root: Path, kind: str, request: RunRequest) -> tuple[Claim, RunLock | None]:
    """Rank 0: the run ``request`` names and, when it exists and is to be trained, its lock (held)."""
    root = kind_root(checkpoint_root, kind)
    if request.mode == "new":
        return Claim(None), None
    if request.mode == "fork":
        assert request.source is not None
        source = RunLayout(run_dir(root, resolve_run(root, request.source)), kind)
        manifest = CommitProtocol(source.checkpoint_folder).resolve(request.from_tag or "newest")
        sha = sha256_file(source.checkpoints / MANIFESTS / f"{manifest.tag}.json")
        return Claim(None, fork=ForkSource(source, manifest, sha)), None
    if request.mode == "resume":
        layout = RunLayout(run_dir(root, resolve_run(root, request.number)), kind)
    else:
        assert request.key is not None
        found = run_with_key(checkpoint_root, kind, request.key)
        if found is None:
            if request.number is not None and request.number in run_numbers(root):
                raise RunError(
                    f"--run-number {request.number} names run {request.number:03d}, which belongs to no job with "
                    f"key {request.key!r}; drop --run-number, or resume that run with --resume {request.number}"
                )
            root.mkdir(parents=True, exist_ok=True)
            job = JobLock(root, request.key)  # held until the run exists: one run per job
            taken = job.acquire("start the job's run")
            found = run_with_key(checkpoint_root, kind, request.key)  # made by a launch that held it before
            if found is None:
                return Claim(None, notes=[taken] if taken else []), job
            job.release()
        layout = found
        if request.number is not None and request.number != layout.number:
            raise RunError(
                f"--run-number {request.number} and --auto-resume disagree: the job's key {request.key!r} "
                f"belongs to run {layout.number:03d}"
            )
        status = _status(layout)
        if status == "completed":
            return Claim(layout, done=f"Run {layout.number:03d} of job {request.key!r} has completed: nothing to "
                                      f"train ({layout.path})"), None  # fmt: skip
    lock = RunLock(layout)
    taken_over = lock.acquire("go back in it" if request.from_tag else "resume it")
    try:
        clear_leftovers(layout)
        notes = repair_run(layout) if request.mode == "resume" else []
        if request.from_tag is not None:
            notes.append(go_back(layout, request.from_tag))
    except BaseException:
        lock.release()
        raise
    return Claim(layout, notes=[*([taken_over] if taken_over else []), *notes]), lock


def go_back(layout: RunLayout, spec: str) -> str:
    """Rewind the run to checkpoint ``spec``: newer checkpoints move to ``superseded/``, the trackers start a
    branch of their own, and the run records it; the resume then continues from ``spec``."""
    protocol = CommitProtocol(layout.checkpoint_folder)
    manifest = protocol.resolve(spec)
    moved = protocol.supersede_after(manifest)
    meta = read_metadata(layout.path)
    meta["trackers"] = new_branch(meta.get("trackers"))
    event = {"at": now(), "kind": "rewound", "to": manifest.tag, "superseded": moved}
    meta["events"] = [*meta.get("events", []), event]
    write_metadata(layout.path, meta)
    return (f"going back to checkpoint {manifest.tag} of run {layout.number:03d}: "
            f"{len(moved)} newer checkpoint(s) moved to {layout.checkpoint_folder.superseded.name}/")  # fmt: skip


def run_with_key(checkpoint_root: Path, kind: str, key: str) -> RunLayout | None:
    """The run of ``kind`` whose ``run_key`` is ``key``; a run of the other kind with it is refused."""
    for other in KIND_FOLDERS:
        root = kind_root(checkpoint_root, other)
        for number in reversed(run_numbers(root)):
            layout = RunLayout(run_dir(root, number), other)
            try:
                if layout.run_key.read_text().strip() != key:
                    continue
            except OSError:
                continue
            if other != kind:
                raise RunError(
                    f"the job key {key!r} belongs to {other} run {number:03d} ({layout.path}), and this launch "
                    f"trains a {kind} run; give this job another --run-key"
                )
            return layout
    return None


def _status(layout: RunLayout) -> str:
    try:
        return str(read_metadata(layout.path).get("status"))
    except (OSError, ValueError, AttributeError) as e:
        raise RunError(
            f"run {layout.number:03d} of this job has an unreadable {layout.metadata} ({type(e).__name__}); "
            f"nothing was changed. Continue it with --resume {layout.number} (which rebuilds the file from "
            "its checkpoints) or move the file aside"
        ) from None


def start_fork(fork: ForkSource, changes: list[Any]) -> dict[str, Any]:
    """The metadata of a run forked from ``fork`` (its lineage, what it changes, its trackers' origin)."""
    source = read_metadata(fork.layout.path)
    record = {**fork.record(), "changes": [{"key": c.key, "old": c.old, "new": c.new} for c in changes]}
    wandb = (source.get("trackers") or {}).get("wandb_id")
    return {"forked_from": record, **({"trackers": {"branched_from": wandb}} if wandb else {})}


def init_checkpoint(given: str) -> Path:
    """``--init-from``: a base ``.ckpt``, or a base run folder (its best checkpoint)."""
    path = Path(given)
    if path.is_dir():
        path = RunLayout(path, "base").ckpt("best")
    if not path.is_file():
        raise UserError(f"--init-from: no checkpoint at {path}; give a base run folder or a base .ckpt file")
    return path


def start_from_weights(given: Path) -> dict[str, Any]:
    """The metadata record of a run started from another checkpoint's weights (``--init-from``)."""
    path = init_checkpoint(str(given)).resolve()
    record: dict[str, Any] = {"source": str(path), "sha256": sha256_file(path)}
    run = RunLayout.detect(path.parent.parent)
    if run is not None and path.parent == run.checkpoints:  # a run's checkpoint: name it
        with contextlib.suppress(ValueError):
            record.update(run=run.number, tag=path.stem)
    return record
