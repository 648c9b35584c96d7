"""A process's part of a file that several processes write, hashed as it goes out and read back to be checked.

The large files of a checkpoint are written side by side: each process writes the bytes it holds at their
places (``tensor_files.py`` says where), no two processes the same byte. What one process wrote is its
*part*: a list of byte ranges and one checksum (``checksums.ALGORITHM``) of their bytes in file order. The
manifest records every part of such a file, and the parts of a file tile it, so a reader checks every byte
by hashing each part's ranges, and a process that reads back exactly its own part (a resume on the same
processes) checks what it loads with nothing read twice from disk.

Writes go through the save's ``Flusher`` (``atomic.py``): the disk starts on the bytes while more are
written, and the file is fsynced once, on the Flusher's thread, while the next file is written.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.storage.atomic import HASH_ON_THREAD_BYTES, Flusher
from trainer.storage.checksums import ALGORITHM, new_digest

Block = tuple[int, Any]
"""(byte offset, bytes-like or CPU tensor) of something to write."""
_MAX_IO = 1 << 30
"""Bytes per read or write call (Linux moves at most ~2 GiB per call)."""


@dataclass
class Part:
    """What one process wrote of a file: ``ranges`` (offset, length), ascending, and their checksum."""

    rank: int
    ranges: list[tuple[int, int]]
    digest: str
    algorithm: str = ALGORITHM

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.ranges)

    def entry(self) -> dict[str, Any]:
        """The part as a manifest records it."""
        return {"rank": self.rank, "ranges": [list(r) for r in self.ranges], self.algorithm: self.digest}


def as_bytes(data: Any) -> memoryview:
    """The raw bytes of a bytes-like object or of a contiguous CPU tensor, without a copy."""
    if isinstance(data, torch.Tensor):
        flat = data.detach().reshape(-1)
        if not flat.is_contiguous() or flat.device.type != "cpu":
            raise ValueError("only contiguous CPU tensors are written as they are")
        return memoryview(flat.view(torch.uint8).numpy()).cast("B") if flat.numel() else memoryview(b"")  # type: ignore[arg-type]
    return memoryview(data).cast("B")


def write_part(
    path: Path, blocks: Sequence[Block], flusher: Flusher, *, rank: int, hash_on_thread: bool = True
) -> Part:
    """Write ``blocks`` into ``path`` at their offsets (creating the file if no other process has yet; never
    truncating it, never through a symbolic link) and hand the file to ``flusher``. With ``hash_on_thread``
    the blocks are hashed on the flusher's hashing thread while they are written (both release the GIL);
    a background save passes False, to keep to one core (and blocks under ``HASH_ON_THREAD_BYTES`` are
    hashed here either way: handing them over costs more). Returns the part written."""
    placed = ((offset, as_bytes(data)) for offset, data in blocks)
    ordered = sorted(((offset, view) for offset, view in placed if view.nbytes), key=lambda b: b[0])
    for (a, first), (b, _) in itertools.pairwise(ordered):
        if a + first.nbytes > b:
            raise ValueError(f"blocks at {a} and {b} of {path.name} overlap")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    f = open(os.open(path, flags, 0o666), "wb", buffering=0)  # noqa: SIM115 (closed by the flusher)
    digest, hashed = new_digest(), []
    try:
        for offset, view in ordered:
            if hash_on_thread and view.nbytes >= HASH_ON_THREAD_BYTES:  # one hashing thread: in order
                hashed.append(flusher.hasher.submit(digest.update, view))
            else:
                if hashed:  # the blocks before it first
                    hashed[-1].result()
                digest.update(view)
            _pwrite_all(f.fileno(), view, offset)
            flusher.written(f, view.nbytes)
        for future in hashed:
            future.result()
    except BaseException:
        for future in hashed:
            future.cancel()
        f.close()
        raise
    flusher.close(f)
    return Part(rank, merge_ranges([(offset, view.nbytes) for offset, view in ordered]), digest.hexdigest())


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done : done + _MAX_IO], offset + done)


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges in offset order, adjacent ones joined, empty ones dropped."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if length <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


# --------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------


def read_into(fd: int, offset: int, dest: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor ``dest`` with the bytes of ``fd`` from ``offset`` (straight into its
    memory: no buffer in between). Raises ``EOFError`` when the file ends first."""
    view = as_bytes(dest)
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done : done + _MAX_IO]], offset + done)
        if n <= 0:
            raise EOFError(f"the file ends at {offset + done}, {view.nbytes - done} bytes short")
        done += n
