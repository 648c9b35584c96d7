"""Crash-safe file writes: a file is either absent, the old version, or complete — never torn.

Every write goes to a temporary name in the same folder, is fsynced, renamed over the target and the
folder fsynced, so a power cut at any instant leaves one whole version. Temporary names start with
``.tmp-`` so a later start can recognise and remove leftovers.

Checkpoint files are also hashed (``checksums.py``, for the manifest) as they are written, and made durable by a
helper thread (``Flusher``) while the next file is written, so a save runs at about the disk's speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from trainer.storage.checksums import new_digest

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


class HashingWriter:
    """A binary file wrapper that hashes (``checksums.ALGORITHM``) and counts what is written through it, so a checkpoint
    file's manifest entry costs no second read of the file.

    With ``hash_on_thread``, a large block is hashed on a helper thread while this one writes it (both
    release the GIL), so hashing adds next to nothing to the time of a write on a machine with a second
    core. A save running in the background beside training passes False: there the cores are training's,
    and one core's worth of saving costs it least."""

    def __init__(
        self, raw: IO[bytes], flusher: Flusher | None = None, *, hash_on_thread: bool = True
    ) -> None:
        self.raw, self.digest, self.size = raw, new_digest(), 0
        self.flusher = flusher
        self.hash_on_thread = hash_on_thread

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if not self.hash_on_thread or self.flusher is None or view.nbytes < HASH_ON_THREAD_BYTES:
            self.digest.update(view)
            written = self.raw.write(view)
        else:
            hashed = self.flusher.hasher.submit(self.digest.update, view)
            try:
                written = self.raw.write(view)
            finally:
                hashed.result()  # the block stays valid (and unchanged) until it is hashed
        self.size += view.nbytes
        if self.flusher is not None:
            self.flusher.written(self.raw, view.nbytes)
        return written

    def flush(self) -> None:
        self.raw.flush()

    def entry(self) -> tuple[int, str]:
        return self.size, self.digest.hexdigest()


HASH_ON_THREAD_BYTES = 1 << 20
"""Blocks from this size on are hashed on the helper thread; smaller ones cost less than the hand-over."""


class Flusher:
    """The helper threads of one save: files are made durable in the background, so that the disk flushes
    one file while the next one is serialised (the CPU and the disk work at the same time instead of in
    turn), and large blocks are hashed beside their write (``HashingWriter``).

    ``close(f)`` hands over a written file: a helper thread fsyncs and closes it. ``wait()`` returns once
    every file handed over is on disk and closed, and raises the first error (an fsync can fail: a full or
    lost network disk). Leaving the ``with`` block waits too, without raising, and ends the threads."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksum")
        """Hashes a large block while the writing thread writes it (threads start on first use)."""
        self._pending: list[Future[None]] = []
        self._unflushed = 0

    def written(self, f: IO[bytes], nbytes: int) -> None:
        """``nbytes`` more were written to ``f``: start the disk on them once enough have piled up (Linux:
        ``sync_file_range``, which returns at once; elsewhere an ``fdatasync`` on the helper thread)."""
        self._unflushed += nbytes
        if self._unflushed < WRITEBACK_BYTES:
            return
        self._unflushed = 0
        f.flush()
        if _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(f.fileno(), 0, 0, _SYNC_FILE_RANGE_WRITE)
        elif not self._pending or self._pending[-1].done():
            self._pending.append(self._thread.submit(os.fdatasync, f.fileno()))

    def close(self, f: IO[bytes]) -> None:
        f.flush()
        self._unflushed = 0
        self._pending.append(self._thread.submit(_fsync_and_close, f))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        errors = [e for e in (future.exception() for future in pending) if e is not None]
        if errors:
            raise errors[0]

    def __enter__(self) -> Flusher:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.wait()
        self._thread.shutdown(wait=True)
        self.hasher.shutdown(wait=True)


WRITEBACK_BYTES = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writing the dirty pages of the range, do not wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def _fsync_and_close(f: IO[bytes]) -> None:
    try:
        os.fsync(f.fileno())
    finally:
        f.close()


def write_file(
    path: Path, write: Callable[[Any], Any], flusher: Flusher, *, hash_on_thread: bool = True
) -> tuple[int, str]:
    """Write ``path`` through ``write(file)``, hashed as it goes (see ``HashingWriter``), and hand it to
    ``flusher`` to be made durable (the disk starts on it while it is being written). Returns its
    (bytes, checksum)."""
    f = create_new(path)  # closed by the flusher once it is on disk
    try:
        hashed = HashingWriter(f, flusher, hash_on_thread=hash_on_thread)
        write(hashed)
    except BaseException:
        f.close()
        raise
    flusher.close(f)
    return hashed.entry()


NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


def create_new(path: Path) -> IO[bytes]:
    """A new file at ``path``, for writing: whatever was there (a leftover, or a link planted at a name the
    tool uses) is removed first, never followed, and the file is created exclusively, so no write ever goes
    through a symbolic link."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise IsADirectoryError(errno.EISDIR, "a folder is in the way", str(path))
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | NO_FOLLOW, 0o666)
    return open(fd, "wb", buffering=0)


