"""EDM's non-leaking augmentation (Karras et al. 2022, Appendix F.2; after ADA, Karras et al. 2020).

Each image gets each transform with probability p·weight (at most 1), and with the augmented images comes an
*augmentation label* per image saying what was done (zero where nothing was). The network is conditioned on
that label in training and sampled with the zero label, so it learns the augmented images as other data
rather than as the data: the augmentations do not leak into its samples.

The transforms and their ranges are EDM's; the default weights are its CIFAR-10 recipe (``AugmentWeights()``:
an x-flip of every other image, a y-flip, isotropic scaling, rotation, anisotropic scaling and translation;
brightness, contrast and saturation exist with weight 0). Label layout, for each transform of weight > 0, in
this order: xflip 1, yflip 1, scale 1, rotate_frac 2 (cos θ − 1, sin θ), aniso 2 (w·cos r, w·sin r),
translate_frac 2 (tx, ty in standard deviations), brightness 1, contrast 1, saturation 1: 9 numbers by default.

Unlike EDM's augment.py, the geometric transforms of an image are composed into one affine matrix applied by a
single bilinear ``grid_sample`` with reflection padding, where EDM samples a 2x wavelet-upsampled image and
filters it back down (so this aliases a little more at strong downscaling); flips are exact pixel flips and an
image no geometric transform was drawn for is left bit for bit. EDM's integer translation and rotation, luma flip
and hue rotation (all weight 0 in its recipes) are left out.

Determinism: every random draw is made for the whole *global* batch from the caller's ``torch.Generator``, in a
fixed order, and ``share=(rank, world)`` then cuts this process's contiguous slice (as ``edm_loss`` does), so
an image's augmentation does not depend on the number of processes or micro-batches. With p = 0 nothing is
drawn and the images are returned as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# EDM's ranges (AugmentPipe's defaults).
SCALE_STD = 0.2  # log2 standard deviation of isotropic scaling
ROTATE_FRAC_MAX = 1.0  # range of rotation, 1 = the full circle
ANISO_STD = 0.2  # log2 standard deviation of anisotropic scaling
ANISO_ROTATE_PROB = 0.5  # probability of scaling anisotropically along rotated axes
TRANSLATE_FRAC_STD = 0.125  # standard deviation of translation, relative to the image size
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5  # log2
SATURATION_STD = 1.0  # log2


@dataclass(frozen=True)
class AugmentWeights:
    """Probability multipliers per transform; the defaults are EDM's CIFAR-10 recipe (xflip 1e8: p·1e8 ≥ 1, so
    every image is flipped with probability 1/2 whatever p is). A transform of weight 0 is not drawn and has no
    place in the label."""

    xflip: float = 1e8
    yflip: float = 1.0
    scale: float = 1.0
    rotate_frac: float = 1.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0

    def __post_init__(self) -> None:
        bad = [f.name for f in fields(self) if not getattr(self, f.name) >= 0]
        if bad:
            raise ValueError(f"augmentation weights must be >= 0, got {', '.join(bad)} below 0")

    @property
    def label_dim(self) -> int:
        """Length of the augmentation label (``augment``'s second output's width)."""
        widths = {"rotate_frac": 2, "aniso": 2, "translate_frac": 2}
        return sum(widths.get(f.name, 1) for f in fields(self) if getattr(self, f.name) > 0)


EDM_CIFAR10 = AugmentWeights()
AUGMENT_DIM = EDM_CIFAR10.label_dim
"""The label size of EDM's CIFAR-10 recipe (9): what a model trained with ``augment`` is conditioned on."""


def augment(
    images: Tensor,
    p: float,
    generator: torch.Generator,
    share: tuple[int, int] = (0, 1),
    weights: AugmentWeights = EDM_CIFAR10,
) -> tuple[Tensor, Tensor]:
    """(augmented images, augmentation labels (N, weights.label_dim) float32) for ``images`` (N, C, H, W) in
    [-1, 1], this rank's contiguous share of a global batch of N × world images (``share=(rank, world)``)."""
    n = images.shape[0]
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")
    if p == 0:
        return images, torch.zeros(n, weights.label_dim, device=images.device)
    rank, world = share
    mine = slice(rank * n, (rank + 1) * n)
    draws = {k: v[mine].to(images.device) for k, v in _draw(n * world, p, weights, generator).items()}
    return _apply(images, draws, weights)


