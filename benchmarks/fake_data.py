"""Fake CIFAR folders in the official pickle layout (``data/cifar.py`` reads them): random images."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any


def write_fake_cifar(root: Path, *, train_images: int, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with ``train_images`` random images over the 5 training files, an empty
    test split (no validation: the hand loop has none either), and ``root/cifar-100-python`` with 4 random
    training images per fine class and an empty test split (for the LoRA runs on the trees superclass)."""
    import numpy as np

    from data.cifar import CIFAR10_NAMES, CIFAR100_FINE_NAMES, CIFAR100_SUPERCLASSES

    rng = np.random.default_rng(seed)

    def dump(path: Path, content: dict[str, Any]) -> None:
        with open(path, "wb") as f:
            pickle.dump(content, f, protocol=2)

    def images(n: int) -> Any:
        return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)

    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True, exist_ok=True)
    per_file = [train_images // 5 + (i < train_images % 5) for i in range(5)]
    for i, n in enumerate(per_file, start=1):
        dump(c10 / f"data_batch_{i}", {"data": images(n), "labels": [int(x) for x in rng.integers(0, 10, n)]})
    dump(c10 / "test_batch", {"data": images(0), "labels": []})
    dump(c10 / "batches.meta", {"label_names": CIFAR10_NAMES})

    c100 = root / "cifar-100-python"
    c100.mkdir(parents=True, exist_ok=True)
    coarse = {f: c for c, name in enumerate(CIFAR100_SUPERCLASSES) for f in CIFAR100_SUPERCLASSES[name]}
    for file, per_class in (("train", 4), ("test", 0)):
        fine = [i % 100 for i in range(100 * per_class)]
        dump(c100 / file, {"data": images(len(fine)), "fine_labels": fine,
                           "coarse_labels": [coarse[CIFAR100_FINE_NAMES[i]] for i in fine]})  # fmt: skip
    dump(
        c100 / "meta",
        {"fine_label_names": CIFAR100_FINE_NAMES, "coarse_label_names": list(CIFAR100_SUPERCLASSES)},
    )
    return root