def append_to(path: Path) -> IO[str]:
    """``path`` opened to append text, refusing (``OSError``) a symbolic link or anything but a regular file."""
    fd = os.open(
        path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | NO_FOLLOW | os.O_NONBLOCK, 0o666
    )
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return open(fd, "a")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` for the block to write; when the block ends, the file takes ``path``'s
    place atomically and durably (readers see the old or the new file, never a part), or is removed if the
    block failed."""
    tmp = tmp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(
    path: Path,
    write: Callable[[Any], Any],
    *,
    hash_on_thread: bool = True,
    before_publish: Callable[[Path], None] | None = None,
) -> tuple[int, str]:
    """Write ``path`` through ``write(file)`` so that readers see the old or the new file, never a part.

    Returns the file's (bytes, checksum), computed as it was written (``hash_on_thread``: ``HashingWriter``).
    ``before_publish(path)`` runs once the data is written, before it takes the final name (a fault point)."""

    def write_all(f: Any) -> None:
        write(f)
        if before_publish is not None:
            before_publish(path)

    with replacing(path) as tmp, Flusher() as flusher:
        entry = write_file(tmp, write_all, flusher, hash_on_thread=hash_on_thread)
        flusher.wait()
    return entry


def atomic_write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_rename(src: Path, dst: Path) -> None:
    """Publish a fully written (and fsynced) file or folder under its final name, durably."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src``: a hard link where possible, else a copy; replaced atomically."""
    with replacing(dst) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # filesystems without hard links (some network/FAT mounts)
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


FICLONE = 0x40049409
"""Linux ioctl: make the destination share the source's blocks (btrfs, XFS, ...): a copy at no disk cost."""


def copy_file(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` that later changes to ``src`` never reach (a reflink where the file
    system has them, else a byte copy), replaced atomically and durably."""
    with replacing(dst) as tmp, open(src, "rb") as fin, create_new(tmp) as fout:
        try:
            import fcntl

            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        except (ImportError, OSError):  # no reflinks here: copy the bytes
            shutil.copyfileobj(fin, fout, 16 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def umask() -> int:
    """The process's file-creation mask, read without changing it (``os.umask`` sets it, which races with
    other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def make_read_only(paths: list[Path]) -> None:
    """Take the write permission away from committed files: nothing rewrites them in place, and a file
    linked elsewhere (``best.ckpt``, a LoRA run's stored base) then cannot be changed under it by mistake."""
    for path in paths:
        with contextlib.suppress(OSError):
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode):  # a link's target is not the tool's to change
                os.chmod(path, mode & ~0o222)


def remove_tmp_leftovers(folder: Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete temporary files/folders a crashed writer left directly inside ``folder`` (only those of the
    files ``names``, when given)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    prefixes = tuple(f"{TMP_PREFIX}{name}." for name in names) if names is not None else (TMP_PREFIX,)
    for entry in folder.iterdir():
        if entry.name.startswith(prefixes):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def delete_inside(path: Path, root: Path) -> None:
    """Delete a file or folder that lies inside ``root`` (a run folder); a link is removed itself, never
    what it points to. Anything else is refused with a RuntimeError: deletes never leave the run."""
    resolved_root = root.resolve()
    if path.is_symlink():  # the link itself lives in its parent folder
        inside = path.parent.resolve().is_relative_to(resolved_root)
    else:
        target = path.resolve()
        inside = target.is_relative_to(resolved_root) and target != resolved_root
    if not inside:
        raise RuntimeError(f"refusing to delete {path}: outside run folder {root}")
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)
