"""FID of a model's EMA weights against its dataset's training split, on every process of a launch.

The work is cut into chunks of ``batch_size`` images. Chunk k's samples come from noise seeded by
(seed, k) and, for a class-conditional model, the labels ``i mod classes`` of their indices i, so no image
depends on the number of processes or on which one draws it. Each round, every rank draws one pending chunk
and rank 0 gathers their features. Rank 0 adds the chunks to the statistics in chunk order (float64), so the
statistics are the same on any number of processes, and with a folder it keeps each chunk's features in
``chunk_NNNNNN.safetensors``: a stopped evaluation continues from the chunks it had, and gives the same
value. A chunk file counts only if it was made by the same job (samples, seed, batch size, feature
network, and a digest of the weights), so a file of other weights or a crafted one is drawn again.

The reference statistics of a dataset's training split are computed once, the same way, and cached beside
the data (``<data.root>/fid_refs/``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from data import DatasetSplits
from launch import Topology, agree_on_signal, decide_on_rank0
from metrics import (
    FeatureNet,
    FeatureStats,
    FeatureWeightsUnavailable,
    feature_net,
    frechet_distance,
    to_uint8_rgb,
)
from model import EDMSchedule, edm_sample
from model.lora import base_diffit
from trainer.checkpoint.folder import epoch_tag
from trainer.config.schema import DataConfig, TrainConfig
from trainer.errors import UserError
from trainer.faults import Faults
from trainer.runs.layout import RunLayout
from trainer.storage.atomic import atomic_write, delete_inside
from trainer.storage.checksums import new_digest
from trainer.storage.paths import real_folder

MAX_CHUNK_BYTES = 64 << 20
"""A chunk file larger than this is not read (a chunk of 250 Inception features is 2 MB)."""
SEED_SALT = 0x5EED_F1D
"""Sets the samples' noise apart from the training noise of the same seed."""


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


def load_feature_net(name: str, topo: Topology) -> FeatureNet:
    """The feature network on this rank's device, loaded by rank 0 first (it downloads the weights when
    they are not cached), then by the others. Weights that are not at hand are a ``UserError`` on every
    rank, before anything is sampled."""

    def load() -> FeatureNet:
        try:
            return feature_net(name, topo.device)
        except FeatureWeightsUnavailable as e:
            raise UserError(str(e)) from None

    net, error = None, None
    if topo.is_main:
        try:
            net = load()
        except UserError as e:
            error = e
    error = topo.comm.broadcast(error, what="whether the FID feature network loaded")
    if error is not None:
        raise error
    return net if net is not None else load()


# --------------------------------------------------------------------------------------------------
# Chunks on every rank, statistics on rank 0
# --------------------------------------------------------------------------------------------------


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
            _plain_folder(folder)
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


def _plain_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------------------------------
# Samples of a model, and the reference statistics of its data
# --------------------------------------------------------------------------------------------------


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A checksum of a state dict's names and values: which weights a chunk's samples came from."""
    digest = new_digest()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return str(digest.hexdigest())


def sample_chunks(model: torch.nn.Module, config: TrainConfig, job: FidJob,
                  device: torch.device) -> Callable[[int], torch.Tensor]:  # fmt: skip
    """Chunk k's samples of ``job`` as uint8 RGB: EDM's Heun sampler from the config's schedule, no
    guidance; noise from (seed, k), labels cycling through the classes of a conditional model."""
    net = base_diffit(model)
    edm = config.edm
    schedule = EDMSchedule(edm.num_steps, edm.sigma_min, edm.sigma_max, edm.rho)
    shape = (net.in_channels, net.image_size, net.image_size)
    model.eval()

    def images(k: int) -> torch.Tensor:
        n, start = job.size(k), k * job.batch_size
        generator = torch.Generator().manual_seed((job.seed * 1_000_003 + k) ^ SEED_SALT)
        noise = torch.randn((n, *shape), generator=generator)
        labels = torch.arange(start, start + n) % net.num_classes if net.num_classes else None
        with torch.no_grad():
            samples = edm_sample(model, noise.to(device), labels.to(device) if labels is not None else None,
                                 num_classes=net.num_classes, schedule=schedule)  # fmt: skip
        return to_uint8_rgb(samples.cpu())

    return images


def reference_file(data: DataConfig, features: str, image_size: int) -> Path:
    """Where a dataset's training-split statistics are cached: ``<root>/fid_refs/``, named by the dataset,
    its class filter, the image size and the feature network."""
    subset = ""
    if data.classes or data.superclasses:
        key = json.dumps([sorted(data.classes or []), sorted(data.superclasses or [])]).encode()
        digest = new_digest()
        digest.update(key)
        subset = f"-subset{str(digest.hexdigest())[:10]}"
    name = f"{data.source}{subset}-train-{image_size}px-{features}.safetensors"
    return Path(data.root) / "fid_refs" / name


def reference_stats(data: DataConfig, splits: DatasetSplits, net: FeatureNet, topo: Topology,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """(mu, sigma) of the training split's features on rank 0 (None elsewhere): from the cache, else
    computed on every rank and cached by rank 0."""
    path = reference_file(data, net.name, splits.image_size)
    cached = _read_reference(path, net.dim) if topo.is_main else None
    if topo.comm.broadcast(cached is not None, what="whether the FID reference statistics are cached"):
        return cached
    train = splits.train
    job = FidJob(len(train), batch_size, 0, net.name, path.name)
    if topo.is_main:
        print(
            f"Computing the FID reference statistics of {len(train)} training images into {path}", flush=True
        )

    def images(k: int) -> torch.Tensor:
        start = k * batch_size
        return to_uint8_rgb(train.images[start : start + job.size(k)].float() / 127.5 - 1)

    stats = chunked_stats(job, images, net, topo)
    if stats is None:
        return None
    mu, sigma = stats.mean_cov()
    tensors = {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma),
               "count": torch.tensor([stats.count])}  # fmt: skip
    data_bytes = save_safetensors(tensors, metadata={"features": net.name})
    try:
        atomic_write(
            _plain_folder(path.parent) / path.name, lambda f: f.write(data_bytes), hash_on_thread=False
        )
    except OSError as e:  # the statistics are still good: only the next evaluation computes them again
        print(
            f"warning: could not cache the FID reference statistics in {path}: {e.strerror or e}", flush=True
        )
    return mu, sigma


def _read_reference(path: Path, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached statistics if ``path`` holds well-formed ones, else None (they are then computed again)."""
    try:
        if not path.is_file() or path.stat().st_size > 4 * MAX_CHUNK_BYTES:
            return None
        tensors = load_safetensors(path.read_bytes())
    except (OSError, SafetensorError, ValueError, RuntimeError):
        return None
    mu, sigma = tensors.get("mu"), tensors.get("sigma")
    if (
        mu is None
        or sigma is None
        or tuple(mu.shape) != (dim,)
        or tuple(sigma.shape) != (dim, dim)
        or mu.dtype != torch.float64
        or sigma.dtype != torch.float64
        or not (torch.isfinite(mu).all() and torch.isfinite(sigma).all())
    ):
        return None
    return mu.numpy(), sigma.numpy()


