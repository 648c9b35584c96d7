"""EDM's non-leaking augmentation (``data.augment_p``): the pipe's promises (p = 0 is nothing, draws made for the
global batch, labels zero where nothing was done), the model's label input (none = zero, checkpoints of
models without it unchanged), the config keys (null resolves, a model that would leak is refused, runs recorded
before the keys resume), and a run with augmentation resumes bit-identically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from model import AUGMENT_DIM, AugmentWeights, DiffiT, augment, edm_loss
from tests.helpers import OLD_RUNS, assert_same_tensors, base_argv, load_ckpt, metadata, run_cli
from trainer.config.changes import resume_changes, with_added_keys
from trainer.config.files import build_config, diff_keys
from trainer.config.schema import ConfigError, ModelConfig, TrainConfig
from trainer.training.factory import resolve_augment_dim

XFLIP_ONLY = AugmentWeights(yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


def images(n: int = 16, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# The pipe
# --------------------------------------------------------------------------------------------------


def test_edm_cifar10_recipe_has_a_label_of_nine() -> None:
    assert AUGMENT_DIM == AugmentWeights().label_dim == 9
    assert XFLIP_ONLY.label_dim == 1
    assert AugmentWeights(brightness=1, contrast=1, saturation=1).label_dim == 12


def test_p_zero_returns_the_images_untouched_and_draws_nothing() -> None:
    x, g = images(), seeded()
    state = g.get_state()
    out, labels = augment(x, 0.0, g)
    assert out is x
    assert labels.shape == (16, AUGMENT_DIM) and not labels.any()
    assert torch.equal(g.get_state(), state)


def test_labels_are_zero_exactly_where_an_image_was_left_as_it_was() -> None:
    x = images(64)
    out, labels = augment(x, 0.12, seeded())
    assert labels.shape == (64, AUGMENT_DIM) and labels.dtype == torch.float32
    untouched = ~labels.bool().any(dim=1)
    assert 0 < int(untouched.sum()) < 64
    assert torch.equal(out[untouched], x[untouched])
    assert all(not torch.equal(out[i], x[i]) for i in torch.nonzero(~untouched).flatten())


def test_the_same_seed_gives_the_same_augmentation_and_another_seed_another() -> None:
    x = images()
    a, la = augment(x, 0.5, seeded(3))
    b, lb = augment(x, 0.5, seeded(3))
    _, lc = augment(x, 0.5, seeded(4))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize(
    "weights", [AugmentWeights(), AugmentWeights(brightness=1, contrast=1, saturation=1)]
)
def test_shares_of_the_global_batch_put_together_are_the_whole_batch(
    world: int, weights: AugmentWeights
) -> None:
    """Processes and micro-batches each augment their slice; together they are the one-process result."""
    x = images(24)
    whole, whole_labels = augment(x, 0.5, seeded(), weights=weights)
    n = 24 // world
    parts = [augment(x[r * n : (r + 1) * n], 0.5, seeded(), (r, world), weights) for r in range(world)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole)
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_labels)


def test_x_flips_are_exact_and_every_other_image_gets_one() -> None:
    x = images(64)
    out, labels = augment(x, 0.12, seeded(), weights=XFLIP_ONLY)
    flipped = labels[:, 0] == 1
    assert labels.shape == (64, 1) and set(labels[:, 0].tolist()) == {0.0, 1.0}
    assert 16 < int(flipped.sum()) < 48  # p·1e8 ≥ 1: a fair coin per image, whatever p is
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])


def test_colour_transforms_change_colour_images_and_leave_grey_saturation_alone() -> None:
    colour = AugmentWeights(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0, saturation=1)
    rgb, labels = augment(images(32), 0.5, seeded(), weights=colour)
    assert labels.shape == (32, 1) and labels.any()
    assert not torch.equal(rgb, images(32))
    grey, _ = augment(images(32, channels=1), 0.5, seeded(), weights=colour)
    assert torch.equal(grey, images(32, channels=1))


def test_geometry_follows_edm_conventions() -> None:
    """A quarter turn through the resampler is a pixel rotation, a translation by a pixel a pixel's shift."""
    from model.augment import _resample, _rotate, _translate

    x = images(2)
    quarter = _resample(x, _rotate(torch.zeros(2), torch.ones(2)))
    assert torch.allclose(quarter, torch.rot90(x, 1, (2, 3)), atol=1e-5)
    shifted = _resample(x, _translate(torch.full((2,), -1.0), torch.zeros(2)))
    assert torch.allclose(shifted[..., 1:], x[..., :-1], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The model's label input, and the loss
# --------------------------------------------------------------------------------------------------


def tiny(augment_dim: int = 0) -> DiffiT:
    torch.manual_seed(0)
    return DiffiT(image_size=16, in_channels=1, channels=[16, 32], blocks_per_stage=1, window_size=4, head_dim=8,
                  time_dim=64, mlp_ratio=4.0, num_classes=10, label_dropout=0.1, augment_dim=augment_dim)  # fmt: skip


def test_no_augment_labels_is_the_zero_label_and_other_labels_change_the_output() -> None:
    model = tiny(AUGMENT_DIM).eval()
    x, sigma, labels = (
        torch.randn(4, 1, 16, 16),
        torch.tensor([0.1, 1.0, 2.0, 5.0]),
        torch.tensor([0, 1, 2, 10]),
    )
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers hide the embeddings' effect
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=seeded()) * 0.1)
        none = model(x, sigma, labels)
        zeros = model(x, sigma, labels, torch.zeros(4, AUGMENT_DIM))
        some = model(x, sigma, labels, torch.ones(4, AUGMENT_DIM))
    assert torch.equal(none, zeros)
    assert not torch.equal(none, some)
    with pytest.raises(ValueError, match="augment_dim=0"):
        tiny()(x, sigma, labels, torch.zeros(4, AUGMENT_DIM))


