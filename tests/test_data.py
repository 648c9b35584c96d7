"""The data package's promises: CIFAR folders are read correctly (both pickle key styles), class filters
renumber labels, missing data is explained, the digits split is fixed and stratified, and every preset loads.

CIFAR tests use tiny fake folders written in the exact official pickle formats, so nothing is downloaded.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from data import DatasetError, DatasetSplits, ImageDataset, load_dataset
from data.cifar import CIFAR10_NAMES, CIFAR100_COARSE_NAMES, CIFAR100_FINE_NAMES, CIFAR100_SUPERCLASSES
from data.digits import stratified_split

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"
PRESET_KEYS = {
    "name",
    "source",
    "root",
    "classes",
    "superclasses",
    "image_size",
    "val_fraction",
    "download",
    "random_flip",
    "augment_p",
}
ANIMAL_SUPERCLASSES = [
    "aquatic_mammals",
    "fish",
    "insects",
    "large_carnivores",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "reptiles",
    "small_mammals",
]
IMAGES_PER_BATCH = 20


# --------------------------------------------------------------------------------------------------------
# Fake CIFAR folders
# --------------------------------------------------------------------------------------------------------


def _to_bytes(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return [_to_bytes(v) for v in value]
    return value


def _dump(path: Path, content: dict[str, Any], bytes_keys: bool) -> None:
    """Pickle like the official files: bytes keys and bytes names (Python 2 style) or plain str keys."""
    if bytes_keys:
        content = {k.encode(): _to_bytes(val) for k, val in content.items()}
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)


def _images_showing_labels(labels: list[int]) -> np.ndarray:
    """uint8 (N, 3072) rows whose every pixel equals the image's label, so remapping can be checked."""
    return np.repeat(np.asarray(labels, dtype=np.uint8)[:, None], 3072, axis=1)


def write_cifar10(root: Path, bytes_keys: bool) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, file in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        labels = [(i + j) % 10 for j in range(IMAGES_PER_BATCH)]
        data = _images_showing_labels(labels)
        if file == "data_batch_1":
            # Image 0 has a known layout: R plane all 10, G plane all 20, B plane 30 except 200 at row 0,
            # column 31 (flat index 31: rows are contiguous within a plane).
            data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30
            data[0, 2048 + 31] = 200
        _dump(folder / file, {"batch_label": file, "data": data, "labels": labels}, bytes_keys)
    _dump(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_vis": 3072}, bytes_keys)
    return folder


def write_cifar100(root: Path, bytes_keys: bool) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    coarse_of = {
        CIFAR100_FINE_NAMES.index(fine): c
        for c, name in enumerate(CIFAR100_COARSE_NAMES)
        for fine in CIFAR100_SUPERCLASSES[name]
    }
    for file, per_class in (("train", 2), ("test", 1)):
        fine = [i % 100 for i in range(100 * per_class)]
        content = {
            "filenames": [f"{i}.png" for i in fine],
            "batch_label": file,
            "fine_labels": fine,
            "coarse_labels": [coarse_of[i] for i in fine],
            "data": _images_showing_labels(fine),
        }
        _dump(folder / file, content, bytes_keys)
    meta = {"fine_label_names": CIFAR100_FINE_NAMES, "coarse_label_names": CIFAR100_COARSE_NAMES}
    _dump(folder / "meta", meta, bytes_keys)
    return folder


def load(source: str, root: Path | str = "datasets", **overrides: Any) -> DatasetSplits:
    fields: dict[str, Any] = dict(
        name="test",
        source=source,
        root=str(root),
        classes=None,
        superclasses=None,
        image_size=None,
        val_fraction=0.1,
        download=False,
        seed=0,
    )
    fields.update(overrides)
    return load_dataset(**fields)


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load("digits")


# --------------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["bytes-keys", "str-keys"])
def test_cifar10_reads_both_pickle_key_styles_into_uint8_nchw(tmp_path: Path, bytes_keys: bool) -> None:
    write_cifar10(tmp_path, bytes_keys)
    splits = load("cifar10", tmp_path)
    assert (splits.channels, splits.image_size, splits.num_classes) == (3, 32, 10)
    assert splits.class_names == CIFAR10_NAMES
    assert splits.train.images.shape == (5 * IMAGES_PER_BATCH, 3, 32, 32)
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.is_contiguous()
    assert splits.train.labels.dtype == torch.int64
    assert splits.val is not None and len(splits.val) == IMAGES_PER_BATCH  # the official test split


def test_an_empty_test_split_loads_and_bytes_built_any_other_way_are_refused(tmp_path: Path) -> None:
    """An empty array's data is pickled as ``bytes()``: it loads. A pickle asking ``bytes`` for a size (a
    memory bomb) or ``_codecs.encode`` for another codec is refused in one line."""
    folder = write_cifar10(tmp_path, bytes_keys=True)
    _dump(folder / "test_batch", {"data": np.zeros((0, 3072), np.uint8), "labels": []}, bytes_keys=True)
    assert len(load("cifar10", tmp_path, val_fraction=0.0).train) == 5 * IMAGES_PER_BATCH
    bomb = b"\x80\x02}q\x00X\x04\x00\x00\x00dataq\x01c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85Rs."
    codec = b"\x80\x02}q\x00X\x04\x00\x00\x00dataq\x01c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86Rs."
    for payload, said in ((bomb, r"bytes\(1073741824,\)"), (codec, "_codecs.encode with str, 'zlib'")):
        (folder / "test_batch").write_bytes(payload)
        with pytest.raises(DatasetError, match=f"test_batch refers to {said}"):
            load("cifar10", tmp_path)


def test_cifar_pixel_layout_is_rgb_planes_row_major(tmp_path: Path) -> None:
    write_cifar10(tmp_path, bytes_keys=True)
    image = load("cifar10", tmp_path).train.images[0]
    assert (image[0] == 10).all() and (image[1] == 20).all()
    assert image[2, 0, 31] == 200  # row 0, last column: not transposed
    assert image[2, 31, 0] == 30 and int((image[2] == 200).sum()) == 1


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["bytes-keys", "str-keys"])
def test_trees_superclass_keeps_five_classes_renumbered_0_to_4(tmp_path: Path, bytes_keys: bool) -> None:
    write_cifar100(tmp_path, bytes_keys)
    splits = load("cifar100", tmp_path, superclasses=["trees"])
    assert splits.class_names == ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"]
    assert splits.num_classes == 5
    assert sorted(splits.train.labels.unique().tolist()) == [0, 1, 2, 3, 4]
    assert len(splits.train) == 10 and splits.val is not None and len(splits.val) == 5
    # Each image's pixels hold its original fine label id: label i must come from class_names[i].
    for dataset in (splits.train, splits.val):
        for image, label in zip(dataset.images, dataset.labels):
            assert int(image[0, 0, 0]) == CIFAR100_FINE_NAMES.index(splits.class_names[int(label)])


