"""Crash-safe file writes: a file is either absent, the old version, or complete — never torn.

Every write goes to a temporary name in the same folder, is fsynced, renamed over the target and the
folder fsynced, so a power cut at any instant leaves one whole version. Temporary names start with
``.tmp-`` so a later start can recognise and remove leftovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from trainer import faults

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
    """A binary file wrapper that hashes (sha256) and counts what is written through it, so a checkpoint
    file's manifest entry costs no second read of the file."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.digest.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def entry(self) -> tuple[int, str]:
        return self.size, self.digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Any], Any]) -> tuple[int, str]:
    """Write ``path`` through ``write(file)`` so that readers see the old or the new file, never a part.

    Returns the file's (bytes, sha256), computed as it was written."""
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            hashed = HashingWriter(f)
            write(hashed)
            faults.point("write", path=path)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return hashed.entry()


def atomic_write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_rename_dir(src: Path, dst: Path) -> None:
    """Publish a fully written folder under its final name."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src``: a hard link where possible, else a copy; replaced atomically."""
    tmp = tmp_path_for(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # filesystems without hard links (some network/FAT mounts)
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def remove_tmp_leftovers(folder: Path) -> list[Path]:
    """Delete temporary files/folders a crashed writer left directly inside ``folder``."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed
