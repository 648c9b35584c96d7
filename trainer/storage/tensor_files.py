"""Tensor files that several processes write side by side: where each tensor's bytes lie in the file.

A checkpoint's large files hold full tensors by name. Each process writes the pieces of them it holds
straight into the file, at their places (no process gathers another's tensors), so the file's layout must be
known before a byte of it is written:

  ``torch_file_layout``        a ``torch.save`` file (PyTorch's zip format, what ``torch.load`` reads). The
                               layout is ``torch.save``'s own: the object is saved with ``skip_data`` into a
                               recorder, which keeps the bytes torch writes (records' headers, the pickle,
                               the zip directory) and notes the holes it leaves for the tensors' data, one
                               per tensor in the order it pickles them (or, should that order ever change,
                               the holes' offsets are read back as ``torch.load`` itself finds them).
  ``safetensors_layout``       a safetensors file: an 8-byte header length, a JSON header of dtype, shape and
                               byte offsets, then the tensors back to back.
  ``read_layout``              the same offsets found in a file on disk (``tensor_reader.py`` reads slices back).

Whatever a layout lists outside its tensors (``FileLayout.header``) is written by one process; the tensors'
bytes by whoever holds them. Neither format is padded with bytes nobody writes: the header pieces and the
tensors' bytes tile the file.

Files of both formats carry no checksum of their own that would need the whole tensor to compute (the zip's
CRC-32 fields of tensor records are 0, as with ``torch.serialization.set_crc32_options(False)``; ``torch.load``
does not check them): the checkpoint's manifest checks every byte instead (``manifest.py``).
"""

from __future__ import annotations

import bisect
import io
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SAFETENSORS_NAMES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20
"""A safetensors header longer than this is refused (the library's own limit): a damaged length field must
not make a reader allocate gigabytes."""


@dataclass(frozen=True)
class TensorSpec:
    """What a file holds for one tensor: its dtype and shape (the bytes are contiguous, row-major)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tensor.dtype, tuple(tensor.shape))


@dataclass
class FileLayout:
    """Where everything of one tensor file lies."""

    size: int
    """The file's length in bytes."""
    offsets: dict[str, int]
    """Tensor key → byte offset of its first element."""
    specs: dict[str, TensorSpec]
    header: list[tuple[int, bytes]] = field(default_factory=list)
    """Everything that is not a tensor's bytes, as (offset, bytes), ascending and merged where adjacent."""

    def span(self, key: str, start: int, numel: int) -> tuple[int, int]:
        """(byte offset, byte length) of elements ``start .. start + numel`` of tensor ``key``."""
        spec = self.specs[key]
        if start < 0 or numel < 0 or start + numel > spec.numel:
            raise ValueError(f"elements {start}..{start + numel} are outside {key} ({spec.numel} elements)")
        return self.offsets[key] + start * spec.itemsize, numel * spec.itemsize


# --------------------------------------------------------------------------------------------------
# torch.save files
# --------------------------------------------------------------------------------------------------


def torch_file_layout(obj: dict[str, Any]) -> FileLayout:
    """The layout of ``torch.save(obj)`` where the ``TensorSpec`` leaves of ``obj`` (in nested dicts, keyed by
    their path joined with ``/``) stand for tensors of that dtype and shape, each with a storage of its own."""
    specs: dict[str, TensorSpec] = {}
    placeholder = _with_placeholders(obj, "", specs)
    recorder = _Recorder()
    with torch.serialization.skip_data():
        torch.save(placeholder, recorder)  # type: ignore[arg-type]
    del placeholder
    header = _merged(recorder.pieces)
    offsets = _holes_in_order(specs, recorder.holes)
    if offsets is None:  # not torch.save's usual order: ask torch.load where each tensor's bytes are
        loaded = torch.load(io.BufferedReader(_SparseReader(header, recorder.size)), map_location="meta",
                            weights_only=True)  # fmt: skip
        offsets = _storage_offsets(loaded, "", specs)
    return FileLayout(recorder.size, offsets, specs, header)


def _holes_in_order(specs: dict[str, TensorSpec], holes: list[tuple[int, int]]) -> dict[str, int] | None:
    """The holes torch.save left, matched to the tensors in the order it pickled them (the order of ``obj``:
    each tensor's storage gets the next record, and an empty one none), or None when the sizes disagree."""
    offsets, remaining = {}, iter(holes)
    for key, spec in specs.items():
        if spec.nbytes == 0:
            offsets[key] = 0
            continue
        hole = next(remaining, None)
        if hole is None or hole[1] != spec.nbytes:
            return None
        offsets[key] = hole[0]
    return offsets if next(remaining, None) is None else None


def _with_placeholders(obj: Any, path: str, specs: dict[str, TensorSpec]) -> Any:
    if isinstance(obj, TensorSpec):
        specs[path] = obj
        # Never touched: its pages are not even allocated (torch.save skips the data).
        return torch.empty(obj.shape, dtype=obj.dtype)
    if isinstance(obj, dict):
        return {k: _with_placeholders(v, f"{path}/{k}" if path else str(k), specs) for k, v in obj.items()}
    return obj