# --------------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------------


def evaluate_fid(
    model: torch.nn.Module,
    config: TrainConfig,
    splits: DatasetSplits,
    net: FeatureNet,
    topo: Topology,
    *,
    num_samples: int,
    batch_size: int,
    folder: Path,
    run: Path,
    weights: dict[str, torch.Tensor],
    should_stop: Callable[[int], int | None] | None = None,
    say: Callable[[str], None] | None = None,
) -> float:
    """FID of ``model`` (holding ``weights``) against its data's training split, on every rank (rank 0
    computes it, the others receive it). Chunk files are kept in ``folder`` inside ``run`` until the value
    is known, then removed."""
    reference = reference_stats(config.data, splits, net, topo, batch_size)
    job = FidJob(num_samples, batch_size, config.seed, net.name, weights_digest(weights))
    images = sample_chunks(model, config, job, topo.device)
    stats = chunked_stats(job, images, net, topo, folder=folder, run=run, should_stop=should_stop, say=say)
    value = None
    if stats is not None and reference is not None:
        value = frechet_distance(*stats.mean_cov(), *reference)
        delete_inside(folder, run)
        with contextlib.suppress(OSError):  # evaluations/, once no other evaluation keeps files there
            folder.parent.rmdir()
    return float(topo.comm.broadcast(value, what="the FID"))


class EpochFids:
    """The FIDs of a training run: at which epochs, and each one with a stop vote before every round (as
    validation's before every batch), so a signal ends it on every rank together, between two rounds."""

    def __init__(self, config: TrainConfig, topo: Topology, splits: DatasetSplits, layout: RunLayout,
                 faults: Faults) -> None:  # fmt: skip
        self.config, self.topo, self.splits, self.layout, self.faults = config, topo, splits, layout, faults
        every = config.evaluation.fid_every_n_epochs
        self.features = load_feature_net(config.evaluation.fid_features, topo) if every else None

    def due(self, epoch: int) -> bool:
        every = self.config.evaluation.fid_every_n_epochs
        return bool(every) and (epoch % every == 0 or epoch == self.config.epochs)

    def measure(self, epoch: int, model: torch.nn.Module, weights: dict[str, torch.Tensor], *,
                stop_signal: Callable[[], int | None], say: Callable[[str], None]) -> float:  # fmt: skip
        """FID of ``model`` (holding ``weights``) at the end of epoch ``epoch``; ``EvaluationStopped`` when
        the ranks agree on a stop signal."""
        cfg, topo = self.config.evaluation, self.topo
        assert self.features is not None, "FIDs are off in this run's config"

        def should_stop(round_: int) -> int | None:
            self.faults.point("fid", epoch=epoch, round=round_)
            signal, _ = agree_on_signal(topo.comm, topo.rank, topo.world_size, stop_signal(),
                                        what=f"the stop vote in epoch {epoch}'s FID")  # fmt: skip
            return signal

        folder = self.layout.fid_scratch(epoch_tag(epoch), cfg.fid_num_samples, cfg.fid_features)
        return evaluate_fid(model, self.config, self.splits, self.features, topo, num_samples=cfg.fid_num_samples,
                            batch_size=cfg.fid_batch_size, folder=folder, run=self.layout.path, weights=weights,
                            should_stop=should_stop, say=say)  # fmt: skip
