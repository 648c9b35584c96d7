"""Slices of the tensors of a checkpoint's tensor files, read back by key straight into the tensors that want
them, and the record of where each tensor lies that a checkpoint keeps for that (``layout_record``), so that a
resume parses no file's own header (a torch file's is a pickle: slow to read weights-only).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from trainer.storage.parts import read_into
from trainer.storage.tensor_files import SAFETENSORS_DTYPES, FileLayout, TensorSpec, read_layout


def layout_record(layout: FileLayout) -> dict[str, Any]:
    """Where a file's tensors lie, as JSON (``recorded_layout`` reads it back): a checkpoint records it, so
    that a resume reads slices without parsing the file's own header (the pickle of a torch file)."""
    tensors = {
        key: [offset, str(layout.specs[key].dtype).removeprefix("torch."), list(layout.specs[key].shape)]
        for key, offset in layout.offsets.items()
    }
    return {"size": layout.size, "tensors": tensors}


def recorded_layout(record: dict[str, Any]) -> FileLayout:
    """A ``layout_record`` read back; ``ValueError`` for one that is malformed."""
    names = {str(dtype).removeprefix("torch."): dtype for dtype in SAFETENSORS_DTYPES}
    try:
        offsets, specs = {}, {}
        for key, (offset, dtype, shape) in record["tensors"].items():
            specs[str(key)] = TensorSpec(names[dtype], tuple(int(n) for n in shape))
            offsets[str(key)] = int(offset)
        return FileLayout(int(record["size"]), offsets, specs)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError("its record of where the tensors lie is malformed") from None


class TensorFileReader:
    """Slices of the tensors of several files, by key, read straight into the tensors that want them.

    ``reader(key, start, dest)`` fills ``dest`` (any shape, dtype or device; row-major) with ``dest.numel()``
    elements of the stored tensor ``key``, flattened, from element ``start`` on: with one ``preadv`` into
    ``dest``'s own memory when it is a contiguous CPU tensor of the stored dtype, else through a buffer and a
    copy (a cast). A key that no file has, or a slice outside its tensor, is a ``KeyError``/``ValueError``."""

    def __init__(self, files: dict[Path, FileLayout | None]) -> None:
        """``files``: each file's layout, or None to read it from the file (``read_layout``)."""
        self._stack = ExitStack()
        self._where: dict[str, tuple[int, FileLayout]] = {}
        try:
            for path, known in files.items():
                layout = known if known is not None else read_layout(path)
                fd = self._stack.enter_context(open(path, "rb", buffering=0)).fileno()  # noqa: SIM115
                self._where.update(dict.fromkeys(layout.offsets, (fd, layout)))
        except BaseException:
            self._stack.close()
            raise

    def __call__(self, key: str, start: int, dest: torch.Tensor) -> None:
        fd, layout = self._where[key]
        spec = layout.specs[key]
        offset, _ = layout.span(key, start, dest.numel())
        if dest.dtype == spec.dtype and dest.is_contiguous() and dest.device.type == "cpu":
            read_into(fd, offset, dest)
            return
        staged = torch.empty(dest.numel(), dtype=spec.dtype)
        read_into(fd, offset, staged)
        dest.copy_(staged.view(dest.shape))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TensorFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
