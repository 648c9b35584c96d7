"""Sample-quality benchmark: do guided samples of the demo model show the digit they were asked for?

    python benchmarks/sample_quality.py                 # train the demo configuration (as `make demo`), evaluate
    python benchmarks/sample_quality.py --run RUN_DIR   # evaluate a run folder, a checkpoint root or a .ckpt

Samples ``--per-class`` images of every digit from the EMA weights (Heun, classifier-free guidance) and
classifies them with an SVC fitted on the REAL 8x8 scikit-learn digits, independent of the diffusion
model. Samples are average-pooled 16x16 -> 8x8 and mapped to the originals' 0..16 range first. The figure
is the share of samples assigned to the class they were conditioned on, per class and overall. Two sanity
figures come with it: the classifier's accuracy on held-out real digits (8x8 originals), and on the
trainer's 16x16 validation images sent through the same pooling as the samples (checks the pooling).

The result is printed and, unless ``--no-record``, appended as a row to ``benchmarks/sample_quality.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from model import EDMSchedule, edm_sample  # noqa: E402
from trainer.checkpoint.formats import load_checkpoint_file  # noqa: E402
from trainer.config.schema import TrainConfig, from_dict  # noqa: E402
from trainer.runs.layout import kind_root  # noqa: E402
from trainer.runs.metadata import read_metadata  # noqa: E402
from trainer.runs.store import run_numbers  # noqa: E402
from trainer.training.factory import build_model, load_data, load_weights  # noqa: E402

RESULTS = REPO / "benchmarks" / "sample_quality.md"
TABLE_HEADER = (
    "| date (UTC) | checkpoint | config | training time | samples | classifier on real digits | "
    "correct class, per digit 0-9 (%) | correct class, overall |\n"
    "|---|---|---|---|---|---|---|---|\n"
)


# --------------------------------------------------------------------------------------------------
# The independent judge: a classifier of real digits
# --------------------------------------------------------------------------------------------------


def fit_digit_classifier(seed: int = 0) -> tuple[Any, float]:
    """SVC on the 8x8 originals (0..16); returns it and its accuracy on a held-out quarter of them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    x_fit, x_held, y_fit, y_held = train_test_split(
        digits.data, digits.target, test_size=0.25, stratify=digits.target, random_state=seed
    )
    # gamma=0.001 is scikit-learn's own digits example (~99% held out); it suits features on 0..16.
    classifier = SVC(gamma=0.001, C=10.0).fit(x_fit, y_fit)
    return classifier, float(classifier.score(x_held, y_held))


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 16, 16) images in [-1, 1] -> (N, 64) features like the 8x8 originals, on 0..16."""
    pooled = F.avg_pool2d(images.float().clamp(-1, 1), kernel_size=images.shape[-1] // 8)  # (N, 1, 8, 8)
    return ((pooled + 1) * 8).flatten(1).numpy()  # [-1, 1] -> [0, 16]


# --------------------------------------------------------------------------------------------------
# Checkpoints and sampling
# --------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: Path, which: str) -> Path:
    """A ``.ckpt`` file as is; a run folder -> its ``checkpoints/{which}.ckpt``; a checkpoint root -> its
    newest base run's."""
    if path.is_file():
        return path
    if (path / "checkpoints").is_dir():
        return path / "checkpoints" / f"{which}.ckpt"
    numbers = run_numbers(kind_root(path, "base"))
    if not numbers:
        raise SystemExit(f"{path} is neither a .ckpt file, a run folder nor a checkpoint root with runs")
    return kind_root(path, "base") / f"run_{numbers[-1]:03d}" / "checkpoints" / f"{which}.ckpt"


def load_ema_model(ckpt_path: Path) -> tuple[torch.nn.Module, TrainConfig, dict[str, Any]]:
    ckpt = load_checkpoint_file(ckpt_path)
    config = from_dict(TrainConfig, ckpt["config"])
    model = build_model(config)
    # The EMA holds parameters only; buffers come from the constructor.
    load_weights(model, ckpt["ema_state_dict"])
    return model.eval(), config, ckpt


