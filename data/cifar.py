"""CIFAR-10 and CIFAR-100 from the official "python version" pickle folders.

    <root>/cifar-10-batches-py/   data_batch_1..5, test_batch, batches.meta
    <root>/cifar-100-python/      train, test, meta

We read the pickles ourselves rather than through torchvision's dataset classes: those verify MD5 sums,
so any other copy of the files (a test fixture, a re-packed mirror) would be refused. torchvision is used
only to *fetch* the files when `download=True` and the folder is absent.

Class filtering: `classes` keeps fine classes by name, `superclasses` keeps every fine class of the named
CIFAR-100 coarse classes (e.g. "trees" -> maple_tree, oak_tree, palm_tree, pine_tree, willow_tree). The
validation split is always the official test split, filtered the same way.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
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

NATIVE_SIZE = 32

# The 100 fine classes of CIFAR-100, in label-id order (as in the official `meta` file).
CIFAR100_FINE_NAMES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip

# The 20 coarse classes of CIFAR-100 (label-id order) and the five fine classes each contains.
# Hard-coded rather than derived from the files' coarse_labels so a filter means the same thing whatever
# images a folder happens to hold (and works for a class with no images in a trimmed copy).
CIFAR100_SUPERCLASSES: dict[str, list[str]] = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
CIFAR100_COARSE_NAMES = list(CIFAR100_SUPERCLASSES)

CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant lives on disk and what it is called."""

    title: str  # "CIFAR-10"
    folder: str  # "cifar-10-batches-py"
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str  # key of the label list in each batch file
    names_key: str  # key of the class-name list in the meta file
    tarball: str


_LAYOUTS = {
    "cifar10": _Layout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        tarball="cifar-10-python.tar.gz",
    ),
    "cifar100": _Layout(
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        tarball="cifar-100-python.tar.gz",
    ),
}


# --------------------------------------------------------------------------------------------------------
# Reading the pickle files
# --------------------------------------------------------------------------------------------------------


def _decode(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _bytes(*args: Any) -> bytes:
    """``bytes`` as protocol 2 calls it for an empty array's data: no arguments, or bytes, only."""
    if args == () or (len(args) == 1 and isinstance(args[0], bytes)):
        return bytes(*args)
    raise RefusedPickle(f"bytes{args!r:.60}")


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol 2 calls it for bytes: a str in latin-1, only."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin-1")
    raise RefusedPickle(f"_codecs.encode with {type(text).__name__}, {encoding!r:.40}")


CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})  # fmt: skip
"""What a CIFAR pickle refers to besides bytes: numpy's arrays, dtypes and scalars."""