def test_animals_superclasses_keep_forty_classes(tmp_path: Path) -> None:
    write_cifar100(tmp_path, bytes_keys=True)
    splits = load("cifar100", tmp_path, superclasses=ANIMAL_SUPERCLASSES)
    assert splits.num_classes == 40
    assert splits.train.labels.max() == 39 and len(splits.train) == 80


def test_classes_and_superclasses_combine_in_original_label_order(tmp_path: Path) -> None:
    write_cifar100(tmp_path, bytes_keys=False)
    splits = load("cifar100", tmp_path, classes=["willow_tree", "apple"], superclasses=["trees"])
    assert splits.class_names == ["apple", "maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"]


def test_unknown_class_name_is_refused_with_the_valid_names(tmp_path: Path) -> None:
    write_cifar100(tmp_path, bytes_keys=True)
    with pytest.raises(DatasetError) as err:
        load("cifar100", tmp_path, classes=["maple", "oak_tree"])
    assert "'maple'" in str(err.value) and "maple_tree" in str(err.value) and "willow_tree" in str(err.value)
    with pytest.raises(DatasetError, match="vehicles_1"):
        load("cifar100", tmp_path, superclasses=["tree"])


def test_cifar10_refuses_superclasses(tmp_path: Path) -> None:
    write_cifar10(tmp_path, bytes_keys=True)
    with pytest.raises(DatasetError, match="no superclasses"):
        load("cifar10", tmp_path, superclasses=["trees"])


def test_missing_cifar_folder_explains_where_to_put_it(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        load("cifar10", root)
    message = str(err.value)
    assert str(root.resolve() / "cifar-10-batches-py") in message
    assert "CIFAR-10 python version" in message
    assert "--set data.download=true" in message
    assert "--data digits" in message


def test_failed_download_becomes_a_dataset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("no network")

    def half_downloaded(root: str, download: bool) -> None:  # the archive started, then the network went
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-100-python.tar.gz").write_bytes(b"partial")
        offline()

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", half_downloaded)
    with pytest.raises(DatasetError, match="no network") as err:
        load("cifar100", tmp_path / "datasets", download=True)
    assert "--data digits" in str(err.value)
    assert not (tmp_path / "datasets").exists()  # no empty (or half-filled) folder left behind


def test_incomplete_cifar_folder_names_the_missing_file(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path, bytes_keys=False)
    os.remove(folder / "data_batch_3")
    with pytest.raises(DatasetError, match="missing data_batch_3"):
        load("cifar10", tmp_path)


def test_cifar_resizes_once_at_load_time(tmp_path: Path) -> None:
    write_cifar100(tmp_path, bytes_keys=True)
    splits = load("cifar100", tmp_path, superclasses=["trees"], image_size=16)
    assert splits.image_size == 16 and splits.train.images.shape == (10, 3, 16, 16)
    assert splits.train.images.dtype == torch.uint8
    # Every fake image is a single colour, which resizing must preserve.
    for image in splits.train.images:
        assert (image == image[0, 0, 0]).all()


# --------------------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------------------


def test_digits_are_1797_images_16px_one_channel(digits: DatasetSplits) -> None:
    assert digits.val is not None
    assert len(digits.train) + len(digits.val) == 1797
    assert (digits.channels, digits.image_size, digits.num_classes) == (1, 16, 10)
    assert digits.class_names == [str(d) for d in range(10)]
    assert digits.train.images.shape[1:] == (1, 16, 16) and digits.train.images.dtype == torch.uint8
    assert int(digits.train.images.max()) == 255  # 0..16 was scaled to the full 0..255 range


def test_digits_validation_split_is_stratified_and_disjoint(digits: DatasetSplits) -> None:
    assert digits.val is not None
    train_counts = torch.bincount(digits.train.labels, minlength=10)
    val_counts = torch.bincount(digits.val.labels, minlength=10)
    fraction = val_counts.float() / (train_counts + val_counts).float()
    assert ((fraction - 0.1).abs() < 0.01).all()

    labels = torch.cat([digits.train.labels, digits.val.labels])
    train_idx, val_idx = stratified_split(labels, 0.1, seed=0)
    assert len(set(train_idx.tolist()) & set(val_idx.tolist())) == 0
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(len(labels)))


