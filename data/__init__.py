"""Datasets for the DiffiT trainer: everything is loaded into memory once, by `load_dataset`.

Sources: "digits" (scikit-learn's bundled digits, offline) and "cifar10" / "cifar100" (the official
python pickle folders, optionally filtered to classes or CIFAR-100 superclasses).
"""

from data.datasets import SOURCES, load_dataset
from data.images import DatasetError, DatasetSplits, ImageDataset

__all__ = ["SOURCES", "DatasetError", "DatasetSplits", "ImageDataset", "load_dataset"]
