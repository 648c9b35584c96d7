"""FID: its arithmetic against pytorch-fid's, the stand-in feature network on the bundled digits, chunked
evaluation on one and two ranks, and what a run folder or cache may hold. Nothing here needs Inception's
weights (these machines cannot download them); the launched runs are in ``test_fid_runs.py``."""

from __future__ import annotations

import json
import pickle
import urllib.error
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from data import load_dataset
from metrics import FeatureStats, FeatureWeightsUnavailable, feature_net, frechet_distance, to_uint8_rgb
from metrics import features as features_module
from tests.fake_world import ThreadWorld
from trainer.checkpoint.states import TrainState
from trainer.config.schema import ConfigError, DataConfig, TrainConfig, from_dict
from trainer.runs.listing import RunSummary, fid_of_best, format_table
from trainer.storage.paths import OutsideFolder
from trainer.training.fid import reference_file, reference_stats
from trainer.training.fid_chunks import FidJob, _read_chunk, _write_chunk, chunked_stats

pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def digits():
    return load_dataset(name="Digits", source="digits", root="unused", classes=None, superclasses=None,
                        image_size=None, val_fraction=0.1, download=False, seed=0)  # fmt: skip


def pixels(images: torch.Tensor) -> torch.Tensor:
    """A dataset's uint8 images as the RGB the feature networks take."""
    return to_uint8_rgb(images.float() / 127.5 - 1)


def stats_of(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    stats = FeatureStats(features.shape[1])
    stats.add(features)
    return stats.mean_cov()


# -- the arithmetic -------------------------------------------------------------------------------


def test_frechet_distance_matches_pytorch_fid_on_the_same_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 32))
    b = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
    ours = frechet_distance(*stats_of(torch.from_numpy(a)), *stats_of(torch.from_numpy(b)))
    mu1, mu2 = a.mean(0), b.mean(0)
    theirs = calculate_frechet_distance(mu1, np.cov(a, rowvar=False), mu2, np.cov(b, rowvar=False))
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert ours > 1.0