_CIFAR_BYTES = {
    ("_codecs", "encode"): _encode,
    ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytes"): _bytes,
}
"""How protocol 2 spells bytes, each answered by a constructor that takes only what bytes need."""


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that refers to something no CIFAR file holds (and that could run code)."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the CIFAR formats hold: dicts, lists, bytes, str, ints and numpy
    arrays; anything else (a function to call, an object to build) is refused before it exists."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_BYTES:
            return _CIFAR_BYTES[module, name]
        if (module, name) not in CIFAR_GLOBALS:
            raise RefusedPickle(f"{module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle(f"a persistent id ({pid!r})")


def _load_pickle(path: str) -> dict[str, Any]:
    """Unpickle one CIFAR file (``_CifarUnpickler``: no code runs from it) and normalise its keys (and string
    values) from bytes to str."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes" because the official files were written by Python 2; it turns their str keys
            # into bytes, which _decode undoes.
            raw = _CifarUnpickler(f, encoding="bytes").load()
    except RefusedPickle as e:
        raise DatasetError(
            f"{path} refers to {e}, which no CIFAR file holds: it is not loaded (a pickle like it could run "
            "code). Use the official files (python version) from https://www.cs.toronto.edu/~kriz/cifar.html."
        ) from None
    except (
        OSError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        AttributeError,
        ImportError,
        TypeError,
    ) as e:
        raise DatasetError(
            f"Could not read {path}: {e}.\nThe file looks damaged; delete its folder and extract the tarball again."
        ) from e
    if not isinstance(raw, dict):
        raise DatasetError(f"{path} is not a CIFAR pickle (expected a dict, got {type(raw).__name__}).")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [_decode(v) for v in value]
        out[_decode(key)] = value
    return out


def _field(batch: dict[str, Any], key: str, path: str) -> Any:
    if key not in batch:
        raise DatasetError(
            f"{path} has no {key!r} entry (found: {', '.join(sorted(batch))}); is it a CIFAR file?"
        )
    return batch[key]


def _read_split(folder: str, files: tuple[str, ...], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate batch files into uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    images, labels = [], []
    for file in files:
        path = os.path.join(folder, file)
        batch = _load_pickle(path)
        data = np.asarray(_field(batch, "data", path), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * NATIVE_SIZE * NATIVE_SIZE:
            raise DatasetError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072).")
        # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major: exactly (3, 32, 32).
        images.append(torch.from_numpy(data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).copy()))
        labels.append(torch.as_tensor(np.asarray(_field(batch, label_key, path), dtype=np.int64)))
    return torch.cat(images), torch.cat(labels)


def _missing_message(layout: _Layout, root: str) -> str:
    root_abs = os.path.abspath(root)
    folder = os.path.join(root_abs, layout.folder)
    return (
        f"{layout.title} not found: expected the folder {folder}\n"
        f"To get it, either\n"
        f'  - download the "{layout.title} python version" tarball ({layout.tarball}) from '
        f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {root_abs}, or\n"
        f"  - pass --set data.download=true on a machine with network access.\n"
        f"To train without any download, use --data digits (scikit-learn's bundled digits, works offline)."
    )


def _missing_parents(folder: str) -> list[str]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _remove_if_empty(folders: list[str]) -> None:
    """Remove the folders a failed download created, innermost first, where they are still empty (a partial
    archive inside is removed with them: torchvision names it after the dataset)."""
    for folder in folders:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.endswith((".tar.gz", ".tar.gz.part")) and os.path.isfile(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
            if not os.listdir(folder):
                os.rmdir(folder)


def _ensure_present(source: str, layout: _Layout, root: str, download: bool) -> str:
    """Return the dataset folder, downloading it first if allowed; refuse with instructions otherwise."""
    folder = os.path.join(os.path.abspath(root), layout.folder)
    if not os.path.isdir(folder):
        if not download:
            raise DatasetError(_missing_message(layout, root))
        # Imported here: torchvision is only needed for the (rare) download path.
        import torchvision.datasets

        fetch = torchvision.datasets.CIFAR10 if source == "cifar10" else torchvision.datasets.CIFAR100
        created = _missing_parents(os.path.abspath(root))
        try:
            fetch(os.path.abspath(root), download=True)
        except Exception as e:  # URLError, timeouts, checksum RuntimeError: all mean "could not fetch"
            _remove_if_empty(created)  # nothing half-made is left behind
            raise DatasetError(
                f"Downloading {layout.title} into {os.path.abspath(root)} failed: {e}\n"
                + _missing_message(layout, root)
            ) from e
    missing = [
        f
        for f in (*layout.train_files, *layout.test_files, layout.meta_file)
        if not os.path.isfile(os.path.join(folder, f))
    ]
    if missing:
        raise DatasetError(
            f"{layout.title} folder {folder} is incomplete: missing {', '.join(missing)}.\n"
            f"Delete it and extract {layout.tarball} into {os.path.abspath(root)} again."
        )
    return folder


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def load_cifar(
    *,
    name: str,
    source: str,
    root: str,
    classes: list[str] | None,
    superclasses: list[str] | None,
    image_size: int | None,
    download: bool,
) -> DatasetSplits:
    """Load CIFAR-10 ("cifar10") or CIFAR-100 ("cifar100") from `root`, filtered and resized.

    classes: fine class names to keep; superclasses: CIFAR-100 coarse class names whose fine classes to
    keep; the union of both is kept, and None or [] for both keeps all classes. Labels are renumbered
    0..k-1 in the order of the original label ids. Validation = the official test split, filtered the same.
    Raises DatasetError for a missing folder, unreadable files or unknown names.
    """
    check_image_size(image_size)
    layout = _LAYOUTS[source]
    if superclasses and source == "cifar10":
        raise DatasetError(
            "CIFAR-10 has no superclasses; data.superclasses must be null for source cifar10 "
            "(use data.classes, or source cifar100)."
        )
    folder = _ensure_present(source, layout, root, download)

    meta_path = os.path.join(folder, layout.meta_file)
    all_names = [str(n) for n in _field(_load_pickle(meta_path), layout.names_key, meta_path)]

    keep = select_classes(layout.title, all_names, classes)
    if superclasses:
        select_classes(layout.title, CIFAR100_COARSE_NAMES, superclasses, kind="superclass")
        wanted_fine = [fine for sc in superclasses for fine in CIFAR100_SUPERCLASSES[sc]]
        keep |= select_classes(layout.title, all_names, wanted_fine)
    keep_ids = sorted(keep) if keep else list(range(len(all_names)))

    size = image_size or NATIVE_SIZE
    splits = []
    for files in (layout.train_files, layout.test_files):
        images, labels = _read_split(folder, files, layout.label_key)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(all_names)):
            raise DatasetError(
                f"{folder}: labels out of range 0..{len(all_names) - 1}; the files do not match the meta file."
            )
        split = filter_and_remap(images, labels, keep_ids, all_names)
        if size != NATIVE_SIZE:  # after filtering, so only the kept images are resized
            split = ImageDataset(resize_images(split.images, size), split.labels, split.class_names)
        splits.append(split)
    train, val = splits
    if len(train) == 0:
        raise DatasetError(f"{layout.title} in {folder}: the selected classes have no training images.")
    return DatasetSplits(
        name=name,
        train=train,
        val=val if len(val) else None,
        class_names=train.class_names,
        channels=3,
        image_size=size,
    )
