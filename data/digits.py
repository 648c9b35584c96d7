"""scikit-learn's handwritten digits: a real dataset that needs no download.

`sklearn.datasets.load_digits()` ships with scikit-learn: 1,797 grey 8x8 images of the digits 0-9 with
values 0..16. We scale them to 0..255 and upscale to 16x16 (or `image_size`), which is enough for a small
DiffiT to learn recognisable digits in minutes on a CPU, so every feature can be tried offline.

The validation split is stratified and fixed: the same images are held out on every run, whatever the
training seed, so validation losses from different runs are comparable.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data.images import (
    DatasetError,
    DatasetSplits,
    ImageDataset,
    check_image_size,
    filter_and_remap,
    resize_images,
    select_classes,
)

NATIVE_SIZE = 16  # the 8x8 originals are upscaled 2x: 8x8 is too small for a patch-based transformer
DIGIT_NAMES = [str(d) for d in range(10)]

# Seeds the validation split. Deliberately a constant and not the training seed: the held-out images must
# be the same for every run, or val losses of two runs would be measured on different images.
_SPLIT_SEED = 20240229


def _load_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float images on the 0..255 scale (N, 1, 8, 8) and int64 labels (N,).

    Read straight from the CSV that scikit-learn ships (what its ``load_digits`` reads: 64 pixel values and
    the label per row), found without importing scikit-learn, which costs a second per process.
    """
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the digits dataset ships with scikit-learn: pip install scikit-learn")
    csv = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(csv, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(data[:, :-1].reshape(-1, 1, 8, 8).copy()) * (255.0 / 16.0)
    labels = torch.from_numpy(data[:, -1].astype(np.int64))
    return images, labels


def stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (train, val): round(val_fraction * n) random images of each class go to val.

    Deterministic for a given seed and labels. Both index tensors are sorted, so the datasets keep the
    original image order.
    """
    generator = torch.Generator().manual_seed(seed)
    val_parts = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        n_val = round(val_fraction * len(members))
        val_parts.append(members[torch.randperm(len(members), generator=generator)[:n_val]])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    if val_parts:
        is_val[torch.cat(val_parts)] = True
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def load_digits(
    *,
    name: str,
    classes: list[str] | None,
    superclasses: list[str] | None,
    image_size: int | None,
    val_fraction: float,
) -> DatasetSplits:
    """Load the digits, optionally keep only some classes ("0".."9"), and hold out a fixed val split.

    classes: digit names to keep (None or [] keeps all ten); labels are renumbered 0..k-1 in digit order.
    image_size: None means 16. val_fraction: in [0, 1); 0 gives no validation set (val=None).
    Raises DatasetError for superclasses (digits have none), unknown class names or a bad val_fraction.
    """
    check_image_size(image_size)
    if superclasses:
        raise DatasetError(
            "The digits dataset has no superclasses; set data.superclasses to null "
            "(use data.classes, e.g. ['0', '1', '2', '3', '4'], to pick digits)."
        )
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"data.val_fraction must be in [0, 1) for digits, got {val_fraction!r}.")
    keep = sorted(select_classes("digits", DIGIT_NAMES, classes)) or list(range(len(DIGIT_NAMES)))

    size = image_size or NATIVE_SIZE
    raw_images, raw_labels = _load_raw()
    # Resize from the float originals, so the 0..16 -> 0..255 scaling is rounded only once.
    full = filter_and_remap(resize_images(raw_images, size), raw_labels, keep, DIGIT_NAMES)

    # Split after filtering, so each kept class loses the same fraction to validation.
    train_idx, val_idx = stratified_split(full.labels, val_fraction, _SPLIT_SEED)
    train = ImageDataset(full.images[train_idx], full.labels[train_idx], full.class_names)
    val = ImageDataset(full.images[val_idx], full.labels[val_idx], full.class_names) if len(val_idx) else None
    return DatasetSplits(
        name=name, train=train, val=val, class_names=full.class_names, channels=1, image_size=size
    )
