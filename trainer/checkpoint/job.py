"""A save in flight, on one rank: write this rank's files, meet the other ranks, commit on rank 0, learn
the outcome.

``Committer.run`` runs in a background thread of its own (or inline, for a synchronous save) and never
raises: every failure, a dead peer included, becomes the job's ``outcome["error"]``, the same on every rank.
The ranks meet through the collectives' background group, whose bounded timeout turns a rank that died
during the save into a failed save instead of a hang. The files themselves come from the format's
snapshot; ``storage/`` writes them, rank 0 finishes them (the format) and commits them (``protocol.py``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from launch import PeerLost, Topology
from trainer.checkpoint.formats import CheckpointFormat, PendingFile, PendingPart, Snapshot, Written
from trainer.checkpoint.manifest import Entry, Manifest, whole
from trainer.checkpoint.protocol import CommitProtocol
from trainer.checkpoint.retention import Scores
from trainer.checkpoint.sharding.owned import Piece
from trainer.faults import Faults
from trainer.storage.atomic import Flusher, fsync_dir, write_file
from trainer.storage.parts import Part, write_part
from trainer.storage.tensor_files import FileLayout

BACKGROUND_NICENESS = 10


@dataclass
class SaveJob:
    """One save on this rank, from its snapshot to its outcome."""

    tag: str
    snapshot: Snapshot
    progress: dict[str, Any]
    """The trainer's counters as saved (``TrainState.state_dict()``)."""
    metrics: dict[str, float]
    is_best: bool
    start: float
    """``time.perf_counter()`` when the save began (its figures count from it)."""
    outcome: dict[str, Any] = field(default_factory=dict)
    """``tag``, ``global_step``, ``snapshot_bytes``, ``blocked_seconds``; then ``file``, ``bytes`` and
    ``seconds``, or ``error`` (with ``peer_lost``: the ``PeerLost`` when a rank was lost, and ``committed``:
    whether rank 0 had committed it)."""
    thread: threading.Thread | None = None

    @property
    def step(self) -> int:
        return int(self.progress["global_step"])

    @property
    def is_epoch(self) -> bool:
        return self.progress["step_in_epoch"] == 0

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


