"""Training FLOPs per image of the benchmarked model (``perf.py --flops``), for MFU on GPUs (gpu.md)."""

from __future__ import annotations

from benchmarks.settings import MODEL


def training_flops_per_image(
    batch: int = 2, model: str = MODEL, *, image_size: int = 32, channels: int = 3, num_classes: int = 10
) -> float:
    """FLOPs of one forward + backward of ``model`` (a preset of configs/model/) per training image of
    ``channels`` x ``image_size`` x ``image_size`` pixels (torch's FlopCounterMode); CIFAR-10 by default."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model import edm_loss
    from trainer.config.files import build_config
    from trainer.config.schema import CONFIG_DIR, TrainConfig
    from trainer.training.factory import build_model

    config: TrainConfig = build_config(CONFIG_DIR / "training" / "base_training.yaml", [("model", model)])
    config.model.in_channels, config.model.num_classes = channels, num_classes
    config.model.image_size = config.model.image_size or image_size  # a preset without one takes the data's
    net = build_model(config).train()
    images = torch.randn(batch, channels, image_size, image_size)
    labels = torch.randint(0, num_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        loss = edm_loss(
            net, images, labels, num_classes=num_classes, label_dropout=0.1, generator=torch.Generator()
        )
        loss.backward()
    return counter.get_total_flops() / batch
