"""The overhead figure's baseline: a minimal hand-written Accelerate loop, run as its own process, plain or
under ``accelerate launch``, like the trainer.

    python benchmarks/hand_loop.py DATA_ROOT --batch-size 4 --steps-per-epoch 10 --epochs 40
    accelerate launch --config_file configs/accelerate/NAME.yaml benchmarks/hand_loop.py DATA_ROOT ...
    python -m benchmarks.hand_loop DATA_ROOT ...

DATA_ROOT holds a CIFAR-10 folder (``benchmarks.fake_data.write_fake_cifar`` writes a fake one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script: import from the checkout, and this folder's modules as benchmarks.*
    sys.path[0] = str(REPO)

from benchmarks.settings import BATCH, EPOCHS, HAND_LOOP_WARMUP_STEPS, MODEL, STEPS_PER_EPOCH  # noqa: E402


def bench_overrides(
    data_root: Path, *, batch: int, steps: int, epochs: int, model: str = MODEL
) -> list[tuple[str, Any]]:
    """The run both sides train: diffit_cifar (or ``model``) on the fake CIFAR-10 folder."""
    return [("model", model), ("data", "cifar10"), ("data.root", str(data_root)), ("batch_size", batch),
            ("max_steps_per_epoch", steps), ("epochs", epochs)]  # fmt: skip


def prepare(
    data_root: Path, *, batch: int, steps: int, epochs: int, model_name: str = MODEL,
    model_overrides: list[tuple[str, Any]] | None = None, deepspeed: dict[str, Any] | None = None,
    with_model: bool = True,
) -> tuple[Any, ...]:  # fmt: skip
    """(config, data splits, accelerator, model, optimizer): what the trainer builds, built plainly;
    ``model_overrides``: config keys set after the model's (``("model.time_dim", 1024)``); ``deepspeed``:
    further keys of the DeepSpeed config, if DeepSpeed is on; without ``with_model``, model and optimizer
    are None (the accelerator prepares nothing)."""
    import torch

    from launch import build_accelerator, configure_deepspeed
    from trainer.config.files import build_config
    from trainer.config.schema import CONFIG_DIR, TrainConfig
    from trainer.training.factory import build_model, load_data, resolve_model_against_data

    config: TrainConfig = build_config(
        CONFIG_DIR / "training" / "base_training.yaml",
        bench_overrides(data_root, batch=batch, steps=steps, epochs=epochs, model=model_name)
        + list(model_overrides or []),
    )
    splits = load_data(config)
    resolve_model_against_data(config, splits)
    accelerator = build_accelerator()  # the plain Accelerator, with the gloo/DeepSpeed setup a CPU needs
    configure_deepspeed(
        accelerator,
        micro_batch=batch // accelerator.num_processes,
        accumulation=1,
        grad_clip=config.grad_clip,
    )
    if deepspeed and accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config.update(deepspeed)
    if not with_model:
        return config, splits, accelerator, None, None
    torch.manual_seed(config.seed)
    model = build_model(config)
    betas = (config.betas[0], config.betas[1])
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    return config, splits, accelerator, model, optimizer


def batch_loss(
    config: Any, model: Any, images: Any, labels: Any, generator: Any, share: tuple[int, int]
) -> Any:
    """The EDM loss of this rank's ``share`` of a batch, as the trainer computes it."""
    from model import edm_loss

    return edm_loss(model, images, labels, num_classes=int(config.model.num_classes or 0),
                    label_dropout=config.model.label_dropout, generator=generator, p_mean=config.edm.p_mean,
                    p_std=config.edm.p_std, sigma_data=config.edm.sigma_data, share=share)  # fmt: skip


def hand_loop(data_root: Path, *, batch: int, steps: int, epochs: int, warmup_steps: int) -> None:
    """The simplest loop that trains the same model on the same batches: ``warmup_steps`` steps, then
    ``epochs`` epochs of ``steps`` steps. Rank 0 prints "Epoch 0/N: warm-up" after the warm-up and
    "Epoch K/N: hand loop" after each epoch, for whoever launched it to time (``time_sliced``)."""
    import torch

    from data.order import epoch_order

    config, splits, accelerator, model, optimizer = prepare(
        data_root, batch=batch, steps=steps, epochs=epochs
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    deepspeed = accelerator.state.deepspeed_plugin is not None
    model.train()
    generator = torch.Generator(accelerator.device).manual_seed(config.seed)
    for epoch in range(epochs + 1):  # "epoch" 0: the warm-up steps
        order = epoch_order(
            len(splits.train), batch, seed=config.seed, epoch=epoch, random_flip=config.data.random_flip
        )
        for step in range(steps if epoch else warmup_steps):
            indices, flips = order.for_rank(step % order.steps, rank, world)  # warm-up may wrap around
            images, labels = splits.train.batch(indices, flips)
            loss = batch_loss(config, model, images.to(accelerator.device), labels.to(accelerator.device),
                              generator, share=(rank, world))  # fmt: skip
            accelerator.backward(loss)
            if not deepspeed:  # DeepSpeed clips inside its step
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # what any loop logs; also waits for the step on a GPU
        if rank == 0:
            print(f"Epoch {epoch}/{epochs}: {'hand loop' if epoch else 'warm-up'}", flush=True)
    accelerator.end_training()


def command_args(data_root: Path, *, batch: int, steps: int, epochs: int) -> list[str]:
    """The arguments of this script for ``hand_loop(data_root, ...)`` with the default warm-up."""
    return [
        str(data_root),
        "--batch-size",
        str(batch),
        "--steps-per-epoch",
        str(steps),
        "--epochs",
        str(epochs),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_root", type=Path, metavar="DATA_ROOT")
    parser.add_argument("--batch-size", type=int, default=BATCH, help=f"global batch (default {BATCH})")
    parser.add_argument("--steps-per-epoch", type=int, default=STEPS_PER_EPOCH)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--warmup-steps", type=int, default=HAND_LOOP_WARMUP_STEPS)
    args = parser.parse_args(argv)
    hand_loop(args.data_root, batch=args.batch_size, steps=args.steps_per_epoch, epochs=args.epochs,
              warmup_steps=args.warmup_steps)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