def test_frechet_distance_agrees_where_the_covariances_are_singular():
    """Fewer samples than features (rank-deficient covariances): pytorch-fid patches its sqrtm with an
    offset of 1e-6; the eigenvalue route needs none and lands within that offset's effect."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 48)), rng.normal(size=(20, 48)) + 0.1
    ours = frechet_distance(*stats_of(torch.from_numpy(a)), *stats_of(torch.from_numpy(b)))
    theirs = calculate_frechet_distance(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    )
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_statistics_match_numpy_however_the_features_are_batched():
    features = torch.randn(301, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = FeatureStats(16)
    whole.add(features)
    batched = FeatureStats(16)
    for part in features.split(50):
        batched.add(part)
    mu, sigma = whole.mean_cov()
    np.testing.assert_allclose(mu, features.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(batched.mean_cov()[1], sigma, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        whole.add(torch.full((2, 16), float("nan")))


# -- the stand-in on the digits -------------------------------------------------------------------


def test_standin_fid_of_the_digits_is_zero_against_itself_and_large_against_noise(digits):
    net = feature_net("standin")
    train = stats_of(net(pixels(digits.train.images)))
    held_out = stats_of(net(pixels(digits.val.images)))
    noise = torch.randint(0, 256, digits.train.images.shape, dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    random_images = stats_of(net(to_uint8_rgb(noise.float() / 127.5 - 1)))
    assert abs(frechet_distance(*train, *train)) < 1e-9
    real = frechet_distance(*train, *held_out)
    fake = frechet_distance(*train, *random_images)
    assert fake > 100 * real, (real, fake)


def test_the_standin_network_is_the_same_in_every_process():
    images = torch.randint(
        0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(feature_net("standin")(images), feature_net("standin")(images))
    assert feature_net("standin")(images).shape == (3, 64)


# -- chunks on one and two ranks --------------------------------------------------------------------


def _chunk_images(digits) -> Callable[[int], torch.Tensor]:
    all_pixels = pixels(digits.train.images[:230])
    return lambda k: all_pixels[k * 50 : (k + 1) * 50]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_chunked_statistics_do_not_depend_on_the_number_of_ranks(digits, world_size, tmp_path):
    job = FidJob(230, 50, 0, "standin", "test")
    net = feature_net("standin")
    reference = FeatureStats(net.dim)
    reference.add(net(pixels(digits.train.images[:230])))
    world = ThreadWorld(world_size)
    images = _chunk_images(digits)
    results = world.run(
        lambda rank: chunked_stats(job, images, net, world.topology(rank), folder=tmp_path / "fid")
    )
    stats = results[0]
    assert all(r is None for r in results[1:])
    assert stats.count == 230
    assert torch.equal(stats.total, reference.total) or torch.allclose(
        stats.total, reference.total, rtol=1e-12
    )
    assert sorted(p.name for p in (tmp_path / "fid").iterdir()) == [
        f"chunk_00000{k}.safetensors" for k in range(5)
    ]


def test_a_stopped_evaluation_continues_from_its_chunks(digits, tmp_path):
    job = FidJob(230, 50, 0, "standin", "test")
    net = feature_net("standin")
    images = _chunk_images(digits)
    drawn: list[int] = []

    def counting(k: int) -> torch.Tensor:
        drawn.append(k)
        return images(k)

    world = ThreadWorld(2)

    def stop_in_round_2(rank: int) -> Callable[[int], int | None]:
        def vote(round_: int) -> int | None:  # a collective, as the trainer's stop vote
            world.comm(rank).barrier(what="the stop vote")
            return 15 if round_ == 1 else None

        return vote

    with pytest.raises(Exception, match="signal 15"):
        world.run(lambda rank: chunked_stats(job, counting, net, world.topology(rank), folder=tmp_path,
                                             should_stop=stop_in_round_2(rank)))  # fmt: skip
    assert sorted(drawn) == [0, 1]
    drawn.clear()
    said: list[str] = []
    world = ThreadWorld(2)  # a new launch
    stats = world.run(lambda rank: chunked_stats(job, counting, net, world.topology(rank), folder=tmp_path,
                                                 say=said.append))[0]  # fmt: skip
    assert sorted(drawn) == [2, 3, 4]
    assert said == [f"Continuing the evaluation from 2 of 5 chunks in {tmp_path}"]
    fresh = ThreadWorld(2).run(lambda rank: chunked_stats(job, images, net, world.topology(rank)))[0]
    assert torch.equal(stats.total, fresh.total) and torch.equal(stats.outer, fresh.outer)


def test_an_evaluations_folder_that_links_out_of_the_run_is_refused_on_every_rank(digits, tmp_path):
    run, outside = tmp_path / "run_001", tmp_path / "elsewhere"
    run.mkdir()
    outside.mkdir()
    (run / "evaluations").symlink_to(outside)
    job, net, world = FidJob(100, 50, 0, "standin", "w"), feature_net("standin"), ThreadWorld(2)
    images = _chunk_images(digits)
    with pytest.raises(OutsideFolder, match="symbolic link"):
        world.run(lambda rank: chunked_stats(job, images, net, world.topology(rank), folder=run / "evaluations" / "fid",
                                             run=run))  # fmt: skip
    assert list(outside.iterdir()) == []


def test_chunk_files_of_another_job_or_crafted_ones_are_drawn_again(tmp_path):
    job = FidJob(100, 50, 0, "standin", "weights-a")
    features = torch.randn(50, 64)
    _write_chunk(tmp_path, job, 0, features)
    assert torch.equal(_read_chunk(tmp_path, job, 0, 64), features)
    assert _read_chunk(tmp_path, FidJob(100, 50, 0, "standin", "weights-b"), 0, 64) is None  # other weights
    assert _read_chunk(tmp_path, FidJob(100, 50, 1, "standin", "weights-a"), 0, 64) is None  # other seed
    assert _read_chunk(tmp_path, job, 1, 64) is None  # absent
    (tmp_path / "chunk_000001.safetensors").write_bytes(b"\xff" * 100)  # garbage
    assert _read_chunk(tmp_path, job, 1, 64) is None
    (tmp_path / "chunk_000001.safetensors").unlink()
    (tmp_path / "chunk_000001.safetensors").symlink_to(tmp_path / "chunk_000000.safetensors")  # a link
    assert _read_chunk(tmp_path, job, 1, 64) is None
    _write_chunk(tmp_path, job, 0, torch.full((50, 64), float("inf")))  # not finite
    assert _read_chunk(tmp_path, job, 0, 64) is None


def test_reference_statistics_are_cached_beside_the_data_and_a_bad_cache_is_recomputed(digits, tmp_path):
    data = DataConfig(root=str(tmp_path / "datasets"))
    net = feature_net("standin")
    topo = ThreadWorld(1).topology(0)
    mu, sigma = reference_stats(data, digits, net, topo, batch_size=500)
    path = reference_file(data, "standin", digits.image_size)
    assert path == tmp_path / "datasets" / "fid_refs" / "digits-train-16px-standin.safetensors"
    direct = stats_of(net(pixels(digits.train.images)))
    np.testing.assert_allclose(mu, direct[0], rtol=1e-12)
    np.testing.assert_allclose(sigma, direct[1], rtol=1e-9, atol=1e-15)
    stamp = path.stat().st_mtime_ns
    again = reference_stats(data, digits, net, topo, batch_size=500)
    assert path.stat().st_mtime_ns == stamp and np.array_equal(again[0], mu)  # from the cache
    path.write_bytes(b"not safetensors")
    recomputed = reference_stats(data, digits, net, topo, batch_size=500)
    assert np.array_equal(recomputed[0], mu)
    subset = reference_file(DataConfig(root="r", classes=["0", "1"]), "standin", 16)
    assert subset.name.startswith("digits-subset") and subset != reference_file(
        DataConfig(root="r"), "standin", 16
    )


# -- Inception's weights ------------------------------------------------------------------------------


def test_without_inception_weights_offline_the_error_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url: str, dst: str, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FeatureWeightsUnavailable) as error:
        feature_net("inception-v3")
    message = str(error.value)
    assert features_module.INCEPTION_URL in message
    assert (
        str(tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
        in message
    )
    assert "--features standin" in message


def test_the_inception_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert features_module.INCEPTION_URL == URL_INCEPTION_V3


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_the_weights_file_is_loaded_without_running_code(tmp_path):
    """torch-fidelity's own load says weights_only=False; inside ``_weights_only_loads`` it cannot unpickle
    code."""
    path = tmp_path / "weights.pth"
    path.write_bytes(pickle.dumps({"x": _Payload()}, protocol=2))
    with features_module._weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)


# -- config, best, listing --------------------------------------------------------------------------


def test_monitor_fid_needs_fids_and_mode_min():
    with pytest.raises(ConfigError, match=r"evaluation\.fid_every_n_epochs"):
        from_dict(TrainConfig, {"checkpoint": {"monitor": "fid"}})
    with pytest.raises(ConfigError, match="mode min"):
        from_dict(
            TrainConfig,
            {"checkpoint": {"monitor": "fid", "mode": "max"}, "evaluation": {"fid_every_n_epochs": 1}},
        )
    config = from_dict(
        TrainConfig, {"checkpoint": {"monitor": "fid"}, "evaluation": {"fid_every_n_epochs": 2}}
    )
    assert config.evaluation.fid_num_samples == 10_000


def test_epochs_without_an_fid_do_not_compete_for_best():
    state = TrainState()
    assert state.update_best(1, {"train_loss": 0.5, "val_loss": 0.4}, "fid", "min") is False
    assert state.update_best(2, {"train_loss": 0.5, "fid": 9.0}, "fid", "min") is True
    assert state.update_best(3, {"train_loss": 0.1, "val_loss": 0.1}, "fid", "min") is False
    assert state.update_best(4, {"train_loss": 0.5, "fid": 8.0}, "fid", "min") is True
    assert state.best == {"epoch": 4, "metric": "fid", "value": 8.0, "mode": "min"}


def test_the_listing_shows_the_best_epochs_fid_with_the_most_samples():
    meta = {
        "history": [
            {"epoch": 1, "fid": 9.5, "fid_samples": 10_000},
            {"epoch": 2, "fid": 7.25, "fid_samples": 10_000},
        ],
        "evaluations": [
            {"epoch": 2, "metric": "fid", "value": 7.0, "num_samples": 50_000},
            {"epoch": 1, "metric": "fid", "value": 9.0, "num_samples": 50_000},
        ],
    }
    assert fid_of_best(meta, {"epoch": 2}) == {"fid": 7.0, "fid_samples": 50_000}
    assert fid_of_best({"history": meta["history"]}, {"epoch": 2}) == {"fid": 7.25, "fid_samples": 10_000}
    assert fid_of_best(meta, {}) == {}
    row = RunSummary(1, "p", "base", "x", "CIFAR-10 (10)", 2, 2, 2, 2, "fid", 7.25, "completed", fid=7.0,
                     fid_samples=50_000)  # fmt: skip
    table = format_table([row], "runs")
    assert "FID (samples)" in table and "7.000 (50,000)" in table
    assert "FID" not in format_table(
        [RunSummary(1, "p", "base", "x", "d", 1, 1, 1, 1, "val_loss", 0.1, "done")], "r"
    )
    assert json.loads(json.dumps(row.to_dict()))["fid"] == 7.0


def test_fid_keys_may_change_on_resume():
    from trainer.config.changes import resume_changes

    stored = TrainConfig().to_dict()
    new = TrainConfig().to_dict()
    new["evaluation"]["fid_every_n_epochs"] = 5
    assert [c.key for c in resume_changes(stored, new, set())] == ["evaluation.fid_every_n_epochs"]
    del stored["evaluation"]  # a run from before FID existed
    assert resume_changes(stored, new, set()) == []


def test_reference_file_is_named_by_what_decides_the_statistics():
    a = reference_file(DataConfig(source="cifar10", root="/data"), "inception-v3", 32)
    assert a == Path("/data/fid_refs/cifar10-train-32px-inception-v3.safetensors")
