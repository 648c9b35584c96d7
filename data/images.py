"""The types every dataset reader returns (`ImageDataset`, `DatasetSplits`), the one error they raise
(`DatasetError`), and the helpers the readers share: resizing, class selection and relabelling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Resizing a whole dataset at once would need N*C*S*S float32 in memory (2.4 GB for CIFAR at 64 px);
# chunks of this many images keep the peak small at no cost in speed.
_RESIZE_CHUNK = 4096


class DatasetError(Exception):
    """A user-facing problem with the dataset (missing files, unknown class name, ...).

    str(e) is the whole message shown to the user: what is wrong and how to fix it. The CLI prints it and
    exits 2, so the message must not rely on a traceback for context.
    """


# --------------------------------------------------------------------------------------------------------
# Dataset types
# --------------------------------------------------------------------------------------------------------


@dataclass
class ImageDataset:
    """A labelled image set held in memory.

    images: uint8 (N, C, H, W), contiguous, already at the final image size.
    labels: int64 (N,), remapped to 0..k-1.
    class_names: k names; class_names[label] is the display name of that label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        # These are programming errors in a reader, not user mistakes, hence ValueError, not DatasetError.
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        k = len(self.class_names)
        if len(self.labels) and not (int(self.labels.min()) >= 0 and int(self.labels.max()) < k):
            raise ValueError(f"labels must lie in 0..{k - 1}")
        self.images = self.images.contiguous()
        self.labels = self.labels.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(
        self, indices: torch.Tensor, flip: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float32 images in [-1, 1] (N, C, H, W) and int64 labels (N,) for these indices.

        `flip`, if given, is a bool tensor (N,) aligned with `indices`; images whose entry is True are
        mirrored horizontally (along W). The result lives on the dataset's device (CPU); the caller moves it.
        """
        indices = indices.to(device=self.images.device, dtype=torch.long)
        x = self.images[indices].to(torch.float32).div_(127.5).sub_(1.0)  # (N, C, H, W) in [-1, 1]
        if flip is not None:
            mask = flip.to(device=x.device, dtype=torch.bool).view(-1, 1, 1, 1)
            x = torch.where(mask, x.flip(-1), x)
        return x, self.labels[indices]


@dataclass
class DatasetSplits:
    """What `load_dataset` returns: the training set, an optional validation set, and their shape.

    name: display name (e.g. "Digits", "Trees"). class_names, channels and image_size describe both splits.
    val is None when the source has no held-out split (e.g. digits with val_fraction=0).
    """

    name: str
    train: ImageDataset
    val: ImageDataset | None
    class_names: list[str]
    channels: int
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------------------------------------
# Helpers shared by the readers
# --------------------------------------------------------------------------------------------------------


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float or uint8 images (N, C, H, W) to (N, C, size, size) and return them as uint8.

    Antialiased bilinear interpolation, so downscaling does not alias and upscaling is smooth. Float input
    is taken to be on the 0..255 scale already; output is rounded and clamped into 0..255.
    """
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].to(torch.float32)
        if chunk.shape[-2:] != (size, size):
            chunk = F.interpolate(
                chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        out[start : start + _RESIZE_CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def check_image_size(image_size: int | None) -> None:
    """Refuse an image size that cannot be produced (the config may come from a hand-edited override)."""
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DatasetError(
            f"data.image_size must be a positive integer or null (native size), got {image_size!r}."
        )


def select_classes(
    dataset_label: str, all_names: list[str], wanted: list[str] | None, kind: str = "class"
) -> set[int]:
    """Map class names to label ids, refusing unknown names with the list of valid ones."""
    unknown = [n for n in wanted or [] if n not in all_names]
    if unknown:
        raise DatasetError(
            f"Unknown {dataset_label} {kind} name(s): {', '.join(repr(n) for n in unknown)}.\n"
            f"Valid {kind} names are: {', '.join(all_names)}."
        )
    return {all_names.index(n) for n in wanted or []}


def filter_and_remap(
    images: torch.Tensor, labels: torch.Tensor, keep: list[int], all_names: list[str]
) -> ImageDataset:
    """Keep only images whose label is in `keep` (sorted original ids) and renumber labels 0..k-1.

    The new label of original id keep[i] is i, so the order of the original ids is preserved.
    """
    remap = torch.full((len(all_names),), -1, dtype=torch.int64)
    remap[torch.tensor(keep, dtype=torch.int64)] = torch.arange(len(keep), dtype=torch.int64)
    new_labels = remap[labels]
    mask = new_labels >= 0
    return ImageDataset(
        images=images[mask], labels=new_labels[mask], class_names=[all_names[i] for i in keep]
    )
