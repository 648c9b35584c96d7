"""Training FLOPs per image of the benchmarked model (``perf.py --flops``), for MFU on GPUs (gpu.md)."""

from __future__ import annotations

from benchmarks.settings import MODEL


def training_flops_per_image(batch: int = 2) -> float:
    """FLOPs of one forward + backward of the model per training image (torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model import edm_loss
    from trainer.config.files import build_config
    from trainer.config.schema import CONFIG_DIR, TrainConfig
    from trainer.training.factory import build_model

    config: TrainConfig = build_config(CONFIG_DIR / "training" / "base_training.yaml", [("model", MODEL)])
    config.model.in_channels, config.model.num_classes = 3, 10
    model = build_model(config).train()
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        loss = edm_loss(model, images, labels, num_classes=10, label_dropout=0.1, generator=torch.Generator())
        loss.backward()
    return counter.get_total_flops() / batch
