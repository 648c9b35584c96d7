"""adapter: the size of a LoRA run's checkpoint, over its base's and over the analytic size.

Bytes of a LoRA run's epoch checkpoint (default blockwise config, CIFAR-100 trees) ÷ the bytes of the base
checkpoint file it adapts (``epoch_NNN.ckpt``: weights + EMA), and ÷ the analytic size: trainable
parameters × 4 bytes × 4 states (weights, EMA, Adam exp_avg, exp_avg_sq).
"""

from __future__ import annotations

from benchmarks.harness import Figure, figure
from benchmarks.measurements import Measurements

TARGET_BASE = ("<=", 0.05)
TARGET_ANALYTIC = ("<=", 1.1)


def measure(m: Measurements) -> list[Figure]:
    import torch

    from trainer.checkpoint.folder import MANIFESTS

    run = m.lora_run
    manifests = sorted((run.checkpoints / MANIFESTS).glob("epoch_*.json"))
    adapter, base = run.ckpt(manifests[-1].stem), run.stored_base
    ckpt = torch.load(adapter, map_location="cpu", weights_only=True)
    trainable = sum(t.numel() for t in ckpt["lora_state_dict"].values())
    analytic = trainable * 4 * 4  # fp32 weights, EMA, Adam exp_avg and exp_avg_sq
    size, base_size = adapter.stat().st_size, base.stat().st_size
    return [
        figure(TARGET_BASE, "adapter size (LoRA ckpt / base ckpt)", size / base_size,
               f"{size / 1e6:.2f} MB vs {base_size / 1e6:.1f} MB (base epoch file: weights + EMA)"),
        figure(TARGET_ANALYTIC, "adapter size (LoRA ckpt / analytic)", size / analytic,
               f"analytic {trainable:,} trainable parameters x 4 B x 4 states = {analytic / 1e6:.2f} MB"),
    ]  # fmt: skip
