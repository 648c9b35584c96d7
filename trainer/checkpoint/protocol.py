"""The commit protocol every kind of checkpoint shares: atomic commit with a manifest, background saves,
validated resume with fallback, retention. ``checkpoint.py`` (base runs) and ``adapter_checkpoint.py`` (LoRA
runs) subclass ``Checkpoints`` and only say which files a checkpoint has and how they are written and read.

A checkpoint is named by a tag: ``epoch_NNN`` after an epoch, ``step_NNNNNNN`` inside one (``checkpoint.
save_every_n_steps`` or a preemption). It is committed by ``manifests/<tag>.json``: the size and sha256 of
every file of the checkpoint, written last.

Rank rule, kept inside this module: ``save``/``load`` are called on every rank. The collective parts
(DeepSpeed's save and load, gathers) run everywhere; file work that must happen once (merge, manifest,
links, retention, moving damaged files aside) runs on global rank 0 only, and every rank learns the outcome.

Commit order, so that a crash or a full disk at any point leaves every committed checkpoint whole: files are
written under ``.tmp-`` names and renamed when complete; the manifest is written last; ``last``/``best`` are
relinked after it; retention runs last and removes a checkpoint's manifest before its files. What has no
manifest was never committed: a restart removes it, a resume never reads it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from launch import Topology, barrier, broadcast_object, decide_on_rank0
from trainer import faults
from trainer.checkpoint.io.atomic import (
    TMP_PREFIX,
    Flusher,
    fsync_dir,
    link_or_copy,
    remove_tmp_leftovers,
    write_file,
)
from trainer.checkpoint.io.staging import HostStaging
from trainer.checkpoint.manifest import (
    Manifest,
    epoch_tag,
    is_tag,
    manifest_path,
    read_manifests,
    step_tag,
    unreadable_manifests,
    verify,
    write_manifest,
)
from trainer.ema import EMA

DAMAGED_DIR = "damaged"


@dataclass
class TrainingState:
    """The trainer's own counters, saved with every checkpoint (torchtitan's "Stateful" trainer state)."""

    epoch: int = 0
    """Epochs fully completed."""
    global_step: int = 0
    history: list[dict[str, Any]] | None = None
    best: dict[str, Any] | None = None
    step_in_epoch: int = 0
    """Steps of epoch ``epoch + 1`` already trained (a checkpoint taken inside an epoch)."""
    epoch_loss_sum: float = 0.0
    """Sum over all ranks of the training losses of those steps, so the epoch's mean survives a resume."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history or [],
            "best": self.best,
            "step_in_epoch": self.step_in_epoch,
            "epoch_loss_sum": self.epoch_loss_sum,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingState:
        return cls(
            epoch=data["epoch"],
            global_step=data["global_step"],
            history=data.get("history") or [],
            best=data.get("best"),
            step_in_epoch=data.get("step_in_epoch", 0),
            epoch_loss_sum=data.get("epoch_loss_sum", 0.0),
        )


@dataclass
class ResumePoint:
    """What a resume found: the newest intact checkpoint (None if there is none) and what was damaged."""

    manifest: Manifest | None
    damaged: list[dict[str, str]] = field(default_factory=list)
    """One entry per damaged checkpoint: ``tag``, ``reason``, ``moved_to``."""


