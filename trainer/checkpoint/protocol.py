"""The commit protocol: global rank 0's file work on a run's checkpoints, in the order that keeps every
committed checkpoint whole through a crash or a full disk at any point.

A checkpoint is *committed* by its manifest (``manifests/<tag>.json``: size and checksum of every file),
written last:
  1. every file is written under a ``.tmp-`` name and renamed when complete (the format's job);
  2. ``commit``: the manifest is written (atomically, fsynced);
  3. ``publish``: ``last``/``best`` are relinked to it, then retention removes the checkpoints it no longer
     keeps: their manifests first (durably), then their files (in the background).
What has no manifest was never committed: ``clean_start`` removes it at the next start, a resume never reads
it. ``find_resume_point`` verifies checkpoints newest first and moves damaged ones to ``damaged/<tag>/``; for a
resume it checks only that their files are there, whole in size, and the ranks hash them together (``reject``
takes a checkpoint whose hashes they found wrong).

Nothing here is collective: the manager calls it on rank 0 and tells the other ranks what happened.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainer.checkpoint.folder import CheckpointFolder, epoch_tag, is_tag
from trainer.checkpoint.manifest import (
    Entry,
    Manifest,
    manifest_path,
    read_manifests,
    unreadable_manifests,
    verify,
    write_manifest,
)
from trainer.checkpoint.retention import RetentionPolicy, Scores, plan_retention
from trainer.errors import UserError
from trainer.storage.atomic import (
    delete_inside,
    fsync_dir,
    link_or_copy,
    make_read_only,
    remove_tmp_leftovers,
)
from trainer.storage.paths import real_folder, within


@dataclass
class ResumePoint:
    """What a resume found: the newest intact checkpoint (None if there is none) and what was damaged."""

    manifest: Manifest | None
    damaged: list[dict[str, str]] = field(default_factory=list)
    """One entry per damaged checkpoint: ``tag``, ``reason``, ``moved_to``."""


class CommitProtocol:
    """The checkpoints of one folder on disk (where a tag's files live: ``CheckpointFolder.tag_roots``)."""

    def __init__(self, where: CheckpointFolder, retention: RetentionPolicy | None = None) -> None:
        self.where, self.folder = where, where.path
        self.roots, self.leftover_folders = where.tag_roots, where.leftover_folders
        self.retention = retention or RetentionPolicy()
        self._purge: threading.Thread | None = None
        """Deleting the files of checkpoints retention dropped (``retire``)."""

    # -- what is on disk ------------------------------------------------------------------------------

    def committed(self) -> list[Manifest]:
        """Committed checkpoints, oldest first."""
        return read_manifests(self.folder)

    def epochs_on_disk(self) -> list[int]:
        return sorted(m.epoch for m in self.committed() if m.is_epoch)

    def tag_paths(self, tag: str) -> list[Path]:
        return [folder / f"{tag}{suffix}" for folder, suffix in self.roots]

    def existing_paths(self, tag: str) -> list[Path]:
        """The files and folders of ``tag`` that are there (a link counts, even a dangling one)."""
        return [path for path in self.tag_paths(tag) if path.exists() or path.is_symlink()]

    def tag_files(self, tag: str) -> list[Path]:
        files = []
        for path in self.tag_paths(tag):
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

    # -- start of a launch: leftovers of a crash ------------------------------------------------------

    def check_folders(self) -> None:
        """The folders the tool writes, moves files into and deletes from are real folders of the owner: a
        symbolic link among them is refused (``OutsideFolder``) before anything is touched."""
        where = self.where
        for folder in (self.folder, *(root for root, _ in self.roots), *self.leftover_folders,
                       where.manifests, where.damaged, where.superseded):  # fmt: skip
            if folder != where.owner:
                within(where.owner, folder.relative_to(where.owner).as_posix())

    def clean_start(self, adopt: Callable[[str], Manifest | None]) -> list[str]:
        """Remove what a crashed writer left (never a committed checkpoint); returns what was removed, for
        the log. A run written before manifests existed has its epoch checkpoints committed as they are
        (``adopt``: the format's manifest of a tag, or None)."""
        self.check_folders()
        if not self.where.manifests.is_dir():
            for tag in sorted(self._tags_on_disk()):
                manifest = adopt(tag)
                if manifest is not None:
                    write_manifest(self.folder, manifest, self.tag_files(tag))
        notes = []
        for folder in self.leftover_folders:
            for removed in remove_tmp_leftovers(folder):
                notes.append(f"Removed an incomplete checkpoint file left by a crash: {removed}")
        committed = {m.tag for m in self.committed()} | {p.stem for p in unreadable_manifests(self.folder)}
        for tag in sorted(self._tags_on_disk() - committed):
            for path in self.existing_paths(tag):
                delete_inside(path, self.where.owner)
                notes.append(
                    f"Removed an uncommitted checkpoint (no manifest; its save was interrupted): {path}"
                )
        return notes

    # -- a save ---------------------------------------------------------------------------------------

    def commit(self, manifest: Manifest, known: dict[Path, Entry]) -> None:
        """Write ``manifest`` over every file of its tag: from now on the checkpoint counts, and its files
        are read-only."""
        files = self.tag_files(manifest.tag)
        write_manifest(self.folder, manifest, files, known)
        make_read_only(files)

    def publish(self, tag: str, *, is_epoch: bool, is_best: bool, best_epoch: int | None, scores: Scores,
                before_retention: Callable[[], None]) -> None:  # fmt: skip
        """After the commit: relink ``last``/``best`` to an epoch checkpoint, then apply retention."""
        if is_epoch:
            link_or_copy(self.where.ckpt(tag), self.where.ckpt("last"))
            if is_best:
                link_or_copy(self.where.ckpt(tag), self.where.ckpt("best"))
        before_retention()
        self.retire(best_epoch, scores, background=True)

    def discard(self, tag: str) -> None:
        """After a failed save: remove every file of the uncommitted ``tag`` and any temporary."""
        if manifest_path(self.folder, tag).exists():
            return  # committed after all; never delete a committed checkpoint
        for path in self.existing_paths(tag):
            delete_inside(path, self.where.owner)
        for folder in self.leftover_folders:
            remove_tmp_leftovers(folder)

    # -- retention -----------------------------------------------------------------------------------

    def retire(
        self, best_epoch: int | None, scores: Scores | None = None, *, background: bool = False
    ) -> list[Path]:
        """Remove the checkpoints retention no longer keeps; returns the paths removed (or being removed).

        The manifests go first (durably), so a crash halfway leaves uncommitted leftovers for the next start
        to remove, never a committed checkpoint with files missing. The files are then deleted here, or by a
        thread of their own with ``background`` (deleting hundreds of MB takes a while on some file systems;
        torchtitan purges the same way); ``join`` waits for it."""
        plan = plan_retention(self.committed(), self.retention, best_epoch, scores)
        for tag in plan.drop:
            manifest_path(self.folder, tag).unlink()
        if plan.drop:
            fsync_dir(manifest_path(self.folder, plan.drop[0]).parent)
        removed = [path for tag in plan.drop for path in self.existing_paths(tag)]
        self.join()
        if background:
            self._purge = threading.Thread(target=self._delete, args=(removed,), name="purge", daemon=True)
            self._purge.start()
        else:
            self._delete(removed, report=False)
        return removed

    def _delete(self, paths: list[Path], report: bool = True) -> None:
        try:
            for path in paths:
                delete_inside(path, self.where.owner)
        except (OSError, RuntimeError) as e:
            if not report:
                raise
            print(f"warning: could not delete an old checkpoint (the next start removes it): {e}")

    def join(self) -> None:
        """Wait for a background purge."""
        if self._purge is not None:
            self._purge.join()
            self._purge = None

    # -- resume --------------------------------------------------------------------------------------

    def find_resume_point(self, *, hash_files: bool = True) -> ResumePoint:
        """The newest checkpoint whose files all match its manifest. Damaged checkpoints met on the way are
        moved aside to ``damaged/`` (never deleted) and reported. Without ``hash_files`` only the files'
        presence and sizes are checked here: the caller then hashes them (every rank its share) and hands a
        mismatch to ``reject``."""
        point = ResumePoint(None)
        for bad in unreadable_manifests(self.folder):
            moved = self._move_aside(bad.stem, [bad])
            point.damaged.append({"tag": bad.stem, "reason": "its manifest is unreadable", "moved_to": moved})
        return self._newest_intact(point, hash_files)

    def reject(self, point: ResumePoint, reason: str) -> ResumePoint:
        """``point``'s checkpoint failed the hashing of its files: moved aside like any damaged one, and the
        next newest found as by ``find_resume_point(hash_files=False)``."""
        assert point.manifest is not None
        self._set_aside(point, point.manifest, reason)
        return self._newest_intact(point, hash_files=False)

    def _newest_intact(self, point: ResumePoint, hash_files: bool) -> ResumePoint:
        """``point`` with the newest committed checkpoint that passes ``verify`` (sizes only, without
        ``hash_files``), or None; each one that fails on the way is set aside into ``point.damaged``."""
        point.manifest = None
        for manifest in reversed(self.committed()):
            reason = verify(self.folder, manifest, None if hash_files else [])
            if reason is None:
                point.manifest = manifest
                return point
            self._set_aside(point, manifest, reason)
        return point

    def _set_aside(self, point: ResumePoint, manifest: Manifest, reason: str) -> None:
        paths = [manifest_path(self.folder, manifest.tag), *self.tag_paths(manifest.tag)]
        moved = self._move_aside(manifest.tag, paths)
        point.damaged.append({"tag": manifest.tag, "reason": reason, "moved_to": moved})

    # -- going back ----------------------------------------------------------------------------------

    def resolve(self, spec: str) -> Manifest:
        """The committed, intact checkpoint ``spec`` names: an epoch number, a tag (``epoch_005``,
        ``step_0000120``), ``best``, ``last`` or ``newest``. Anything else is refused, listing the tags."""
        committed = self.committed()
        tags = [m.tag for m in committed]
        listed = ", ".join(tags) if tags else "none"
        if spec == "newest":  # the newest intact one (nothing is moved aside: the run may not be ours)
            intact = [m for m in reversed(committed) if verify(self.folder, m) is None]
            if not intact:
                raise UserError(f"{self.where.name} has no intact checkpoint to start from ({listed})")
            return intact[0]
        if spec in ("best", "last"):
            link = self.where.ckpt(spec)
            found = [m for m in committed if m.is_epoch and _same(link, self.where.ckpt(m.tag))]
        else:
            tag = epoch_tag(int(spec)) if spec.isdigit() else spec
            found = [m for m in committed if m.tag == tag]
            if not found and not is_tag(tag):
                raise UserError(f"--from takes an epoch number, a tag, best or last, got {spec!r}; checkpoints "
                                f"of {self.where.name}: {listed}")  # fmt: skip
        if not found:
            raise UserError(f"{self.where.name} has no checkpoint {spec!r}; its checkpoints: {listed}")
        reason = verify(self.folder, found[0])
        if reason is not None:
            raise UserError(f"checkpoint {found[0].tag} of {self.where.name} is damaged ({reason}); "
                            f"its checkpoints: {listed}")  # fmt: skip
        return found[0]

    def supersede_after(self, manifest: Manifest) -> list[dict[str, str]]:
        """Move every committed checkpoint newer than ``manifest`` to ``superseded/<tag>/`` (kept, never
        counted by retention); one entry per checkpoint moved: ``tag``, ``moved_to``."""
        moved = []
        for newer in self.committed():
            if newer.global_step > manifest.global_step:
                paths = [manifest_path(self.folder, newer.tag), *self.tag_paths(newer.tag)]
                moved.append(
                    {"tag": newer.tag, "moved_to": self._move_aside(newer.tag, paths, self.where.superseded)}
                )
        return moved

    def link_into(self, manifest: Manifest, other: CheckpointFolder) -> None:
        """Make ``manifest``'s checkpoint one of ``other``'s (a new run forked from it): its files hard-linked
        (committed files are read-only, never rewritten), its manifest last. Every path stays inside both
        checkpoint folders and passes through no link (``within``; the manifest's own entries were checked
        when it was read)."""
        target = real_folder(other.path, other.owner)
        for relative in manifest.files:
            destination = within(target, relative)
            real_folder(destination.parent, other.owner)
            link_or_copy(within(self.folder, relative), destination)
        real_folder(other.manifests, other.owner)
        link_or_copy(manifest_path(self.folder, manifest.tag), manifest_path(target, manifest.tag))

    def _move_aside(self, tag: str, paths: list[Path], where: Path | None = None) -> str:
        """Move a checkpoint's files into ``damaged/<tag>[-N]/`` (or ``where``) for inspection; the folder
        it goes to is a real folder of the owner (``real_folder``), named for a tag of the tag grammar only."""
        name = tag if is_tag(tag) else "unreadable-manifest"
        aside = real_folder(where or self.where.damaged, self.where.owner)
        base = aside / name
        target, n = base, 1
        while target.exists() or target.is_symlink():
            n += 1
            target = base.with_name(f"{name}-{n}")
        target.mkdir()
        for path in paths:
            if path.exists() or path.is_symlink():  # a link is moved itself, never what it points to
                os.replace(path, target / path.relative_to(self.folder).as_posix().replace("/", "__"))
        fsync_dir(target)
        fsync_dir(self.folder)
        return str(target.relative_to(self.where.owner))

    def repair_links(self, best_epoch: int | None) -> None:
        """After a resume: ``last``/``best`` point at intact epoch files (a damaged one was moved)."""
        epochs = self.epochs_on_disk()
        for name, epoch in (("last", epochs[-1] if epochs else None), ("best", best_epoch)):
            link = self.where.ckpt(name)
            target = self.where.ckpt(epoch_tag(epoch)) if epoch is not None else None
            if target is not None and target.is_file():
                if not (link.is_file() and os.path.samefile(link, target)):
                    link_or_copy(target, link)
            elif link.exists() and not (epoch is not None and epoch in epochs):
                link.unlink()


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
