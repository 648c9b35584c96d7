"""Sample grids: one row per class, generated from the EMA weights with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from model import EDMSchedule, edm_sample
from model.lora import base_diffit
from trainer.config.schema import TrainConfig
from trainer.storage.atomic import atomic_write
from trainer.training.factory import load_trainable


@torch.no_grad()
def sample_grid(
    model: torch.nn.Module,
    *,
    class_names: list[str],
    per_class: int,
    schedule: EDMSchedule,
    guidance: float,
    seed: int,
    classes: list[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Images (rows·per_class, C, H, W) in [-1, 1]; the same seed gives the same noise every epoch.
    ``should_stop``: asked between the sampler's steps; True raises ``SamplingStopped``."""
    model.eval()
    net = base_diffit(model)
    rows = classes if classes is not None else list(range(len(class_names))) or [0]
    labels = torch.tensor([c for c in rows for _ in range(per_class)], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    shape = (len(labels), net.in_channels, net.image_size, net.image_size)
    noise = torch.randn(shape, generator=generator)
    device = next(model.parameters()).device
    images = edm_sample(
        model,
        noise.to(device),
        labels.to(device) if net.num_classes else None,
        num_classes=net.num_classes,
        schedule=schedule,
        guidance=guidance,
        should_stop=should_stop,
    )
    return images.cpu()


def save_grid(images: torch.Tensor, row_names: list[str], per_class: int, path: Path, scale: int = 2) -> None:
    """Write a PNG grid, ``per_class`` images per row, each row labelled with its class name."""
    n, c, h, w = images.shape
    rows = max(1, n // per_class)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if c == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    pad, label_width = 2, 8 * max((len(s) for s in row_names), default=0) + 6
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = Image.new("RGB", (label_width + per_class * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, col = divmod(i, per_class)
        tile = Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).resize(
            (w * scale, h * scale), Image.Resampling.NEAREST
        )
        canvas.paste(tile, (label_width + pad + col * cell_w, pad + r * cell_h))
    for r, name in enumerate(row_names[:rows]):
        draw.text((3, pad + r * cell_h + max(0, (h * scale - 10) // 2)), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))


class InferenceCopy:
    """Rank 0's CPU copy of the model for sample grids and the adapter export, built once; each use loads
    the current EMA weights into it."""

    def __init__(self, build: Callable[[], torch.nn.Module]) -> None:
        self._build = build
        self._model: torch.nn.Module | None = None

    def with_weights(self, ema: dict[str, torch.Tensor]) -> torch.nn.Module:
        if self._model is None:
            with torch.random.fork_rng(devices=[]):  # the throwaway init must not shift training's RNG
                self._model = self._build()
        load_trainable(self._model, {k: v.cpu() for k, v in ema.items()})
        return self._model


def draw_grid(model: torch.nn.Module, config: TrainConfig, class_names: list[str], path: Path,
              should_stop: Callable[[], bool] | None = None) -> None:  # fmt: skip
    """The run's sample grid: ``logging.samples_per_class`` guided samples per class, EDM's sampler, for at
    most ``logging.sample_max_classes`` classes (spread evenly over them); ``should_stop`` as in
    ``sample_grid``."""
    logging, edm = config.logging, config.edm
    rows = spread(len(class_names), logging.sample_max_classes)
    images = sample_grid(
        model,
        class_names=class_names,
        per_class=logging.samples_per_class,
        schedule=EDMSchedule(edm.num_steps, edm.sigma_min, edm.sigma_max, edm.rho),
        guidance=logging.guidance,
        seed=config.seed,
        classes=rows,
        should_stop=should_stop,
    )
    save_grid(images, [class_names[r] for r in rows], logging.samples_per_class, path)


def spread(count: int, most: int) -> list[int]:
    """``min(count, most)`` indices of ``range(count)`` spread evenly, first and last included."""
    if count <= most:
        return list(range(count))
    if most == 1:
        return [0]
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})
