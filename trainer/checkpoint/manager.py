"""The checkpoint manager: the one object the training loop talks to about checkpoints.

The trainer registers its states once (``TrainingStates``); the manager decides when to save, saves, waits
for the previous save, times it, keeps the rank rule, reports and records events:

    manager = CheckpointManager(folder, fmt, topo, states, policy, journal=run, metrics=trackers)
    manager.load()                                           # resume: newest intact checkpoint, fallback
    manager.maybe_save("step", loss=loss, stop_signal=sig)   # every step end: one collective
    manager.maybe_save("epoch", metrics=m, is_best=b, last=final)
    manager.close()

At every step end the ranks meet once (``_agree``): every rank's stop signal, the step's loss (added to the
trainer's running epoch loss), and two of rank 0's observations: whether ``save_every_n_minutes`` has passed
on its clock, and whether the background save in flight has finished. Every rank then takes the same
decisions.

A save, one way down: ``_save`` takes the snapshot (``formats/``, collective; training waits only for
this), then the job, in a background thread or inline, writes this rank's files (``storage/``), meets the other
ranks (a collective on a group of its own, with a bounded timeout: a dead rank fails the save instead of
hanging it), and on rank 0 finishes the format's files and commits (``protocol.py``); rank 0 then tells
every rank the outcome. One save is in flight at a time: the next one, or ``close``, waits for it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol

from launch import Topology, agree_on_signal, decide_on_rank0
from trainer.checkpoint.folder import CheckpointFolder
from trainer.checkpoint.formats import CheckpointDamaged, CheckpointFormat
from trainer.checkpoint.job import Committer, SaveJob, nbytes
from trainer.checkpoint.manifest import Manifest, verification_shares, verify
from trainer.checkpoint.policy import CheckpointPolicy
from trainer.checkpoint.protocol import CommitProtocol, ResumePoint
from trainer.checkpoint.states import TrainingStates
from trainer.errors import SaveFailed, UserError
from trainer.faults import NO_FAULTS, Faults
from trainer.storage.staging import HostStaging


class Journal(Protocol):
    """Where the manager says what happened (a run's ``RunHandle``): lines for the user and the record of
    events, saves and resumes. Every rank calls it; only global rank 0's writes."""

    def print(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def record_event(self, kind: str, **fields: Any) -> None: ...

    def record_save(self, record: dict[str, Any]) -> None: ...

    def record_resume(self, *, checkpoint: str | None, progress: dict[str, Any], world_size: int,
                      distributed: str, precision: str) -> None: ...  # fmt: skip

    def record_checkpoints(self, epochs: list[int]) -> None: ...


class MetricsLog(Protocol):
    """Where save timings go as metrics (the run's trackers)."""

    def log(self, metrics: dict[str, float | None], step: int) -> None: ...


@dataclass(frozen=True)
class Boundary:
    """What the ranks agreed at a step or epoch end."""

    stop_signal: int | None
    """A stop signal any rank received (the lowest rank's), or None; a checkpoint of this moment is then
    committed before ``maybe_save`` returns."""
    saved: str | None
    """The tag of the checkpoint started here, if any."""


class CheckpointManager:
    def __init__(
        self,
        where: CheckpointFolder,
        fmt: CheckpointFormat,
        topo: Topology,
        states: TrainingStates,
        policy: CheckpointPolicy,
        *,
        journal: Journal,
        metrics: MetricsLog,
        faults: Faults = NO_FAULTS,
    ) -> None:
        self.where, self.format, self.topo, self.states, self.policy = where, fmt, topo, states, policy
        self.journal, self.metrics, self.faults = journal, metrics, faults
        self.protocol = CommitProtocol(where, policy.retention)
        self._staging = HostStaging()
        """A background save's snapshot buffers, reused by the next save (``storage/staging.py``)."""
        self._committer = Committer(topo, fmt, self.protocol, faults, background=policy.async_save,
                                    warn=journal.warn)  # fmt: skip
        self._job: SaveJob | None = None
        self._last_save = time.monotonic()

    # -- resume -----------------------------------------------------------------------------------

    def load(self, accept: Callable[[Manifest], None] | None = None) -> Manifest | None:
        """Resume (every rank): restore the newest intact checkpoint into the registered states. Damaged
        ones met on the way are moved aside and reported; with none intact, training starts over in the
        run's own folder. ``accept(manifest)`` may refuse the checkpoint (a ``UserError``) before anything
        is loaded or recorded. Returns the checkpoint's manifest, or None."""
        point: ResumePoint = decide_on_rank0(
            self.topo.comm, self.topo.is_main, self._find_resume_point, errors=(UserError,),
            what="choosing the checkpoint to resume from",
        )  # fmt: skip
        prepared: Any = None
        while point.manifest is not None:  # the newest complete one: every rank hashes its share of it
            reason = self._verify_together(point.manifest)
            if reason is None:  # verified: every rank reads and checks what it will load, then they agree
                prepared, reason = self._prepare_together(point.manifest)
            if reason is None:
                break
            point = decide_on_rank0(
                self.topo.comm, self.topo.is_main, partial(self.protocol.reject, point, reason),
                errors=(UserError,), what="choosing the checkpoint to resume from",
            )  # fmt: skip
        if accept is not None and point.manifest is not None:
            accept(point.manifest)
        journal, name = self.journal, self.where.name
        for bad in point.damaged:
            journal.warn(
                f"checkpoint {bad['tag']} of {name} is damaged: {bad['reason']}. Its files were "
                f"moved to {self.where.owner / bad['moved_to']}; falling back to an older checkpoint"
            )
            journal.record_event("fallback", **bad)
        manifest = point.manifest
        if manifest is None:
            journal.warn(
                f"{name} has no intact checkpoint to resume from: TRAINING STARTS OVER FROM "
                "SCRATCH in the same run folder"
                + (" (the damaged files are kept under damaged/)" if point.damaged else "")
            )
            journal.record_event("restart_from_scratch", damaged=[d["tag"] for d in point.damaged])
        else:
            self.states.progress.load_state_dict(self.format.load(prepared, self.states))
            journal.print(
                f"Resuming {name} from {manifest.describe()} "
                f"(checkpoint {manifest.tag}, verified against its manifest)"
            )
            self._report_changes(manifest)
        if self.topo.is_main:
            self.protocol.repair_links((self.states.progress.best or {}).get("epoch"))
        journal.record_resume(
            checkpoint=manifest.tag if manifest else None, progress=self.states.progress.state_dict(),
            world_size=self.topo.world_size, distributed=self.topo.distributed, precision=self.topo.precision,
        )  # fmt: skip
        return manifest

    def _find_resume_point(self) -> ResumePoint:
        """Rank 0: clear what a crash left, then find the newest checkpoint with every file in place (the
        ranks then hash them together)."""
        for note in self.protocol.clean_start(self.format.adopt):
            self.journal.print(note)
        return self.protocol.find_resume_point(hash_files=False)

    def _verify_together(self, manifest: Manifest) -> str | None:
        """Every rank: hash this rank's share of ``manifest``'s files (``verification_shares``); the first
        rank's reason the checkpoint is damaged, or None when every file matches."""
        topo = self.topo
        share = verification_shares(manifest, topo.world_size)[topo.rank]
        reason = verify(self.where.path, manifest, share)
        reasons = topo.comm.all_gather(reason, what=f"verifying checkpoint {manifest.tag}")
        return next((r for r in reasons if r is not None), None)

    def _prepare_together(self, manifest: Manifest) -> tuple[Any, str | None]:
        """Every rank: the format's ``prepare`` of ``manifest``'s checkpoint, and the first rank's reason it
        is damaged (``CheckpointDamaged``: a file that matches its manifest but cannot be read), or None."""
        prepared, reason = None, None
        try:
            prepared = self.format.prepare(manifest, self.states)
        except CheckpointDamaged as e:
            reason = str(e)
        reasons = self.topo.comm.all_gather(reason, what=f"reading checkpoint {manifest.tag}")
        return prepared, next((r for r in reasons if r is not None), None)

    def _report_changes(self, manifest: Manifest) -> None:
        """What differs from the launch that saved ``manifest``: the processes and their sharding, and the
        precision (the checkpoint holds fp32 master weights and optimizer state whatever the model computed
        in, so a change of precision changes only the forward and backward passes)."""
        topo, journal = self.topo, self.journal
        if (manifest.world_size, manifest.distributed) != (topo.world_size, topo.distributed):
            journal.print(
                f"The checkpoint was saved by {manifest.world_size} process(es) ({manifest.distributed}); "
                f"continuing on {topo.world_size} ({topo.distributed}) with its full optimizer state"
            )
            journal.record_event(
                "world_size_change", tag=manifest.tag, from_world_size=manifest.world_size,
                from_distributed=manifest.distributed, to_world_size=topo.world_size,
                to_distributed=topo.distributed,
            )  # fmt: skip
        if manifest.precision not in (None, topo.precision):
            journal.print(
                f"The checkpoint was trained in {manifest.precision}; continuing in {topo.precision} "
                "(its fp32 master weights and optimizer state carry over)"
            )
            journal.record_event("precision_change", tag=manifest.tag, from_precision=manifest.precision,
                                 to_precision=topo.precision)  # fmt: skip

    # -- when to save -----------------------------------------------------------------------------

    def maybe_save(
        self,
        at: Literal["step", "epoch"],
        *,
        loss: float = 0.0,
        stop_signal: int | None = None,
        metrics: dict[str, float] | None = None,
        is_best: bool = False,
        last: bool = False,
    ) -> Boundary:
        """At every step end (``loss``: this rank's loss of the step) and epoch end (``metrics`` of the
        epoch, whether it ``is_best``), on every rank: agree with the other ranks, report a background save
        that finished, and save when the policy, the clock or a stop signal asks. ``last``: the epoch's
        last step, or the run's last epoch. A new best epoch is always saved, whatever the epoch interval,
        so that ``best.ckpt`` is the best epoch's."""
        votes = self._agree(stop_signal, loss)
        progress = self.states.progress
        if at == "step":
            progress.epoch_loss_sum += votes["loss"]
        if votes["finished"]:
            self._finish()
        stop = votes["stop"]
        every = self.policy.save_every_n_steps
        due = (
            every > 0 and progress.global_step % every == 0 and not last
            if at == "step"
            else progress.epoch % self.policy.save_every_n_epochs == 0 or last or is_best  # best: always kept
        )
        saved = None
        if due or votes["clock"] or stop is not None:
            if at == "step":
                metrics = {"train_loss": progress.epoch_loss_sum / max(1, progress.step_in_epoch)}
            saved = self._save(metrics or {}, is_best=is_best and at == "epoch")
        if stop is not None:
            self._finish()  # the checkpoint of this moment is committed before training stops
        return Boundary(stop, saved)

    def _agree(self, stop_signal: int | None, loss: float) -> dict[str, Any]:
        """The one collective of a step end: every rank's signal and loss, rank 0's clock and save state."""
        topo, clock, finished = self.topo, 0.0, 0.0
        if topo.is_main:
            minutes = self.policy.save_every_n_minutes
            clock = float(bool(minutes) and time.monotonic() - self._last_save >= minutes * 60)
            finished = float(self._job is not None and self._job.done())
        step = self.states.progress.global_step
        stop, (loss_sum, clock, finished) = agree_on_signal(
            topo.comm, topo.rank, topo.world_size, stop_signal, what=f"the stop check at step {step}",
            sums=(loss, clock, finished),
        )  # fmt: skip
        return {
            "stop": stop,
            "loss": loss_sum / topo.world_size,
            "clock": bool(clock),
            "finished": bool(finished),
        }

    # -- saving -----------------------------------------------------------------------------------

    def _save(self, metrics: dict[str, float], *, is_best: bool) -> str:
        """Start a checkpoint of the registered states (every rank), once the previous one is finished.
        Training is blocked only while the state is copied to host memory (with ``async_save``)."""
        start = time.perf_counter()
        self._finish()  # a slow previous save blocks the loop too, and counts as such
        progress, background = self.states.progress, self.policy.async_save
        tag = progress.tag
        if progress.step_in_epoch == 0:
            progress.set_checkpoint(progress.epoch, f"{tag}.ckpt")  # part of the state being saved
        saved = progress.state_dict()
        keep = self._staging.copy if background else _same
        self._staging.begin()
        snapshot = self.format.snapshot(tag, self.states, saved, dict(metrics), keep)
        self._staging.end()
        job = SaveJob(tag, snapshot, saved, dict(metrics), is_best, start)
        # Host memory held by the snapshot (nothing is copied when the save is written right away).
        job.outcome["snapshot_bytes"] = nbytes(snapshot.tensors()) if background else 0
        self._committer.start(job)
        blocked = time.perf_counter() - start
        job.outcome["blocked_seconds"] = blocked
        if progress.step_in_epoch == 0 and progress.history:
            progress.history[-1]["save_blocked_seconds"] = round(blocked, 4)
        self.metrics.log(
            {
                "checkpoint/blocked_seconds": blocked,
                "checkpoint/snapshot_mb": job.outcome["snapshot_bytes"] / 1e6,
            },
            step=progress.global_step,
        )
        self._job, self._last_save = job, time.monotonic()
        if not background:
            self._finish()
        return tag

    # -- the end of a save --------------------------------------------------------------------------

    def _finish(self) -> None:
        """Wait for the save in flight (every rank at the same point; no collective of its own) and report
        it. A failed save stops the run on every rank when ``on_save_error`` is ``fail``."""
        job, self._job = self._job, None
        if job is None:
            return
        if job.thread is not None:
            job.thread.join()
        self._report(job)  # the files of checkpoints retention dropped may still be being deleted

    def _report(self, job: SaveJob) -> None:
        outcome, journal = job.outcome, self.journal
        if "error" in outcome:
            if not outcome.get("committed"):
                journal.record_event("save_failed", tag=job.tag, error=outcome["error"])
            if job.is_epoch and not outcome.get("committed"):
                self.states.progress.set_checkpoint(job.progress["epoch"], None)
            if outcome.get("peer_lost"):  # reported as any lost process is, wherever it is noticed
                self._warn_unsaved(job)
                raise outcome["peer_lost"]
            message = (
                f"checkpoint {job.tag} is committed, but then {outcome['error']}"
                if outcome.get("committed")
                else f"checkpoint {job.tag} could not be written ({outcome['error']}); its partial files were "
                "removed and every earlier checkpoint is intact"
            )
            if self.policy.on_save_error == "fail":
                raise SaveFailed(
                    f"{message}. The run stops (checkpoint.on_save_error: {self.policy.on_save_error}): free "
                    "space or fix the folder"
                )
            journal.warn(message + "; training continues and the next save tries again")
            return
        if not self.topo.is_main:
            return
        how = (
            f"in the background; training blocked {outcome['blocked_seconds']:.2f} s for a "
            f"{outcome['snapshot_bytes'] / 1e6:.1f} MB host-memory snapshot"
            if self.policy.async_save
            else "while training waited"
        )
        journal.print(
            f"Saved {outcome['file']} ({outcome['bytes'] / 1e6:.1f} MB in {outcome['seconds']:.2f} s {how})"
        )
        self.metrics.log(  # at the step the checkpoint was taken
            {"checkpoint/seconds": outcome["seconds"], "checkpoint/size_mb": outcome["bytes"] / 1e6},
            step=job.step,
        )
        journal.record_checkpoints(self.protocol.epochs_on_disk())
        journal.record_save(
            {
                "tag": job.tag, "global_step": job.step, "bytes": outcome["bytes"],
                "blocked_seconds": round(outcome["blocked_seconds"], 4),
                "write_seconds": round(outcome["seconds"], 4), "snapshot_bytes": outcome["snapshot_bytes"],
                "background": self.policy.async_save,
            }
        )  # fmt: skip

    @property
    def staged_bytes(self) -> int:
        """Host memory this rank keeps for background saves' snapshots (reused from one save to the next)."""
        return self._staging.nbytes

    def epochs_on_disk(self) -> list[int]:
        """The committed epoch checkpoints (rank 0; other ranks get [])."""
        return self.protocol.epochs_on_disk() if self.topo.is_main else []

    def close(self, *, failed: bool = False) -> None:
        """The end of training: finish and report the save in flight, and let the deletion of the
        checkpoints retention dropped end. After a failure (``failed``), only
        this rank's part of it is let finish, without a collective (the other ranks may be elsewhere), and
        nothing is raised."""
        if not failed:
            self._finish()
            self.protocol.join()
            return
        job, self._job = self._job, None
        if job is not None and job.thread is not None:
            job.thread.join()
        self.protocol.join()
        if job is not None and "error" in job.outcome:
            self._warn_unsaved(job)

    def _warn_unsaved(self, job: SaveJob) -> None:
        """Say what became of a failed save that ends the run: every rank says it, as the others may be gone."""
        fate = "is committed, but then" if job.outcome.get("committed") else "was not saved"
        print(f"warning: rank {self.topo.rank}: checkpoint {job.tag} {fate} ({job.outcome['error']})",
              file=sys.stderr, flush=True)  # fmt: skip


def _same(obj: Any) -> Any:
    return obj