def _draw(total: int, p: float, weights: AugmentWeights, generator: torch.Generator) -> dict[str, Tensor]:
    """Every random number of ``total`` images, in a fixed order; a transform not applied to an image
    gets 0 there (the identity)."""
    device = generator.device

    def rand(*shape: int) -> Tensor:
        return torch.rand((total, *shape), generator=generator, device=device)

    def randn(*shape: int) -> Tensor:
        return torch.randn((total, *shape), generator=generator, device=device)

    def gated(value: Tensor, weight: float) -> Tensor:
        keep = rand() < min(p * weight, 1.0)  # (total,)
        return torch.where(keep.view(-1, *[1] * (value.ndim - 1)), value, torch.zeros_like(value))

    d: dict[str, Tensor] = {}
    for name in ("xflip", "yflip"):
        if getattr(weights, name) > 0:
            d[name] = gated(torch.randint(2, (total,), generator=generator, device=device).float(),
                            getattr(weights, name))  # fmt: skip
    if weights.scale > 0:
        d["scale"] = gated(randn(), weights.scale)
    if weights.rotate_frac > 0:
        d["rotate_frac"] = gated((rand() * 2 - 1) * (math.pi * ROTATE_FRAC_MAX), weights.rotate_frac)
    if weights.aniso > 0:
        w, r = randn(), (rand() * 2 - 1) * math.pi
        d["aniso"] = gated(w, weights.aniso)
        d["aniso_angle"] = torch.where(rand() < ANISO_ROTATE_PROB, r, torch.zeros_like(r))
    if weights.translate_frac > 0:
        d["translate_frac"] = gated(randn(2), weights.translate_frac)  # (total, 2)
    for name in ("brightness", "contrast", "saturation"):
        if getattr(weights, name) > 0:
            d[name] = gated(randn(), getattr(weights, name))
    return _with_functions(d)


def _with_functions(d: dict[str, Tensor]) -> dict[str, Tensor]:
    """``d`` with the transcendental functions of its draws, computed on the global batch: vectorised and scalar
    code round them differently, so computed on a share an image's value would depend on its place in it."""
    for name, std in (("scale", SCALE_STD), ("aniso", ANISO_STD), ("contrast", CONTRAST_STD),
                      ("saturation", SATURATION_STD)):  # fmt: skip
        if name in d:
            d[f"{name}_factor"] = (d[name] * std).exp2()
    for name in ("rotate_frac", "aniso_angle"):
        if name in d:
            d[f"{name}_cos"], d[f"{name}_sin"] = d[name].cos(), d[name].sin()
    return d