@torch.no_grad()
def sample_classes(
    model: Any, *, per_class: int, num_steps: int, guidance: float, seed: int, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` guided samples of every class: images (K·per_class, C, H, W) in [-1, 1], labels."""
    edm = config.edm
    schedule = EDMSchedule(num_steps, edm.sigma_min, edm.sigma_max, edm.rho)
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c in range(model.num_classes):  # one class per batch: ~100-image forwards are the fast size on CPU
        noise = torch.randn(
            (per_class, model.in_channels, model.image_size, model.image_size), generator=generator
        )
        wanted = torch.full((per_class,), c, dtype=torch.long)
        images.append(
            edm_sample(
                model, noise, wanted, num_classes=model.num_classes, schedule=schedule, guidance=guidance
            )
        )
        labels.append(wanted)
    return torch.cat(images), torch.cat(labels)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(
    ckpt_path: Path, *, per_class: int, num_steps: int, guidance: float, seed: int
) -> dict[str, Any]:
    start = time.perf_counter()
    classifier, real_accuracy = fit_digit_classifier(seed)
    model, config, ckpt = load_ema_model(ckpt_path)

    # The same pooling on real 16x16 validation images: a low figure here would mean the pipeline is off.
    val = load_data(config).val
    pooled_accuracy = None
    if val is not None:
        real16, real_labels = val.batch(torch.arange(len(val)))
        pooled_accuracy = float(classifier.score(to_digit_features(real16), real_labels.numpy()))

    images, labels = sample_classes(
        model, per_class=per_class, num_steps=num_steps, guidance=guidance, seed=seed, config=config
    )
    predicted = classifier.predict(to_digit_features(images))
    correct = predicted == labels.numpy()
    per_digit = [float(correct[labels.numpy() == c].mean()) for c in range(model.num_classes)]
    return {
        "checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "config": config,
        "per_class": per_class,
        "num_steps": num_steps,
        "guidance": guidance,
        "classifier_real_accuracy": real_accuracy,
        "classifier_pooled_val_accuracy": pooled_accuracy,
        "per_digit": per_digit,
        "overall": float(correct.mean()),
        "confusions": _top_confusions(labels.numpy(), predicted),
        "eval_seconds": time.perf_counter() - start,
    }


def _top_confusions(labels: np.ndarray, predicted: np.ndarray, n: int = 3) -> list[tuple[int, int, int]]:
    """The most frequent (intended, predicted, count) mistakes."""
    pairs: dict[tuple[int, int], int] = {}
    for want, got in zip(labels.tolist(), predicted.tolist()):
        if want != got:
            pairs[(want, got)] = pairs.get((want, got), 0) + 1
    return [(w, g, k) for (w, g), k in sorted(pairs.items(), key=lambda item: -item[1])[:n]]


def training_time(ckpt_path: Path) -> dict[str, float | None]:
    """Seconds from the run's metadata: epochs (train + validation only) and the run's whole span."""
    run = ckpt_path.resolve().parent.parent
    try:
        meta = read_metadata(run)
    except (OSError, ValueError):
        return {"epoch_seconds": None, "run_seconds": None}
    epochs = sum(entry.get("seconds", 0.0) for entry in meta.get("history", []))
    span = None
    if meta.get("created_at") and meta.get("updated_at"):
        span = (
            datetime.fromisoformat(meta["updated_at"]) - datetime.fromisoformat(meta["created_at"])
        ).total_seconds()
    return {"epoch_seconds": epochs, "run_seconds": span}


def config_summary(config: TrainConfig, global_step: int | None) -> str:
    m = config.model
    return (
        f"{m.name} {m.channels}x{m.blocks_per_stage} mlp{m.mlp_ratio:g} t{m.time_dim}; "
        f"{config.epochs} ep, batch {config.batch_size}, {global_step} steps, lr {config.learning_rate:g} "
        f"{config.lr_schedule} warmup {config.warmup_steps}, EMA {config.ema_halflife_kimg:g} kimg "
        f"(ramp-up {config.ema_rampup_ratio})"
    )


# --------------------------------------------------------------------------------------------------
# Training the demo configuration
# --------------------------------------------------------------------------------------------------


def train_demo(checkpoint_root: Path) -> float:
    """Run `make demo`'s base training (scripts/demo.py) into ``checkpoint_root``; returns its wall time."""
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    start = time.perf_counter()
    demo.train_base(checkpoint_root)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def report(result: dict[str, Any], times: dict[str, float | None], demo_seconds: float | None) -> str:
    lines = [
        f"Checkpoint: {result['checkpoint']} (epoch {result['epoch']}, step {result['global_step']})",
        f"Config: {config_summary(result['config'], result['global_step'])}",
        f"Classifier (SVC) on held-out real 8x8 digits: {result['classifier_real_accuracy']:.1%}",
    ]
    if result["classifier_pooled_val_accuracy"] is not None:
        lines.append(
            f"Classifier on real 16x16 validation digits pooled like the samples: "
            f"{result['classifier_pooled_val_accuracy']:.1%}"
        )
    lines.append(
        f"Samples: {result['per_class']} per class, {result['num_steps']} Heun steps, "
        f"guidance {result['guidance']:g}"
    )
    lines.append("Share assigned to the intended class:")
    lines += [f"  {c}: {share:6.1%}" for c, share in enumerate(result["per_digit"])]
    lines.append(f"  overall: {result['overall']:.1%}")
    if result["confusions"]:
        lines.append(
            "Most frequent mistakes (intended -> classified, count): "
            + ", ".join(f"{w}->{g} ({k})" for w, g, k in result["confusions"])
        )
    if demo_seconds is not None:
        lines.append(f"Demo wall time (DeepSpeed start-up, training, run listing): {demo_seconds:.0f} s")
    if times["run_seconds"] is not None:
        lines.append(
            f"Run time from its metadata: {times['run_seconds']:.0f} s "
            f"(epochs alone, train + validation: {times['epoch_seconds']:.0f} s)"
        )
    lines.append(f"Evaluation took {result['eval_seconds']:.0f} s")
    return "\n".join(lines)


def record(result: dict[str, Any], times: dict[str, float | None], demo_seconds: float | None) -> None:
    """Append one row to benchmarks/sample_quality.md (creating it with its header)."""
    config = result["config"]
    timing = []
    if demo_seconds is not None:
        timing.append(f"demo {demo_seconds:.0f} s")
    if times["run_seconds"] is not None:
        timing.append(f"run {times['run_seconds']:.0f} s")
    ckpt = Path(result["checkpoint"])
    row = [
        datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        f"{ckpt.name} (epoch {result['epoch']})",
        config_summary(config, result["global_step"]),
        ", ".join(timing) or "n/a",
        f"{result['per_class']}/class, {result['num_steps']} Heun, guidance {result['guidance']:g}",
        f"{result['classifier_real_accuracy']:.1%}",
        " ".join(f"{share * 100:.0f}" for share in result["per_digit"]),
        f"**{result['overall']:.1%}**",
    ]
    if not RESULTS.exists():  # an existing file may carry notes above its table: only append
        RESULTS.write_text(
            "# Sample quality of the demo model\n\n"
            "Written by `benchmarks/sample_quality.py`: guided samples of each digit from the EMA weights, "
            "judged by an SVC fitted on the real 8x8 scikit-learn digits (samples average-pooled to 8x8). "
            "Times are on the 2-core CPU of the demo (2 processes, DeepSpeed ZeRO-2).\n\n" + TABLE_HEADER
        )
    with open(RESULTS, "a") as f:
        f.write("| " + " | ".join(row) + " |\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="run folder, checkpoint root or .ckpt to evaluate")
    parser.add_argument(
        "--checkpoint-root",
        type=Path,
        help="where to train when --run is not given (default: a temp folder in demo_output/)",
    )
    # last, not best: best is picked by the raw model's validation loss, a noisy proxy that says little
    # about the EMA's samples; with the cosine schedule the last epoch's EMA is the most trained one.
    parser.add_argument("--which", choices=["last", "best"], default="last", help="checkpoint of a run")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=18, help="Heun steps (2·steps-1 evaluations)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    parser.add_argument("--no-record", action="store_true", help=f"don't append to {RESULTS.name}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    demo_seconds = None
    # The default is a throwaway folder in demo_output/ (git-ignored).
    (REPO / "demo_output").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sample_quality_", dir=REPO / "demo_output") as tmp:
        target = args.run
        if target is None:
            target = args.checkpoint_root or Path(tmp)
            demo_seconds = train_demo(target)
        ckpt = resolve_checkpoint(target, args.which)
        result = evaluate(
            ckpt, per_class=args.per_class, num_steps=args.steps, guidance=args.guidance, seed=args.seed
        )
        times = training_time(ckpt)
    print("\n" + report(result, times, demo_seconds))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    if not args.no_record:
        record(result, times, demo_seconds)
        print(f"Recorded in {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