class Checkpoints:
    """The checkpoints of one run: commit protocol, retention, resume selection. Subclasses write the files.

    ``roots`` lists where a tag's files live as (folder, suffix): a tag ``T`` owns ``folder/T+suffix``.
    """

    payload_key = "state_dict"
    """The entry every checkpoint file of this kind holds."""

    def __init__(
        self,
        run_dir: Path,
        folder: Path,
        topo: Topology,
        *,
        keep_last_n: int,
        config: dict[str, Any],
        kind: str,
        roots: list[tuple[Path, str]],
        async_save: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self.async_save = async_save
        self._job: _Job | None = None
        self._staging = HostStaging()
        """A background save's snapshot buffers, reused by the next save (``trainer/staging.py``)."""
        self._purge: threading.Thread | None = None
        """Deleting the files of checkpoints retention dropped (rank 0; see ``apply_retention``)."""
        self.dir = folder
        self.topo = topo
        self.keep_last_n = keep_last_n
        self.config = config
        self.kind = kind
        self.roots = roots
        if topo.is_main:
            self._clean_start()
        barrier(topo)

    # -- the files of a tag -----------------------------------------------------------------------

    def _tag_paths(self, tag: str) -> list[Path]:
        return [folder / f"{tag}{suffix}" for folder, suffix in self.roots]

    def _existing_tag_paths(self, tag: str) -> list[Path]:
        """The files and folders of ``tag`` that are there (a link counts, even a dangling one)."""
        return [path for path in self._tag_paths(tag) if path.exists() or path.is_symlink()]

    def _tag_files(self, tag: str) -> list[Path]:
        files = []
        for path in self._tag_paths(tag):
            if path.is_dir():
                files += [Path(d) / name for d, _, names in os.walk(path) for name in names]
            elif path.is_file():
                files.append(path)
        return files

    def _tags_on_disk(self) -> set[str]:
        tags = set()
        for folder, suffix in self.roots:
            if folder.is_dir():
                for entry in folder.iterdir():
                    name = entry.name.removesuffix(suffix) if suffix else entry.name
                    if (not suffix or entry.name.endswith(suffix)) and is_tag(name):
                        tags.add(name)
        return tags

    def committed(self) -> list[Manifest]:
        """Committed checkpoints, oldest first."""
        return read_manifests(self.dir)

    def epochs_on_disk(self) -> list[int]:
        return sorted(m.epoch for m in self.committed() if m.is_epoch)

    # -- start of a run: leftovers of a crash ------------------------------------------------------

    def _leftover_folders(self) -> list[Path]:
        return sorted({folder for folder, _ in self.roots} | {self.dir})

    def _clean_start(self) -> None:
        """Rank 0, at every start: remove what a crashed writer left (never a committed checkpoint)."""
        if not (self.dir / "manifests").is_dir():
            self._adopt_unmanifested()
        for folder in self._leftover_folders():
            for removed in remove_tmp_leftovers(folder):
                print(f"Removed an incomplete checkpoint file left by a crash: {removed}")
        committed = {m.tag for m in self.committed()} | {p.stem for p in unreadable_manifests(self.dir)}
        for tag in sorted(self._tags_on_disk() - committed):
            for path in self._existing_tag_paths(tag):
                self._delete_inside_run(path)
                print(f"Removed an uncommitted checkpoint (no manifest; its save was interrupted): {path}")

    def _adopt_unmanifested(self) -> None:
        """A run written before manifests existed: commit its epoch checkpoints as they are."""
        for tag in sorted(self._tags_on_disk()):
            if tag.startswith("epoch_") and self._is_resumable(tag):
                manifest = self._legacy_manifest(tag)
                write_manifest(self.dir, manifest, self._tag_files(tag))

    def _is_resumable(self, tag: str) -> bool:
        return True

    def _legacy_manifest(self, tag: str) -> Manifest:
        epoch = int(tag.removeprefix("epoch_"))
        return Manifest(tag, epoch, 0, epoch, self.topo.world_size, self.topo.distributed)

    # -- saving ---------------------------------------------------------------------------------------

    def save(
        self,
        *,
        model: Any,
        optimizer: Any,
        ema: EMA,
        noise_generator: torch.Generator,
        state: TrainingState,
        metrics: dict[str, float],
        is_best: bool,
    ) -> dict[str, Any]:
        """Start a checkpoint of ``state`` on all ranks: an epoch checkpoint when ``state.step_in_epoch`` is
        0, else a step checkpoint. Call ``wait()`` first: one save is in flight at a time.

        The training loop is blocked only while the state is copied to host memory (the snapshot; a
        collective under DeepSpeed). Writing, merging, hashing, the commit and retention then run in a
        background thread (``async_save``) or right here; ``wait()`` returns the outcome either way.
        Returns {tag, blocked_seconds, snapshot_bytes}.
        """
        assert self._job is None, "wait() for the previous save first"
        start = time.perf_counter()
        state = TrainingState.from_dict(copy.deepcopy(state.to_dict()))  # training goes on changing its own
        tag = epoch_tag(state.epoch) if state.step_in_epoch == 0 else step_tag(state.global_step)
        faults.set_context(tag=tag, step=state.global_step)
        self._staging.begin()
        items, main_payload = self._snapshot(
            tag,
            model=model,
            optimizer=optimizer,
            ema=ema,
            noise_generator=noise_generator,
            state=state,
            metrics=metrics,
        )
        self._staging.end()
        faults.set_context(tag=None, step=None)
        # Host memory held by the snapshot (nothing is copied when the save is written right away).
        snapshot_bytes = _nbytes([[o for _, o, _ in items], main_payload]) if self.async_save else 0
        job = _Job(
            tag=tag,
            outcome={"tag": tag, "global_step": state.global_step, "snapshot_bytes": snapshot_bytes},
            items=items,
            payload=main_payload,
            state=state,
            metrics=dict(metrics),
            is_best=is_best,
            start=start,
        )
        if self.async_save:
            job.thread = threading.Thread(target=self._run_job, args=(job,), name=f"save-{tag}", daemon=True)
            job.thread.start()
        else:
            self._run_job(job)
        job.outcome["blocked_seconds"] = time.perf_counter() - start
        self._job = job
        return dict(job.outcome)

    def wait(self) -> dict[str, Any]:
        """Finish the save in flight (collective: call on every rank). Its outcome on every rank:
        {} when none was in flight; {tag, error} when it failed (nothing of it is left, every earlier
        checkpoint is whole); else {tag, blocked_seconds, snapshot_bytes, file, bytes, seconds}."""
        job, self._job = self._job, None
        if job is not None and job.thread is not None:
            job.thread.join()
        self._join_purge()
        if job is None:
            return {}
        return broadcast_object(job.outcome, self.topo)

    def poll(self) -> dict[str, Any]:
        """``wait()`` if the save in flight has finished, else {} at once (collective: every rank calls it).

        Rank 0 decides: its job ends only after every rank's files are written, so "finished on rank 0"
        means finished everywhere. Lets the loop report a background save soon after it ends."""
        finished = self._job is not None and (self._job.thread is None or not self._job.thread.is_alive())
        if broadcast_object(finished, self.topo):
            return self.wait()
        return {}

    def join(self) -> None:
        """Let the save in flight finish on this rank, without a collective (for error paths)."""
        if self._job is not None and self._job.thread is not None:
            self._job.thread.join()
        self._job = None
        self._join_purge()

    def _run_job(self, job: _Job) -> None:
        """Write this rank's files; rank 0 then waits for every rank's and commits. Never raises."""
        if self.async_save:
            _yield_cpu_to_training()
        faults.set_context(tag=job.tag, step=job.state.global_step)
        try:
            self._write_and_commit(job)
        finally:
            faults.set_context(tag=None, step=None)
            # The job's references go; what is not staging's buffers (kept for the next save) is freed.
            job.items, job.payload = [], None

    def _write_and_commit(self, job: _Job) -> None:
        tag, items, state, metrics = job.tag, job.items, job.state, job.metrics
        errors: list[str] = []
        written: dict[str, tuple[int, str]] = {}  # file name → (bytes, sha256), hashed as it was written
        with Flusher() as flusher:
            try:
                for path, obj, write in items:
                    _guard(errors, written, path, obj, write, flusher, hash_on_thread=not self.async_save)
                flusher.wait()  # every file on disk before the marker says so
            except OSError as e:
                errors.append(_describe(e))
            # A bug, not a full disk: still tell rank 0, so that it does not wait forever.
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        items.clear()  # written: drop the job's references before the commit (staging keeps its buffers)
        if self.per_rank_files:
            _write_marker(self._tmp_dir(tag), self.topo.rank, errors[0] if errors else None, written)
        if not self.topo.is_main:
            return
        error = errors[0] if errors else None
        if error is None and self.per_rank_files:
            error = self._wait_for_ranks(tag, written)
        if error is None:
            try:
                faults.point("save.shards")
                known = self._commit(tag, state=state, metrics=metrics, payload=job.payload, written=written)
                faults.point("save.manifest")
                manifest = Manifest(
                    tag,
                    state.epoch,
                    state.step_in_epoch,
                    state.global_step,
                    self.topo.world_size,
                    self.topo.distributed,
                )
                write_manifest(self.dir, manifest, self._tag_files(tag), known)
            except OSError as e:
                error = _describe(e)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        if error is not None:
            self._discard(tag)
            job.outcome["error"] = error
            return
        ckpt = self.dir / f"{tag}.ckpt"
        try:  # the checkpoint is committed: a failure from here on costs nothing already saved
            if state.step_in_epoch == 0:
                link_or_copy(ckpt, self.dir / "last.ckpt")
                if job.is_best:
                    link_or_copy(ckpt, self.dir / "best.ckpt")
            faults.point("save.retention")
            self.apply_retention(protect=(state.best or {}).get("epoch"), background=True)
        except OSError as e:
            print(f"warning: {tag} is saved, but relinking last/best or retention failed: {_describe(e)}")
        files = self._tag_files(tag)
        job.outcome.update(
            file=str(ckpt if ckpt.is_file() else self._tag_paths(tag)[-1]),
            bytes=sum(f.stat().st_size for f in files),
            seconds=time.perf_counter() - job.start,
        )

    def _wait_for_ranks(
        self, tag: str, written: dict[str, tuple[int, str]], timeout: float = 1800.0
    ) -> str | None:
        """Rank 0: wait until every rank has written its files (adding their hashes to ``written``); the
        first failure's reason, if any."""
        folder = self._tmp_dir(tag)
        deadline = time.monotonic() + timeout
        for rank in range(self.topo.world_size):
            done, failed = folder / f".rank{rank}.done", folder / f".rank{rank}.failed"
            while not (done.exists() or failed.exists()):
                if time.monotonic() > deadline:
                    return f"rank {rank} did not finish writing its files within {timeout:.0f} s"
                time.sleep(0.01)
            if failed.exists():
                return f"rank {rank}: {failed.read_text() or 'a write failed'}"
            with contextlib.suppress(ValueError, TypeError):  # unreadable hashes: re-read for the manifest
                written.update({name: (int(n), h) for name, (n, h) in json.loads(done.read_text()).items()})
        for marker in folder.glob(".rank*"):
            marker.unlink()
        return None

    per_rank_files = False
    """Whether every rank writes files of its own (then rank 0 waits for their markers before the commit)."""

    def _keep(self, obj: Any) -> Any:
        """What a snapshot holds of ``obj``: a host copy for a background save; the object itself when the
        save is written before training goes on."""
        return self._staging.copy(obj) if self.async_save else obj

    def _tmp_dir(self, tag: str) -> Path:
        return self.dir / f"{TMP_PREFIX}{tag}"

    def _snapshot(self, tag: str, **kwargs: Any) -> tuple[list[tuple[Path, Any, Any]], Any]:
        """Collective: copy what this rank must write to host memory. Returns ([(path, object, writer)],
        what rank 0's commit needs)."""
        raise NotImplementedError

    def _commit(
        self,
        tag: str,
        *,
        state: TrainingState,
        metrics: dict[str, float],
        payload: Any,
        written: dict[str, tuple[int, str]],
    ) -> dict[Path, tuple[int, str]]:
        """Rank 0, after every rank wrote its files: put the checkpoint in place (may raise OSError).
        Returns (bytes, sha256) by final path of the files whose hashes are already known."""
        raise NotImplementedError

    def _discard(self, tag: str) -> None:
        """After a failed save (rank 0): remove every file of the uncommitted ``tag`` and any temporary."""
        if manifest_path(self.dir, tag).exists():
            return  # committed after all; never delete a committed checkpoint
        for path in self._existing_tag_paths(tag):
            self._delete_inside_run(path)
        for folder in self._leftover_folders():
            remove_tmp_leftovers(folder)

    # -- retention -----------------------------------------------------------------------------------

    def apply_retention(self, protect: int | None, *, background: bool = False) -> list[Path]:
        """Keep the newest ``keep_last_n`` epoch checkpoints and ``protect`` (the best epoch); drop step
        checkpoints older than the newest checkpoint. Returns the paths removed.

        The stale checkpoints' manifests go first (durably), so a crash halfway leaves uncommitted leftovers
        for the next start to remove, never a committed checkpoint with files missing. Their files are then
        deleted here, or by a thread of their own with ``background`` (deleting hundreds of MB takes a while
        on some file systems; torchtitan purges the same way). ``wait()`` and ``join()`` wait for it."""
        committed = self.committed()
        if not committed:
            return []
        newest = committed[-1]
        epochs = [m.epoch for m in committed if m.is_epoch]
        keep = set(epochs[-self.keep_last_n :]) if self.keep_last_n else set(epochs)
        if protect is not None:
            keep.add(protect)
        stale = [m.tag for m in committed if (m.epoch not in keep if m.is_epoch else m is not newest)]
        for tag in stale:
            manifest_path(self.dir, tag).unlink()
        if stale:
            fsync_dir(manifest_path(self.dir, stale[0]).parent)
        removed = [path for tag in stale for path in self._existing_tag_paths(tag)]
        self._join_purge()
        if background:
            self._purge = threading.Thread(
                target=self._purge_files, args=(removed,), name="purge", daemon=True
            )
            self._purge.start()
        else:
            self._purge_files(removed, report=False)
        return removed

    def _purge_files(self, paths: list[Path], report: bool = True) -> None:
        try:
            for path in paths:
                self._delete_inside_run(path)
        except (OSError, RuntimeError) as e:
            if not report:
                raise
            print(f"warning: could not delete an old checkpoint (the next start removes it): {e}")

    def _join_purge(self) -> None:
        if self._purge is not None:
            self._purge.join()
            self._purge = None

    def _delete_inside_run(self, path: Path) -> None:
        """Delete a file or folder of this run; a link is removed itself, never what it points to."""
        run = self.run_dir.resolve()
        if path.is_symlink():  # the link itself lives in its parent folder
            inside = path.parent.resolve().is_relative_to(run)
        else:
            target = path.resolve()
            inside = target.is_relative_to(run) and target != run
        if not inside:
            raise RuntimeError(f"refusing to delete {path}: outside run folder {self.run_dir}")
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)

    # -- resume --------------------------------------------------------------------------------------

    def find_resume_point(self) -> ResumePoint:
        """The newest checkpoint whose files all match its manifest (decided on rank 0, agreed by all).

        Damaged checkpoints met on the way are moved aside to ``run/damaged/`` (never deleted) and reported.
        """

        def decide() -> ResumePoint:
            point = ResumePoint(None)
            for bad in unreadable_manifests(self.dir):
                moved = self._move_aside(bad.stem, [bad])
                point.damaged.append(
                    {"tag": bad.stem, "reason": "its manifest is unreadable", "moved_to": moved}
                )
            for manifest in reversed(self.committed()):
                reason = verify(self.dir, manifest)
                if reason is None:
                    point.manifest = manifest
                    return point
                paths = [manifest_path(self.dir, manifest.tag), *self._tag_paths(manifest.tag)]
                moved = self._move_aside(manifest.tag, paths)
                point.damaged.append({"tag": manifest.tag, "reason": reason, "moved_to": moved})
            return point

        return decide_on_rank0(self.topo, decide)

    def _move_aside(self, tag: str, paths: list[Path]) -> str:
        """Move a damaged checkpoint's files into ``run/damaged/<tag>[-N]/`` for inspection (rank 0)."""
        base = self.run_dir / DAMAGED_DIR / tag
        target, n = base, 1
        while target.exists():
            n += 1
            target = base.with_name(f"{tag}-{n}")
        target.mkdir(parents=True)
        for path in paths:
            if path.exists() or path.is_symlink():
                os.replace(path, target / path.relative_to(self.dir).as_posix().replace("/", "__"))
        fsync_dir(target)
        fsync_dir(self.dir)
        return str(target.relative_to(self.run_dir))

    def repair_links(self, best_epoch: int | None) -> None:
        """Rank 0, after a resume: ``last``/``best`` point at intact epoch files (a damaged one was moved)."""
        if not self.topo.is_main:
            return
        epochs = self.epochs_on_disk()
        for name, epoch in (("last", epochs[-1] if epochs else None), ("best", best_epoch)):
            link = self.dir / f"{name}.ckpt"
            target = self.dir / f"{epoch_tag(epoch)}.ckpt" if epoch is not None else None
            if target is not None and target.is_file():
                if not (link.is_file() and os.path.samefile(link, target)):
                    link_or_copy(target, link)
            elif link.exists() and not (epoch is not None and epoch in epochs):
                link.unlink()

    def load(
        self,
        manifest: Manifest,
        *,
        model: Any,
        optimizer: Any,
        ema: EMA,
        noise_generator: torch.Generator,
        seed: int,
    ) -> TrainingState:
        raise NotImplementedError


