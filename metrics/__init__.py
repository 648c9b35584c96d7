"""Sample-quality metrics: FID from image features (``fid.py``) and the networks that compute them
(``features.py``). Imports nothing of ``trainer``: what to sample and where files go is the caller's."""

from metrics.features import FEATURE_NETS, FeatureNet, FeatureWeightsUnavailable, feature_net, to_uint8_rgb
from metrics.fid import FeatureStats, frechet_distance

__all__ = [
    "FEATURE_NETS",
    "FeatureNet",
    "FeatureStats",
    "FeatureWeightsUnavailable",
    "feature_net",
    "frechet_distance",
    "to_uint8_rgb",
]
