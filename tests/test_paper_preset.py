"""The paper's recipe (``configs/training/diffit_cifar10_paper.yaml``) resolves to exactly the values of the
DiffiT paper (appendix I.1) and of NVIDIA's EDM code it trains with, and builds the paper's network."""

from __future__ import annotations

from types import SimpleNamespace

from model import count_parameters
from trainer.config.files import build_config
from trainer.config.schema import CONFIG_DIR, TrainConfig
from trainer.training.factory import build_model, resolve_model_against_data

PRESET = CONFIG_DIR / "training" / "diffit_cifar10_paper.yaml"


def paper_config() -> TrainConfig:
    return build_config(PRESET, [], TrainConfig)


def test_the_paper_preset_is_the_papers_and_edms_recipe() -> None:
    c = paper_config()
    assert c.experiment == "diffit_cifar10_paper"
    # DiffiT, appendix I.1: the image-space network on unconditional CIFAR-10.
    m = c.model
    assert (m.channels, m.blocks_per_stage, m.window_size, m.time_dim) == ([128, 256, 256], 2, 4, 512)
    assert (m.image_size, m.num_classes) == (32, 0)
    # The paper: Adam at 1e-3, batch 512, 200k iterations (102.4 Mimg = 2,048 epochs of 50,000 images).
    assert (c.learning_rate, c.batch_size, c.epochs) == (1e-3, 512, 2048)
    assert c.epochs * 50_000 // c.batch_size == 200_000
    assert (c.betas, c.weight_decay) == ([0.9, 0.999], 0.0)
    # EDM: a 10 Mimg linear ramp-up, then constant; no clipping; EMA half-life 500 kimg, ramp-up 0.05;
    # dropout 0.13; augmentation p = 0.12 with its label fed to the network, no dataset mirroring.
    assert (c.lr_schedule, c.warmup_steps) == ("constant", 10_000_000 // 512)
    assert c.grad_clip == 0.0
    assert (c.ema_halflife_kimg, c.ema_rampup_ratio) == (500.0, 0.05)
    assert m.dropout == 0.13
    assert (c.data.source, c.data.augment_p, c.data.random_flip) == ("cifar10", 0.12, False)
    e = c.edm
    assert (e.p_mean, e.p_std, e.sigma_data, e.sigma_min, e.sigma_max, e.rho, e.num_steps) == (
        -1.2, 1.2, 0.5, 0.002, 80.0, 7.0, 18
    )  # fmt: skip
    # best by FID, measured every 50 epochs on 10k samples with Inception-v3.
    assert (c.checkpoint.monitor, c.checkpoint.mode) == ("fid", "min")
    ev = c.evaluation
    assert (ev.fid_every_n_epochs, ev.fid_num_samples, ev.fid_features) == (50, 10_000, "inception-v3")
    assert c.logging.guidance == 1.0


def test_the_paper_preset_builds_the_papers_network_with_the_augmentation_label() -> None:
    c = paper_config()
    cifar = SimpleNamespace(name="CIFAR-10", image_size=32, channels=3, num_classes=10)
    resolve_model_against_data(c, cifar)  # type: ignore[arg-type]
    assert (c.model.in_channels, c.model.num_classes, c.model.augment_dim) == (3, 0, 9)
    net = build_model(c)
    assert net.label_embed is None
    assert 15.2e6 < count_parameters(net) < 15.4e6  # the paper's 15.29M-parameter network
