"""In-memory image datasets and the one entry point that loads them.

Every dataset this project trains on is small enough to live in memory as a single uint8 tensor, already
at the final image size. The trainer then draws batches by index (`ImageDataset.batch`), so there is no
DataLoader, no worker processes and no per-epoch decoding: every rank holds the same tensor and picks its
own indices, which keeps resume bit-identical.

`load_dataset` takes exactly the fields of the project's `DataConfig` (minus `random_flip` and `augment_p`,
which the trainer applies) plus the training seed, and dispatches on `source` to `data/cifar.py` or `data/digits.py`.
"""

from __future__ import annotations

from data.cifar import load_cifar
from data.digits import load_digits
from data.images import DatasetError, DatasetSplits, check_image_size

SOURCES = ("digits", "cifar10", "cifar100")


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def load_dataset(
    *,
    name: str,
    source: str,
    root: str,
    classes: list[str] | None,
    superclasses: list[str] | None,
    image_size: int | None,
    val_fraction: float,
    download: bool,
    seed: int,
) -> DatasetSplits:
    """Load the dataset described by a `DataConfig` (minus `random_flip` and `augment_p`) into memory.

    source: "digits" (scikit-learn, offline), "cifar10" or "cifar100" (python pickle folders under `root`).
    classes / superclasses: keep only these (fine) classes / the fine classes of these CIFAR-100 coarse
        classes (union of both); None or [] keeps everything. Labels are renumbered 0..k-1.
    image_size: None keeps the native size (16 for digits, 32 for CIFAR); anything else is resized once here.
    val_fraction: digits only: the fraction of each class held out (a fixed split, independent of `seed`).
        CIFAR always validates on its official test split.
    download: CIFAR only: fetch the files with torchvision if the folder is absent.
    seed: the training seed; accepted so callers can pass the whole config, but no split depends on it.

    Raises DatasetError for anything the user can fix (unknown source or class, missing files, ...).
    """
    check_image_size(image_size)
    if source == "digits":
        return load_digits(
            name=name,
            classes=classes,
            superclasses=superclasses,
            image_size=image_size,
            val_fraction=val_fraction,
        )
    if source in ("cifar10", "cifar100"):
        return load_cifar(
            name=name,
            source=source,
            root=root,
            classes=classes,
            superclasses=superclasses,
            image_size=image_size,
            download=download,
        )
    raise DatasetError(f"Unknown data.source {source!r}. Valid sources are: {', '.join(SOURCES)}.")