def _offset_of(tensor: torch.Tensor) -> int:
    """Where the first element of a tensor loaded with ``map_location="meta"`` lies in its file."""
    storage_offset: Any = tensor.untyped_storage()._checkpoint_offset
    return int(storage_offset) + int(tensor.storage_offset()) * tensor.element_size()


def _storage_offsets(obj: Any, path: str, specs: dict[str, TensorSpec]) -> dict[str, int]:
    if path in specs:
        return {path: _offset_of(obj)}
    if isinstance(obj, dict):
        found: dict[str, int] = {}
        for k, v in obj.items():
            found.update(_storage_offsets(v, f"{path}/{k}" if path else str(k), specs))
        return found
    return {}


class _Recorder:
    """A write-only file for ``torch.save``: keeps what is written, skips (and records) what is seeked over."""

    def __init__(self) -> None:
        self.pos, self.size = 0, 0
        self.pieces: list[tuple[int, bytes]] = []
        self.holes: list[tuple[int, int]] = []
        """(offset, bytes) of each region seeked over: the records' data, in order."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        data = bytes(data)
        self.pieces.append((self.pos, data))
        self.pos += len(data)
        self.size = max(self.size, self.pos)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1 and offset > 0:
            self.holes.append((self.pos, offset))
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        self.size = max(self.size, self.pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


class _SparseReader(io.RawIOBase):
    """A recorded file read back, holes as zeros, without ever holding the holes in memory."""

    def __init__(self, pieces: list[tuple[int, bytes]], size: int) -> None:
        self.pieces, self.size, self.pos = pieces, size, 0  # pieces: ascending, not overlapping
        self._starts = [offset for offset, _ in pieces]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        view = memoryview(buffer).cast("B")[:n]
        view[:] = bytes(n)
        first = max(0, bisect.bisect_right(self._starts, self.pos) - 1)
        for offset, data in self.pieces[first:]:
            if offset >= self.pos + n:
                break
            lo, hi = max(offset, self.pos), min(offset + len(data), self.pos + n)
            if lo < hi:
                view[lo - self.pos : hi - self.pos] = data[lo - offset : hi - offset]
        self.pos += n
        return n


def _merged(pieces: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Pieces in offset order, adjacent ones joined."""
    out: list[tuple[int, bytearray]] = []
    for offset, data in sorted(pieces, key=lambda p: p[0]):
        if out and out[-1][0] + len(out[-1][1]) == offset:
            out[-1][1].extend(data)
        else:
            out.append((offset, bytearray(data)))
    return [(offset, bytes(data)) for offset, data in out]


# --------------------------------------------------------------------------------------------------
# safetensors files
# --------------------------------------------------------------------------------------------------


def safetensors_layout(specs: dict[str, TensorSpec]) -> FileLayout:
    """The layout of a safetensors file of ``specs`` (in this order, no metadata)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not")
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for key, spec in specs.items():
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: safetensors has no dtype {spec.dtype}")
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors' bytes start 8-byte aligned, as the library's do
    start = 8 + len(encoded)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    offsets = {key: start + int(entry["data_offsets"][0]) for key, entry in header.items()}  # type: ignore[index]
    return FileLayout(start + offset, offsets, dict(specs), [(0, prefix)])


# --------------------------------------------------------------------------------------------------
# Reading a layout back
# --------------------------------------------------------------------------------------------------


def read_layout(path: Path) -> FileLayout:
    """The tensors of a torch.save or safetensors file on disk, where they lie (no data is read). Raises
    ``ValueError`` for a file that is neither, or whose tensors are not laid out one after another."""
    with open(path, "rb") as f:
        magic = f.read(4)
        size = f.seek(0, 2)
        if magic == b"PK\x03\x04":
            return _torch_layout_of(path, size)
        f.seek(0)
        return _safetensors_layout_of(f, size)


def _torch_layout_of(path: Path, size: int) -> FileLayout:
    try:
        loaded = torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path.name} is not a readable torch file ({type(e).__name__})") from None
    specs: dict[str, TensorSpec] = {}
    offsets: dict[str, int] = {}
    _collect(loaded, "", specs, offsets)
    return FileLayout(size, offsets, specs)


def _collect(obj: Any, path: str, specs: dict[str, TensorSpec], offsets: dict[str, int]) -> None:
    if isinstance(obj, torch.Tensor):
        if not obj.is_contiguous():
            raise ValueError(f"{path} is not stored contiguously")
        specs[path] = TensorSpec.of(obj)
        offsets[path] = _offset_of(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _collect(v, f"{path}/{k}" if path else str(k), specs, offsets)


def _safetensors_layout_of(f: IO[bytes], size: int) -> FileLayout:
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("too short for a safetensors file")
    (length,) = struct.unpack("<Q", head)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"safetensors header of {length} bytes in a file of {size}")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its safetensors header is not a JSON object")
    specs: dict[str, TensorSpec] = {}
    offsets: dict[str, int] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_NAMES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"its safetensors header entry {key!r} is malformed") from None
        spec = TensorSpec(dtype, shape)
        if min(shape, default=0) < 0 or end - begin != spec.nbytes or 8 + length + end > size or begin < 0:
            raise ValueError(f"its safetensors header entry {key!r} does not fit the file")
        specs[key], offsets[key] = spec, 8 + length + begin
    return FileLayout(size, offsets, specs)