class Committer:
    """Carries out save jobs on this rank."""

    def __init__(
        self,
        topo: Topology,
        fmt: CheckpointFormat,
        protocol: CommitProtocol,
        faults: Faults,
        *,
        background: bool,
        warn: Callable[[str], None],
    ) -> None:
        self.topo, self.format, self.protocol, self.faults = topo, fmt, protocol, faults
        self.background, self.warn = background, warn

    def start(self, job: SaveJob) -> None:
        """Run ``job`` in a thread of its own, or right here for a synchronous save."""
        if self.background:
            job.thread = threading.Thread(target=self.run, args=(job,), name=f"save-{job.tag}", daemon=True)
            job.thread.start()
        else:
            self.run(job)

    def run(self, job: SaveJob) -> None:
        """Write this rank's files, meet the other ranks, commit on rank 0, learn the outcome."""
        if self.background:
            _yield_cpu_to_training()
        comm, tag = self.topo.comm, job.tag
        outcome: dict[str, Any] | None = None
        try:
            mine = self._write(job)
            self.faults.point("save.rendezvous", tag=tag, step=job.step)
            reports = comm.background_exchange(mine, what=f"the save of {tag} (every rank's files written)")
            outcome = self._commit(job, reports) if reports is not None else None
            outcome = comm.background_broadcast(outcome, what=f"the save of {tag} (its commit)")
        except PeerLost as e:
            committed = outcome is not None and "file" in outcome  # rank 0 committed before the peer was lost
            if self.topo.is_main and not committed:
                self.protocol.discard(tag)
            outcome = {"error": str(e), "peer_lost": e, "committed": committed}
        except Exception as e:  # a bug: still end the job, so that no rank waits for it forever
            outcome = {"error": f"{type(e).__name__}: {e}"}
        finally:
            job.snapshot = Snapshot()  # drop the snapshot's references (staging keeps its buffers)
        job.outcome.update(outcome, tag=tag, global_step=job.step)

    def _write(self, job: SaveJob) -> tuple[str | None, dict[str, Entry | Part]]:
        """This rank's files and parts of the save, hashed as written: (the first error, or None; what was
        written, by file name). A failed write (full disk, lost mount) skips the rest. Rank 0 draws up the
        layouts it hands out (``Snapshot.layouts``) on a thread of its own while the rest is written."""
        written: dict[str, Entry | Part] = {}
        snapshot, tag = job.snapshot, job.tag
        later: list[PendingFile | PendingPart] = [p for p in snapshot.parts if isinstance(p.layout, str)]
        later += [f for f in snapshot.files if f.after_layouts]
        first: list[PendingFile | PendingPart] = [f for f in snapshot.files if not f.after_layouts]
        first += [part for part in snapshot.parts if not isinstance(part.layout, str)]
        drawing: Future[dict[str, FileLayout]] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layout") as pool, Flusher() as flusher:
            if later and self.topo.is_main:
                assert snapshot.layouts is not None, "rank 0's snapshot has no layouts"
                drawing = pool.submit(snapshot.layouts)
            error = self._write_some(job, first, {}, flusher, written)
            if later:  # every rank meets here, whatever happened so far
                layouts, drawn_error = self._handed_out(drawing, tag)
                error = error or drawn_error
                if self.topo.is_main:
                    snapshot.drawn = layouts
                if error is None:
                    error = self._write_some(job, later, layouts, flusher, written)
            if error is None:
                try:
                    flusher.wait()  # every file on disk before the others are told so, and its name too
                    for folder in {item.path.parent for item in (*first, *later)}:
                        fsync_dir(folder)
                except OSError as e:
                    error = describe(e)
        return error, written

    def _write_some(
        self, job: SaveJob, pending: list[PendingFile | PendingPart], layouts: dict[str, FileLayout],
        flusher: Flusher, written: dict[str, Entry | Part],
    ) -> str | None:  # fmt: skip
        """Write ``pending`` (``layouts``: rank 0's, by name) into ``written``; the first error, or None."""
        try:
            for item in pending:
                self.faults.point("write", tag=job.tag, step=job.step)
                if isinstance(item, PendingFile):
                    written[item.path.name] = whole(*write_file(
                        item.path, partial(_serialize, item), flusher, hash_on_thread=not self.background,
                    ))  # fmt: skip
                    continue
                layout = item.layout if isinstance(item.layout, FileLayout) else layouts[item.layout]
                blocks = _placed(layout, item.pieces)
                if self.topo.is_main:
                    blocks += layout.header
                written[item.path.name] = write_part(item.path, blocks, flusher, rank=self.topo.rank,
                                                     hash_on_thread=not self.background)  # fmt: skip
        except OSError as e:
            return describe(e)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    def _handed_out(
        self, drawing: Future[dict[str, FileLayout]] | None, tag: str
    ) -> tuple[dict[str, FileLayout], str | None]:
        """Rank 0's layouts on every rank (the headers, which only rank 0 writes, stay on rank 0); (layouts,
        why there are none)."""
        mine: dict[str, FileLayout] = {}
        error = None
        if drawing is not None:
            try:
                mine = drawing.result()
            except Exception as e:  # every rank must still meet at the broadcast
                error = f"{type(e).__name__}: {e}"
        offsets = {name: replace(layout, header=[]) for name, layout in mine.items()}
        sent = self.topo.comm.background_broadcast((offsets, error), what=f"the save of {tag} (its layout)")
        return (mine if self.topo.is_main else sent[0]), sent[1]

    def _commit(
        self, job: SaveJob, reports: list[tuple[str | None, dict[str, Entry | Part]]]
    ) -> dict[str, Any]:
        """Rank 0, once every rank's files are written: finish the format's files, commit, publish."""
        tag, step, progress = job.tag, job.step, job.progress
        errors = [f"rank {r}: {e}" if r else e for r, (e, _) in enumerate(reports) if e]
        error = errors[0] if errors else None
        if error is None:
            written = entries_of([written for _, written in reports])
            try:
                self.faults.point("save.shards", tag=tag, step=step)
                known = self.format.finish(tag, job.snapshot, written, progress, job.metrics,
                                           lambda path: self.faults.point("write", tag=tag, step=step))  # fmt: skip
                self.faults.point("save.manifest", tag=tag, step=step)
                manifest = Manifest(tag, progress["epoch"], progress["step_in_epoch"], step, self.topo.world_size,
                                    self.topo.distributed, best=progress["best"],
                                    references=self.format.references(), precision=self.topo.precision)  # fmt: skip
                self.protocol.commit(manifest, known)
            except OSError as e:
                error = describe(e)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        if error is not None:
            self.protocol.discard(tag)
            return {"error": error}
        try:  # committed: a failure from here on costs nothing already saved
            self.protocol.publish(
                tag, is_epoch=job.is_epoch, is_best=job.is_best, best_epoch=(progress["best"] or {}).get("epoch"),
                scores=Scores.from_history(progress["history"], progress["best"]),
                before_retention=lambda: self.faults.point("save.retention", tag=tag, step=step),
            )  # fmt: skip
        except OSError as e:
            self.warn(f"{tag} is saved, but relinking last/best or retention failed: {describe(e)}")
        ckpt, files = self.protocol.where.ckpt(tag), self.protocol.tag_files(tag)
        return {
            "file": str(ckpt if ckpt.is_file() else self.protocol.tag_paths(tag)[-1]),
            "bytes": sum(f.stat().st_size for f in files),
            "seconds": time.perf_counter() - job.start,
        }


def describe(error: OSError) -> str:
    where = f" writing {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


def entries_of(reports: list[dict[str, Entry | Part]]) -> Written:
    """Every rank's report of what it wrote, as manifest entries by file name: a file written in parts gets
    one entry with every rank's part (its size: where the last part ends)."""
    entries: Written = {}
    parts: dict[str, list[Part]] = {}
    for written in reports:
        for name, entry in written.items():
            if isinstance(entry, Part):
                parts.setdefault(name, []).append(entry)
            else:
                entries[name] = entry
    for name, file_parts in parts.items():
        size = max((offset + length for part in file_parts for offset, length in part.ranges), default=0)
        entries[name] = {
            "bytes": size,
            "parts": [part.entry() for part in sorted(file_parts, key=lambda p: p.rank)],
        }
    return entries


def _placed(layout: FileLayout, pieces: list[Piece]) -> list[tuple[int, Any]]:
    """(byte offset, data) of each piece in a file of ``layout``."""
    return [(layout.span(piece.key, piece.start, piece.data.numel())[0], piece.data) for piece in pieces]


def _serialize(pending: PendingFile, f: Any) -> None:
    pending.write(pending.obj, f)


def _yield_cpu_to_training() -> None:
    """Lower the calling thread's CPU priority (Linux: niceness is per thread, and the threads it starts
    inherit it), so that a background save takes the cores training leaves idle rather than training's."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)


def nbytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors in ``obj``, each storage counted once (a merged file shares the state's)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(nbytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(nbytes(v, seen) for v in obj)
    return 0
