"""The sample-quality benchmark's judge: the digit classifier is trustworthy, and samples reach it in the
same form as the real digits it was fitted on (16x16 in [-1, 1] pooled back to 8x8 on 0..16)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from data import load_dataset

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_quality.py"
_spec = importlib.util.spec_from_file_location("sample_quality", _PATH)
assert _spec is not None and _spec.loader is not None
sample_quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_quality)


def test_features_map_image_range_onto_the_originals_range():
    images = torch.stack([torch.full((1, 16, 16), -1.0), torch.full((1, 16, 16), 1.0)])
    features = sample_quality.to_digit_features(images)
    assert features.shape == (2, 64)
    assert (features[0] == 0).all() and (features[1] == 16).all()


def test_classifier_recognises_real_digits_in_the_form_samples_take():
    classifier, held_out = sample_quality.fit_digit_classifier()
    assert held_out > 0.97
    splits = load_dataset(
        name="Digits", source="digits", root="datasets", classes=None, superclasses=None,
        image_size=None, val_fraction=0.1, download=False, seed=0,
    )  # fmt: skip
    assert splits.val is not None
    images, labels = splits.val.batch(torch.arange(len(splits.val)))  # the trainer's 16x16 in [-1, 1]
    assert classifier.score(sample_quality.to_digit_features(images), labels.numpy()) > 0.97
