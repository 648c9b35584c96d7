"""FID of a model's EMA weights against its dataset's training split, on every process of a launch.

Samples are drawn in chunks (``fid_chunks.py``: every rank its share, gathered in order, resumable). Chunk
k's samples come from noise seeded by (seed, k) and, for a class-conditional model, the labels
``i mod classes`` of their indices i, so no image depends on the number of processes or on which one draws
it; a chunk file is reused only for the same weights (their digest is part of the job).

The reference statistics of a dataset's training split are computed once, the same way, and cached beside
the data (``<data.root>/fid_refs/``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from data import DatasetSplits
from launch import Topology, agree_on_signal
from metrics import (
    FeatureNet,
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
from trainer.training.fid_chunks import MAX_CHUNK_BYTES, FidJob, chunked_stats, plain_folder

SEED_SALT = 0x5EED_F1D
"""Sets the samples' noise apart from the training noise of the same seed."""


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
            plain_folder(path.parent) / path.name, lambda f: f.write(data_bytes), hash_on_thread=False
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