def test_digits_split_is_the_same_for_every_training_seed(digits: DatasetSplits) -> None:
    other = load("digits", seed=12345)
    assert digits.val is not None and other.val is not None
    assert torch.equal(digits.val.images, other.val.images)
    assert torch.equal(digits.val.labels, other.val.labels)


def test_batch_gives_float_images_in_minus_one_to_one(digits: DatasetSplits) -> None:
    images, labels = digits.train.batch(torch.arange(64))
    assert images.dtype == torch.float32 and images.shape == (64, 1, 16, 16)
    assert labels.dtype == torch.int64 and torch.equal(labels, digits.train.labels[:64])
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() == -1.0 and images.max() == 1.0


def test_batch_flip_mirrors_only_the_flagged_images() -> None:
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).view(2, 1, 2, 3) * 10
    dataset = ImageDataset(images=images, labels=torch.tensor([0, 1]), class_names=["a", "b"])
    x, _ = dataset.batch(torch.tensor([0, 1]), flip=torch.tensor([True, False]))
    expected = images.float() / 127.5 - 1
    assert torch.allclose(x[0], expected[0].flip(-1)) and torch.allclose(x[1], expected[1])


def test_digit_class_filter_renumbers_labels() -> None:
    splits = load("digits", classes=["4", "0", "2"])
    assert splits.class_names == ["0", "2", "4"]
    assert splits.val is not None
    assert set(splits.train.labels.tolist()) == {0, 1, 2} == set(splits.val.labels.tolist())


def test_digits_resize_to_another_image_size() -> None:
    splits = load("digits", image_size=32, val_fraction=0.0)
    assert splits.image_size == 32 and splits.val is None
    assert splits.train.images.shape == (1797, 1, 32, 32) and splits.train.images.dtype == torch.uint8


def test_digits_refuse_superclasses_and_unknown_digits() -> None:
    with pytest.raises(DatasetError, match="no superclasses"):
        load("digits", superclasses=["trees"])
    with pytest.raises(DatasetError, match="Valid class names are: 0, 1, 2"):
        load("digits", classes=["10"])


def test_unknown_source_lists_the_valid_sources() -> None:
    with pytest.raises(DatasetError, match="digits, cifar10, cifar100"):
        load("mnist")


# --------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "num_classes"),
    [
        ("digits", 10),
        ("digits_0_4", 5),
        ("cifar10", 10),
        ("cifar100", 100),
        ("cifar100_trees_only", 5),
        ("cifar100_animals_only", 40),
    ],
)
def test_every_data_preset_loads(tmp_path: Path, preset: str, num_classes: int) -> None:
    fields = yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text())
    assert set(fields) == PRESET_KEYS
    fields.pop("random_flip")  # used by the trainer, not by load_dataset
    fields.pop("augment_p")
    if fields["source"] != "digits":
        (write_cifar10 if fields["source"] == "cifar10" else write_cifar100)(tmp_path, bytes_keys=True)
        fields["root"] = str(tmp_path)
    splits = load_dataset(**fields, seed=0)
    assert splits.num_classes == num_classes and splits.name == fields["name"]


def test_preset_folder_has_exactly_the_documented_presets() -> None:
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == {
        "digits",
        "digits_0_4",
        "cifar10",
        "cifar100",
        "cifar100_trees_only",
        "cifar100_animals_only",
    }


def test_digits_read_without_sklearn_equal_sklearns_load_digits() -> None:
    from sklearn.datasets import load_digits as sklearn_load_digits

    from data.digits import _load_raw

    images, labels = _load_raw()
    bunch = sklearn_load_digits()
    assert torch.equal(
        images, torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    )
    assert torch.equal(labels, torch.as_tensor(bunch.target, dtype=torch.int64))