def _apply(images: Tensor, d: dict[str, Tensor], weights: AugmentWeights) -> tuple[Tensor, Tensor]:
    """The transforms of ``d`` (this rank's images' draws) and the labels they make."""
    n, c, h, w = images.shape
    labels: list[Tensor] = []
    x = images.float()  # (N, C, H, W)
    if "xflip" in d:
        x = torch.where(d["xflip"].view(-1, 1, 1, 1) > 0, x.flip(3), x)
        labels.append(d["xflip"])
    if "yflip" in d:
        x = torch.where(d["yflip"].view(-1, 1, 1, 1) > 0, x.flip(2), x)
        labels.append(d["yflip"])

    # G maps an output pixel (coordinates from the image centre, in pixels) to where it samples the input.
    one, zero = torch.ones(n, device=x.device), torch.zeros(n, device=x.device)
    g = _Affine(one, zero, zero, zero, one, zero)
    moved = torch.zeros(n, dtype=torch.bool, device=x.device)
    if "scale" in d:
        s = d["scale_factor"]
        g, moved = g @ _scale(1 / s, 1 / s), moved | (d["scale"] != 0)
        labels.append(d["scale"])
    if "rotate_frac" in d:
        cos, sin = d["rotate_frac_cos"], d["rotate_frac_sin"]
        g, moved = g @ _rotate(cos, sin), moved | (d["rotate_frac"] != 0)
        labels += [cos - 1, sin]
    if "aniso" in d:
        a, s, cos, sin = d["aniso"], d["aniso_factor"], d["aniso_angle_cos"], d["aniso_angle_sin"]
        g, moved = g @ _rotate(cos, -sin) @ _scale(1 / s, s) @ _rotate(cos, sin), moved | (a != 0)
        labels += [a * cos, a * sin]
    if "translate_frac" in d:
        t = d["translate_frac"]  # (N, 2), in standard deviations
        shift = _translate(-t[:, 0] * w * TRANSLATE_FRAC_STD, -t[:, 1] * h * TRANSLATE_FRAC_STD)
        g, moved = g @ shift, moved | (t != 0).any(1)
        labels += [t[:, 0], t[:, 1]]
    if bool(moved.any()):
        x = x.clone()
        x[moved] = _resample(x[moved], _Affine(*(entry[moved] for entry in g)))

    if "brightness" in d:
        b = d["brightness"]
        x = torch.where((b != 0).view(-1, 1, 1, 1), x + (b * BRIGHTNESS_STD).view(-1, 1, 1, 1), x)
        labels.append(b)
    if "contrast" in d:
        k = d["contrast"]
        x = torch.where((k != 0).view(-1, 1, 1, 1), x * d["contrast_factor"].view(-1, 1, 1, 1), x)
        labels.append(k)
    if "saturation" in d:
        s = d["saturation"]
        if c > 1:  # a grey image has no saturation (EDM's colour matrix reduces to the identity there)
            mean = x.mean(dim=1, keepdim=True)  # the luma axis (1, 1, 1)/√3 projects onto the channel mean
            saturated = mean + (x - mean) * d["saturation_factor"].view(-1, 1, 1, 1)
            x = torch.where((s != 0).view(-1, 1, 1, 1), saturated, x)
        labels.append(s)
    out = torch.stack(labels, dim=1) if labels else x.new_zeros(n, 0)
    assert out.shape[1] == weights.label_dim
    return x.to(images.dtype), out.float()


def _resample(x: Tensor, g: _Affine) -> Tensor:
    """``x`` (M, C, H, W) sampled through the pixel-space maps ``g``: bilinear, reflection padding."""
    _, _, h, w = x.shape
    # grid_sample (align_corners=False) takes coordinates where the image spans [-1, 1]: g conjugated by the
    # pixel -> unit scale. The grid is built entry by entry, as affine_grid would with a batched matmul.
    a, b, tx, c, d, ty = (e.view(-1, 1, 1) for e in g)  # (M, 1, 1) each
    u = ((torch.arange(w, device=x.device) * 2 + 1) / w - 1).view(1, 1, w)  # output pixel centres
    v = ((torch.arange(h, device=x.device) * 2 + 1) / h - 1).view(1, h, 1)
    gx = a * u + (b * h / w) * v + tx * (2 / w)  # (M, H, W)
    gy = (c * w / h) * u + d * v + ty * (2 / h)
    grid = torch.stack([gx, gy], dim=-1)  # (M, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class _Affine(NamedTuple):
    """Per-image 2-D affine maps [[a, b, tx], [c, d, ty]], each entry (N,), composed entry by entry: a batched
    matmul rounds differently with the batch size, and an image's result must not depend on its batch."""

    a: Tensor
    b: Tensor
    tx: Tensor
    c: Tensor
    d: Tensor
    ty: Tensor

    def __matmul__(self, o: _Affine) -> _Affine:
        return _Affine(self.a * o.a + self.b * o.c, self.a * o.b + self.b * o.d, self.a * o.tx + self.b * o.ty + self.tx,
                       self.c * o.a + self.d * o.c, self.c * o.b + self.d * o.d, self.c * o.tx + self.d * o.ty + self.ty)  # fmt: skip


def _scale(sx: Tensor, sy: Tensor) -> _Affine:
    zero = torch.zeros_like(sx)
    return _Affine(sx, zero, zero, zero, sy, zero)


def _rotate(cos: Tensor, sin: Tensor) -> _Affine:
    zero = torch.zeros_like(cos)
    return _Affine(cos, -sin, zero, sin, cos, zero)


def _translate(tx: Tensor, ty: Tensor) -> _Affine:
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    return _Affine(one, zero, tx, zero, one, ty)
