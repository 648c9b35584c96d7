"""Promises of the model package: DiffiT shapes and names, EDM preconditioning, loss and sampler."""

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

from model import DiffiT, EDMSchedule, count_parameters, edm_loss, edm_sample

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"
MODEL_CONFIG_FIELDS = {
    "name",
    "image_size",
    "channels",
    "blocks_per_stage",
    "window_size",
    "head_dim",
    "time_dim",
    "mlp_ratio",
    "label_dropout",
    "dropout",
}


def load_preset(name: str, *, in_channels: int, num_classes: int, image_size: int) -> dict[str, Any]:
    """Preset YAML as DiffiT kwargs, with the dataset-provided fields filled in."""
    cfg = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    cfg.pop("name")
    cfg["image_size"] = cfg["image_size"] or image_size
    return dict(cfg, in_channels=in_channels, num_classes=num_classes)


def tiny(num_classes: int = 10, **overrides: Any) -> DiffiT:
    torch.manual_seed(0)
    kwargs = load_preset("diffit_tiny", in_channels=1, num_classes=num_classes, image_size=16)
    return DiffiT(**{**kwargs, **overrides})


def randomize_zero_layers(model: nn.Module) -> None:
    """Give zero-initialised weights random values, so an untrained model depends on σ and labels."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


# ----------------------------------------------------------------------------- DiffiT


def test_diffit_output_has_input_shape() -> None:
    model = tiny()
    x = torch.randn(3, 1, 16, 16)
    out = model(x, torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 5, 10]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert model(x, torch.tensor(2.0)).shape == x.shape  # scalar σ, no labels (all null)


def test_registry_sizes_have_expected_parameter_counts() -> None:
    for name in ("diffit_tiny", "diffit_demo", "diffit_cifar"):
        assert set(yaml.safe_load((PRESETS / f"{name}.yaml").read_text())) == MODEL_CONFIG_FIELDS, name
    # Built on CPU (~0.5 s for cifar): the meta device would cost more on first use than it saves.
    tiny_model = DiffiT(**load_preset("diffit_tiny", in_channels=1, num_classes=10, image_size=16))
    demo = DiffiT(**load_preset("diffit_demo", in_channels=1, num_classes=10, image_size=16))
    cifar = DiffiT(**load_preset("diffit_cifar", in_channels=3, num_classes=10, image_size=32))
    assert count_parameters(tiny_model) <= 1_000_000
    assert 300_000 <= count_parameters(demo) <= 2_000_000
    assert 15_000_000 <= count_parameters(cifar) <= 25_000_000


def test_linear_layers_have_stable_names_for_lora() -> None:
    model = tiny(blocks_per_stage=2)
    names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    suffixes = ["block.attn.qkv", "block.attn.qkv_temb", "block.attn.proj", "block.mlp.fc1", "block.mlp.fc2"]
    stages = [f"encoder.{s}" for s in range(2)] + ["decoder.0"]
    for stage in stages:
        for b in range(2):
            for suffix in suffixes:
                assert f"{stage}.blocks.{b}.{suffix}" in names
    assert not any(name.startswith("decoder.1") for name in names)  # the bottleneck has no decoder twin
    assert isinstance(model.label_embed, nn.Embedding) and model.label_embed.num_embeddings == 11


def test_unconditional_model_has_no_label_embedding() -> None:
    model = tiny(num_classes=0)
    assert model.label_embed is None
    assert not any("label" in name for name, _ in model.named_parameters())
    randomize_zero_layers(model)
    x, sigma = torch.randn(2, 1, 16, 16), torch.ones(2)
    torch.testing.assert_close(model(x, sigma, torch.tensor([3, 7])), model(x, sigma, None))


def test_preconditioning_matches_edm_formulas(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    x = torch.randn(4, 1, 16, 16)
    sigma = torch.tensor([0.002, 0.3, 1.0, 80.0])
    s, sd = sigma.view(-1, 1, 1, 1), model.sigma_data
    c_skip = sd**2 / (s**2 + sd**2)
    # Zero-initialised head: D(x; σ) is exactly the skip path.
    torch.testing.assert_close(model(x, sigma), c_skip * x)

    # With F replaced by a probe: F sees c_in·x and ln(σ)/4, and D = c_skip·x + c_out·F.
    seen: dict[str, Tensor] = {}

    def probe(x_in: Tensor, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        seen.update(x_in=x_in, c_noise=c_noise)
        return torch.ones_like(x_in)

    monkeypatch.setattr(model, "network", probe)
    out = model(x, sigma)
    torch.testing.assert_close(seen["x_in"], x / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(seen["c_noise"], sigma.log() / 4)
    torch.testing.assert_close(out, c_skip * x + s * sd / (s**2 + sd**2).sqrt())


def test_bad_arguments_are_refused_with_a_clear_message() -> None:
    cases = {
        "image_size=20 must be divisible by window_size": dict(image_size=20),
        "positive multiple of head_dim=8": dict(channels=[16, 20]),
        "channels must list at least one stage": dict(channels=[]),
        "window_size must be a positive integer": dict(window_size=0),
        "time_dim must be even": dict(time_dim=63),
        "num_classes must be an integer >= 0": dict(num_classes=-1),
        "label_dropout must be in [0, 1]": dict(label_dropout=1.5),
    }
    base = load_preset("diffit_tiny", in_channels=1, num_classes=10, image_size=16)
    for message, override in cases.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            DiffiT(**{**base, **override})
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        EDMSchedule(num_steps=1)


# ----------------------------------------------------------------------------- EDM loss


def test_loss_uses_only_the_given_generator() -> None:
    model = tiny()
    randomize_zero_layers(model)
    images, labels = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))

    def loss(seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return edm_loss(model, images, labels, num_classes=10, label_dropout=0.5, generator=gen)

    global_state = torch.get_rng_state()
    first = loss(123)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG was not touched
    torch.manual_seed(999)  # and its state is irrelevant
    assert torch.equal(loss(123), first)
    assert not torch.equal(loss(124), first)


def test_loss_shares_of_a_global_batch_match_the_whole_batch() -> None:
    """Each rank draws the noise of the whole global batch and keeps its share: the process count does not
    change the training noise, so two half-batch losses average to the one-process loss."""
    model = tiny()
    randomize_zero_layers(model)
    images, labels = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))

    def loss(part: slice, share: tuple[int, int]) -> Tensor:
        gen = torch.Generator().manual_seed(5)
        kwargs = dict(num_classes=10, label_dropout=0.5, generator=gen, share=share)
        return edm_loss(model, images[part], labels[part], **kwargs)  # type: ignore[arg-type]

    whole = loss(slice(0, 8), (0, 1))
    halves = (loss(slice(0, 4), (0, 2)) + loss(slice(4, 8), (1, 2))) / 2
    torch.testing.assert_close(halves, whole)
    assert not torch.allclose(loss(slice(0, 4), (0, 2)), loss(slice(0, 4), (0, 1)))  # a share is not a batch


def test_loss_with_a_generator_per_image_does_not_depend_on_the_batching() -> None:
    """One generator per image (validation): an image's draws are its own, so any split of the images into
    batches, in any order, gives the same mean; one image alone draws as a one-image batch does."""
    model = tiny()
    randomize_zero_layers(model)
    images, labels = torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))

    def loss(indices: list[int]) -> Tensor:
        generators = [torch.Generator().manual_seed(100 + i) for i in indices]
        return edm_loss(model, images[indices], labels[indices], num_classes=10, label_dropout=0.5,
                        generator=generators)  # fmt: skip

    whole = loss(list(range(6)))
    torch.testing.assert_close((loss([4, 0, 2]) + loss([1, 5, 3])) / 2, whole)
    alone = edm_loss(model, images[:1], labels[:1], num_classes=10, label_dropout=0.5,
                     generator=torch.Generator().manual_seed(100))  # fmt: skip
    torch.testing.assert_close(loss([0]), alone)
    with pytest.raises(ValueError, match="one generator per image"):
        edm_loss(model, images, labels, num_classes=10, label_dropout=0.5, generator=[torch.Generator()])


def test_edm_loss_decreases_on_a_fixed_batch() -> None:
    model = tiny()
    images = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(16) % 10
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        gen = torch.Generator().manual_seed(0)  # same σ and noise every step: a fixed objective
        loss = edm_loss(model, images, labels, num_classes=10, label_dropout=0.0, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses  # typically ~0.3x after 30 steps


# ----------------------------------------------------------------------------- Sampler


def test_schedule_runs_from_sigma_max_to_sigma_min_then_zero() -> None:
    t = EDMSchedule(num_steps=5).sigmas()
    assert t.shape == (6,)
    torch.testing.assert_close(t[[0, 4, 5]], torch.tensor([80.0, 0.002, 0.0]))
    assert bool((t[:-1] > t[1:]).all())


def test_sampler_output_is_finite_and_in_range() -> None:
    model = tiny().eval()
    randomize_zero_layers(model)
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = edm_sample(
        model, noise, torch.tensor([0, 1, 2, 10]), num_classes=10, schedule=EDMSchedule(num_steps=4)
    )
    assert out.shape == noise.shape
    assert bool(out.isfinite().all()) and out.abs().max() <= 1.0


def test_guidance_changes_samples_of_a_conditional_model() -> None:
    model = tiny().eval()
    randomize_zero_layers(model)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 7])
    schedule = EDMSchedule(num_steps=3)
    plain = edm_sample(model, noise, labels, num_classes=10, schedule=schedule)
    guided = edm_sample(model, noise, labels, num_classes=10, schedule=schedule, guidance=3.0)
    assert not torch.allclose(plain, guided)
    # guidance = 1 is the plain conditional sampler; an unconditional model ignores guidance.
    assert torch.equal(
        plain, edm_sample(model, noise, labels, num_classes=10, schedule=schedule, guidance=1.0)
    )
    uncond = tiny(num_classes=0).eval()
    randomize_zero_layers(uncond)
    a = edm_sample(uncond, noise, None, num_classes=0, schedule=schedule)
    assert torch.equal(a, edm_sample(uncond, noise, None, num_classes=0, schedule=schedule, guidance=3.0))
