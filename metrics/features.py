"""The networks whose features FID compares, each taking uint8 RGB images ``(N, 3, H, W)``.

- ``inception-v3``: the standard FID network, torch-fidelity's port of the TensorFlow Inception-v3 graph
  that the original FID code and NVIDIA's EDM use (2048 pool features; images resized to 299 inside). Its
  weights (~92 MB) are downloaded once into torch's hub cache; offline, the error says which file to put
  where. FIDs with it are comparable with published ones.
- ``standin``: a small fixed random convolutional network (64 features), built from a seed, with no
  download. For tests and offline smoke runs: its values rank runs of one dataset and are 0 for a set
  against itself, but are not comparable with published FIDs.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's Inception-v3 weights (``URL_INCEPTION_V3`` of its ``feature_extractor_inceptionv3``)."""


class FeatureWeightsUnavailable(RuntimeError):
    """A feature network's weights are neither cached nor downloadable; the message says where to put them."""


class FeatureNet(Protocol):
    name: str
    dim: int

    def __call__(self, images: Tensor) -> Tensor:
        """uint8 ``(N, 3, H, W)`` -> float32 ``(N, dim)``."""
        ...


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Images in [-1, 1] ``(N, C, H, W)`` as the uint8 RGB a PNG of them holds (EDM's rounding); one
    channel is repeated three times."""
    pixels = (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


# --------------------------------------------------------------------------------------------------
# Inception-v3 (torch-fidelity)
# --------------------------------------------------------------------------------------------------


def inception_weights_path() -> Path:
    """Where the Inception weights are looked for and downloaded to: torch's hub cache ($TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


class InceptionV3Features:
    name = "inception-v3"
    dim = 2048

    def __init__(self, device: torch.device | str = "cpu") -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights_path()
        if not path.is_file():
            _download(INCEPTION_URL, path)
        with _weights_only_loads():
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            )
        self.net = net.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        (features,) = self.net(images.to(self.device))
        return features.float()


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """torch-fidelity loads the weights file with ``weights_only=False``; inside this block torch loads
    tensors only whatever the call says (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), so the file cannot run code."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def _download(url: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise FeatureWeightsUnavailable(
            f"FID's Inception-v3 weights are not cached and could not be downloaded ({e}). On a machine with "
            f"internet access, download {url} and put the file at {path} (or set TORCH_HOME to a folder whose "
            "hub/checkpoints/ holds it); or pass --features standin for a smoke test"
        ) from None


# --------------------------------------------------------------------------------------------------
# The stand-in
# --------------------------------------------------------------------------------------------------


class StandInFeatures:
    """Two fixed random 3x3 convolutions (ReLU), then the mean and the spread of each channel over the image:
    64 features that respond to shapes and textures. The weights come from ``seed`` alone."""

    name = "standin"
    dim = 64

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = torch.randn(16, 3, 3, 3, generator=generator) / 27**0.5
        self.conv2 = torch.randn(32, 16, 3, 3, generator=generator) / 144**0.5
        self.conv1, self.conv2 = self.conv1.to(device), self.conv2.to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = (images.to(self.device).float() - 128) / 128  # (N, 3, H, W)
        x = torch.relu(nn.functional.conv2d(x, self.conv1, padding=1))
        x = torch.relu(nn.functional.conv2d(x, self.conv2, stride=2, padding=1))  # (N, 32, H/2, W/2)
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).float()  # (N, 64)


FEATURE_NETS: dict[str, Callable[[torch.device | str], FeatureNet]] = {
    "inception-v3": InceptionV3Features,
    "standin": StandInFeatures,
}


def feature_net(name: str, device: torch.device | str = "cpu") -> FeatureNet:
    if name not in FEATURE_NETS:
        raise ValueError(f"unknown feature network {name!r}; choose one of {', '.join(FEATURE_NETS)}")
    return FEATURE_NETS[name](device)
