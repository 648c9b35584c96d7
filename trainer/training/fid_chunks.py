"""The chunk engine of an evaluation: features of many images, computed on every process, gathered in order.

The work is cut into chunks of ``batch_size`` images, each a function of its index alone. Each round, every
rank computes one pending chunk and rank 0 gathers their features and adds them to float64 statistics in
chunk order, so the statistics are the same on any number of processes. With a folder, rank 0 keeps each
chunk's features in ``chunk_NNNNNN.safetensors``: a stopped evaluation continues from the chunks it had and
gives the same value. A chunk file counts only if it was made by the same job (``FidJob``: samples, batch
size, seed, feature network, and what the images come from), so a file of other weights or a crafted one
is computed again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from launch import Topology, decide_on_rank0
from metrics import FeatureNet, FeatureStats
from trainer.errors import UserError
from trainer.storage.atomic import atomic_write
from trainer.storage.paths import real_folder

MAX_CHUNK_BYTES = 64 << 20
"""A chunk file larger than this is not read (a chunk of 250 Inception features is 2 MB)."""


class EvaluationStopped(Exception):
    """The ranks agreed on a stop signal between two rounds of an evaluation."""

    def __init__(self, signal: int) -> None:
        super().__init__(f"stopped by signal {signal}")
        self.signal = signal


@dataclass(frozen=True)
class FidJob:
    """What chunk files must have been made by to be reused."""

    count: int
    batch_size: int
    seed: int
    features: str
    source: str
    """The weights' digest (samples), or the dataset's identity (reference statistics)."""

    @property
    def chunks(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def size(self, k: int) -> int:
        return min(self.batch_size, self.count - k * self.batch_size)


def chunked_stats(
    job: FidJob,
    images: Callable[[int], torch.Tensor],
    net: FeatureNet,
    topo: Topology,
    *,
    folder: Path | None = None,
    run: Path | None = None,
    should_stop: Callable[[int], int | None] | None = None,
    say: Callable[[str], None] | None = None,
) -> FeatureStats | None:
    """The statistics of the features of ``images(k)`` (uint8 RGB) for every chunk k of ``job``, on rank 0
    (None elsewhere). ``folder``: where chunk features are kept (inside ``run`` when given: no link is
    followed out of it). ``should_stop(round)``: a collective vote before each round; a signal raises
    ``EvaluationStopped`` on every rank. ``say``: rank 0's line when it continues from earlier chunks."""
    rank, world, comm = topo.rank, topo.world_size, topo.comm

    def finished() -> list[int]:  # rank 0's; a link where the folder should be is refused on every rank
        if folder is None:
            return []
        if run is not None:
            real_folder(folder, run)
        else:
            plain_folder(folder)
        return [k for k in range(job.chunks) if _read_chunk(folder, job, k, net.dim) is not None]

    done: list[int] = decide_on_rank0(comm, topo.is_main, finished, errors=(UserError,),
                                      what="which chunks of the evaluation are done")  # fmt: skip
    if done and say is not None and topo.is_main:
        say(f"Continuing the evaluation from {len(done)} of {job.chunks} chunks in {folder}")
    pending = [k for k in range(job.chunks) if k not in set(done)]
    stats = FeatureStats(net.dim) if topo.is_main else None
    added, held = 0, {}  # chunks added to the statistics so far; gathered ones waiting for their turn
    for first in range(0, len(pending), world):
        signal = should_stop(first // world) if should_stop is not None else None
        if signal is not None:
            raise EvaluationStopped(signal)
        mine = pending[first + rank] if first + rank < len(pending) else None
        features = net(images(mine)).cpu() if mine is not None else None
        gathered = comm.all_gather((mine, features), what="the features of a round of the evaluation")
        if stats is None:
            continue
        for k, f in gathered:
            if k is not None:
                held[k] = f
                if folder is not None:
                    _write_chunk(folder, job, k, f)
        added = _add_in_order(stats, held, added, job, folder, net.dim)
    if stats is not None:
        added = _add_in_order(stats, held, added, job, folder, net.dim)
        if added != job.chunks:  # a chunk file vanished or changed while the evaluation ran
            raise RuntimeError(f"chunk {added} of the evaluation in {folder} is no longer readable")
    return stats


def _add_in_order(stats: FeatureStats, held: dict[int, torch.Tensor], added: int, job: FidJob,
                  folder: Path | None, dim: int) -> int:  # fmt: skip
    """Add the chunks from ``added`` on while the next one is at hand (just gathered, or on disk)."""
    while added < job.chunks:
        features = held.pop(added, None)
        if features is None and folder is not None:
            features = _read_chunk(folder, job, added, dim)
        if features is None:
            break
        stats.add(features)
        added += 1
    return added


def _chunk_file(folder: Path, k: int) -> Path:
    return folder / f"chunk_{k:06d}.safetensors"


def _write_chunk(folder: Path, job: FidJob, k: int, features: torch.Tensor) -> None:
    data = save_safetensors({"features": features.contiguous()}, metadata={"job": json.dumps(asdict(job)),
                                                                          "chunk": str(k)})  # fmt: skip
    atomic_write(_chunk_file(folder, k), lambda f: f.write(data), hash_on_thread=False)


def _read_chunk(folder: Path, job: FidJob, k: int, dim: int) -> torch.Tensor | None:
    """Chunk k's features if its file is a regular file of this job with the right shape; else None."""
    path = _chunk_file(folder, k)
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_CHUNK_BYTES:
            return None
        data = path.read_bytes()
        tensors = load_safetensors(data)
        header = _header(data)
    except (OSError, SafetensorError, ValueError, RuntimeError):
        return None
    features = tensors.get("features")
    if (
        header.get("job") != json.dumps(asdict(job))
        or header.get("chunk") != str(k)
        or set(tensors) != {"features"}
        or features is None
        or features.dtype != torch.float32
        or tuple(features.shape) != (job.size(k), dim)
        or not torch.isfinite(features).all()
    ):
        return None
    return features


def _header(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file's bytes."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def plain_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