def test_augment_dim_adds_one_weight_and_leaves_the_others_as_they_were() -> None:
    plain, conditioned = tiny().state_dict(), tiny(AUGMENT_DIM).state_dict()
    assert list(conditioned) == [*plain, "augment_embed.weight"]
    assert conditioned["augment_embed.weight"].shape == (64, AUGMENT_DIM)
    assert_same_tensors(plain, {k: v for k, v in conditioned.items() if k != "augment_embed.weight"})


def test_a_checkpoint_of_a_model_from_before_augmentation_loads() -> None:
    """Recorded without ``model.augment_dim``: it means 0, and the state dict's keys are the model's."""
    from trainer.api import load_model

    ckpt = OLD_RUNS[0] / "base_training" / "run_001" / "checkpoints" / "epoch_001.ckpt"
    model = load_model(ckpt)
    assert model.augment_embed is None  # type: ignore[union-attr]
    assert set(model.state_dict()) >= set(load_ckpt(ckpt)["state_dict"])


def test_the_loss_passes_augment_labels_only_when_given() -> None:
    calls: list[int] = []

    def model(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(len(args))
        return x

    x, labels = images(4, channels=1), torch.zeros(4, dtype=torch.long)
    edm_loss(model, x, labels, num_classes=10, label_dropout=0.1, generator=seeded())
    edm_loss(model, x, labels, num_classes=10, label_dropout=0.1, generator=seeded(),
             augment_labels=torch.zeros(4, AUGMENT_DIM))  # fmt: skip
    assert calls == [2, 3]


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def config(*overrides: tuple[str, Any]) -> TrainConfig:
    return build_config({"model": "diffit_tiny", "data": "digits"}, list(overrides))


def test_null_augment_dim_takes_the_label_size_with_augmentation_and_zero_without() -> None:
    on, off = config(("data.augment_p", 0.12)), config()
    resolve_augment_dim(on)
    resolve_augment_dim(off)
    assert on.model.augment_dim == AUGMENT_DIM and off.model.augment_dim == 0
    assert "augment_dim" in ModelConfig().architecture()


def test_a_model_that_would_leak_the_augmentation_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.augment_dim is 0: the augmentations would leak") as e:
        resolve_augment_dim(config(("data.augment_p", 0.12), ("model.augment_dim", 0)))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"model\.augment_dim must be null, 0 or 9"):
        resolve_augment_dim(config(("model.augment_dim", 5)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([("data.augment_p", 1.0)], "'data.augment_p' must be in [0, 1)"),
        ([("data.augment_p", -0.1)], "'data.augment_p' must be in [0, 1)"),
        ([("data.augment_p", 0.12), ("data.random_flip", True)], "pass --set data.random_flip=false"),
    ],
)
def test_bad_augmentation_settings_are_refused_in_one_line(overrides: list, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def old_stored_config() -> dict[str, Any]:
    stored = json.loads((OLD_RUNS[0] / "base_training" / "run_001" / "config.json").read_text())
    assert "augment_p" not in stored["data"] and "augment_dim" not in stored["model"]
    return stored


def test_a_run_recorded_before_augmentation_resumes_unchanged() -> None:
    stored = old_stored_config()
    resumed = build_config(stored)
    resolve_augment_dim(resumed)
    assert resume_changes(stored, resumed.to_dict(), set()) == []
    assert diff_keys(with_added_keys(stored)["model"], resumed.to_dict()["model"]) == []


def test_augmentation_cannot_be_switched_on_when_a_run_recorded_before_it_resumes() -> None:
    stored = old_stored_config()
    resumed = build_config(stored, [("data.augment_p", 0.12)])
    resolve_augment_dim(resumed)
    with pytest.raises(ConfigError, match=r"a resume cannot change data.augment_p \(0.0 -> 0.12\)"):
        resume_changes(stored, resumed.to_dict(), {"data.augment_p"})


# --------------------------------------------------------------------------------------------------
# A run with augmentation
# --------------------------------------------------------------------------------------------------

AUGMENTED = ("--set", "data.augment_p=0.5", "--set", "logging.sample_every_n_epochs=0")


@pytest.mark.slow
def test_a_run_with_augmentation_resumes_bit_identically(tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed, it ends with the weights of the run trained straight through: the
    augmentation is a function of (seed, step), like the loss noise."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for result in [
        run_cli("base", base_argv(straight, "--epochs", "2", *AUGMENTED)),
        run_cli("base", base_argv(resumed, "--epochs", "1", *AUGMENTED)),
        run_cli("base", base_argv(resumed, "--epochs", "2", "--resume", "1", *AUGMENTED)),
    ]:
        assert result.returncode == 0, result.stderr[-3000:]
    a = load_ckpt(straight / "base_training" / "run_001" / "checkpoints" / "last.ckpt")
    b = load_ckpt(resumed / "base_training" / "run_001" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert a["config"]["model"]["augment_dim"] == AUGMENT_DIM and a["config"]["data"]["augment_p"] == 0.5
    assert "augment_embed.weight" in a["state_dict"]
    assert_same_tensors(a["state_dict"], b["state_dict"])
    assert_same_tensors(a["ema_state_dict"], b["ema_state_dict"])
    history = [metadata(run / "base_training" / "run_001")["history"] for run in (straight, resumed)]
    assert [h["train_loss"] for h in history[0]] == [h["train_loss"] for h in history[1]]
