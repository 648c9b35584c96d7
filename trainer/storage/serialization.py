"""Writing tensors into a checkpoint file without building the file in memory first.

``safetensors.torch.save`` returns the whole file as one ``bytes`` object: a copy of every tensor, made before
a single byte reaches the disk. ``write_safetensors`` writes the same format (an 8-byte little-endian header
length, a JSON header of dtype, shape and byte offsets, then the tensors' bytes back to back) straight from
each tensor's memory into the file object, which is how checkpoint files are hashed as they are written.
Files it writes are read by ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import IO

import torch
from safetensors.torch import save as safetensors_bytes

from trainer.storage.tensor_files import SAFETENSORS_DTYPES


def write_safetensors(tensors: dict[str, torch.Tensor], f: IO[bytes]) -> None:
    """Write ``tensors`` to ``f`` as a safetensors file (no metadata), each tensor from its own memory (a
    dtype outside ``SAFETENSORS_DTYPES`` goes through the safetensors library: one in-memory copy)."""
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    if sys.byteorder != "little" or any(t.dtype not in SAFETENSORS_DTYPES for t in flat.values()):
        f.write(safetensors_bytes(flat))
        return
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name, t in flat.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors' bytes start 8-byte aligned, as the library's do
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for t in flat.values():
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