def _describe(error: OSError) -> str:
    where = f" writing {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


def _guard(
    errors: list[str],
    written: dict[str, tuple[int, str]],
    path: Path,
    obj: Any,
    write: Any,
    flusher: Flusher,
    *,
    hash_on_thread: bool,
) -> None:
    """Write one file of a save through ``write(obj, file)``, hashed as it goes, and hand it to ``flusher``
    to be fsynced while the next one is written. An OSError (full disk, lost mount) is recorded instead of
    raised, and the rank's remaining files are skipped."""
    if errors:
        return
    try:
        faults.point("write")
        written[path.name] = write_file(path, lambda f: write(obj, f), flusher, hash_on_thread=hash_on_thread)
    except OSError as e:
        errors.append(_describe(e))


BACKGROUND_NICENESS = 10


def _yield_cpu_to_training() -> None:
    """Lower the calling thread's CPU priority (Linux: niceness is per thread, and the threads it starts
    inherit it), so that a background save takes the cores training leaves idle rather than training's."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)


def _write_marker(folder: Path, rank: int, error: str | None, written: dict[str, tuple[int, str]]) -> None:
    """Tell rank 0 this rank's files are written (``.rankN.done``: their hashes) or not (``.rankN.failed``:
    the reason)."""
    marker = folder / f".rank{rank}.{'failed' if error else 'done'}"
    try:
        marker.write_text(error or json.dumps(written))
    except OSError:  # a full disk may refuse even the reason; an empty marker still needs no data block
        marker.touch()


def _nbytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors in ``obj``, each storage counted once (a merged file shares the state's)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v, seen) for v in obj)
    return 0


@dataclass
class _Job:
    """The save in flight on this rank: what it writes, and how it ended (``outcome``)."""

    tag: str
    outcome: dict[str, Any]
    items: list[tuple[Path, Any, Any]]
    """(path, object, writer) of each file this rank writes: the snapshot."""
    payload: Any
    """What rank 0's commit needs (``_snapshot``'s second result)."""
    state: TrainingState
    metrics: dict[str, float]
    is_best: bool
    start: float
    """``time.perf_counter()`` when the save began (the outcome's seconds count from it)."""
    thread: threading.Thread | None = None
