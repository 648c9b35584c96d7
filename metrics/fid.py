"""Fréchet Inception Distance: Gaussian statistics of image features and the distance between two of them.

FID (Heusel et al. 2017) = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet distance between two
Gaussians fitted to the features of two image sets. Statistics are accumulated in float64 from batches of
features in a fixed order, so one set's statistics do not depend on how it was cut into batches beyond that
order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class FeatureStats:
    """Running mean and covariance of feature vectors (float64 sums of features and of their outer
    products)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features: Tensor) -> None:
        """Add a batch ``(N, dim)`` of features."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {tuple(features.shape)}")
        f = features.detach().to("cpu", torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError("features hold NaN or infinite values")
        self.count += f.shape[0]
        self.total += f.sum(dim=0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) as float64 arrays; the covariance is the unbiased one (``np.cov``'s), as pytorch-fid."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.numpy(), sigma.numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    positive semi-definite S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2. That needs only
    symmetric eigendecompositions, so it has no imaginary parts to discard and no singular case to patch
    (pytorch-fid's ``sqrtm`` route needs both), and it agrees with it where that route is well defined.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics of different shapes: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance matrix (negative rounding-error eigenvalues taken as 0)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T
