"""What ``scripts/gpu_check.py`` launches, on a GPU and in its ``--cpu`` dry run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """What the check launches: the base run (also the reference of the power cut), its cut and the LoRA run."""

    config: str
    """configs/accelerate/NAME.yaml of every launch."""
    num_processes: int
    model: str
    batch: int
    steps: int
    """Steps per epoch."""
    epochs: int
    cut_step: int
    """The global step at which the second launch of the base run is killed."""
    data: list[str]
    lora_data: list[str]
    flops_image: tuple[int, int]
    """(channels, pixels per side) of the training images, for the FLOPs count."""
    paper: list[str]
    """The short run of the paper preset (configs/training/diffit_cifar10_paper.yaml) whose FID is taken."""
    fid: tuple[str, int]
    """(feature network, samples) of ``scripts/evaluate.py`` on that run."""
    extra: tuple[str, ...] = ()


def gpu_sizes(work: Path) -> Sizes:
    """3 epochs of 200 steps of batch 128 (a save every 25,600 images, half a CIFAR-10 epoch: long enough for
    a background save to end before the next, as in a real run), killed at step 300."""
    from benchmarks.fake_data import write_fake_cifar

    batch, steps = 128, 200
    root = write_fake_cifar(work / "data", train_images=batch * steps)
    paper = [*PAPER, "--set", f"data.root={root}", "--max-steps-per-epoch", "50", "--set", "warmup_steps=50",
             "--set", "evaluation.fid_num_samples=1000"]  # fmt: skip
    return Sizes("multi_gpu_zero2", 1, "diffit_cifar", batch, steps, epochs=3, cut_step=300,
                 data=["--data", "cifar10", "--set", f"data.root={root}"],
                 lora_data=["--data", "cifar100_trees_only", "--set", f"data.root={root}", "--batch-size", "16"],
                 flops_image=(3, 32), paper=paper, fid=("inception-v3", 5000))  # fmt: skip


def cpu_sizes(work: Path) -> Sizes:
    """The tests' smoke size: 3 epochs of 3 steps of batch 32 on the digits, killed at step 5."""
    paper = [*PAPER, "--model", "diffit_tiny", "--data", "digits", "--set", f"data.root={work / 'data'}",
             "--batch-size", "32", "--max-steps-per-epoch", "3", "--set", "warmup_steps=3", "--set", "edm.num_steps=4",
             "--set", "evaluation.fid_features=standin", "--set", "evaluation.fid_num_samples=64",
             "--set", "evaluation.fid_batch_size=32"]  # fmt: skip
    return Sizes("cpu_zero2_bf16", 2, "diffit_tiny", 32, 3, epochs=3, cut_step=5,
                 data=["--data", "digits"], lora_data=["--data", "digits_0_4", "--batch-size", "32"],
                 flops_image=(1, 16), paper=paper, fid=("standin", 64),
                 extra=("--learning-rate", "0.002", "--set", "edm.num_steps=4"))  # fmt: skip


PAPER = ["--config", str(REPO / "configs" / "training" / "diffit_cifar10_paper.yaml"), "--epochs", "1",
         "--set", "evaluation.fid_every_n_epochs=1", "--set", "logging.sample_every_n_epochs=0"]  # fmt: skip
"""The paper preset, cut to one short epoch with an FID at its end (so ``best`` is chosen by it)."""
