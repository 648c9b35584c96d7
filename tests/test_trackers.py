"""Experiment trackers' promises: ``logging.trackers`` takes only wandb and tensorboard; wandb stays offline
unless asked, with its files under the run's logs/ and its id in metadata.json; ``--resume`` continues the
same wandb run and the same TensorBoard curves without restarting the step axis; only rank 0 logs; trackers
are closed when training fails, without hiding the error; and with no trackers neither library is imported.

The launches (one run, then its resume) are single-process: trackers live on rank 0 only.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, child_env, train_base
from trainer.config.files import build_config
from trainer.config.schema import CONFIG_DIR, ConfigError, TrainConfig
from trainer.runs.layout import RunLayout
from trainer.runs.metadata import RunHandle
from trainer.training.trackers import Trackers, open_trackers, wandb_mode

BASE_YAML = CONFIG_DIR / "training" / "base_training.yaml"
BOTH = ["--set", "logging.trackers=[wandb,tensorboard]", "--set", "logging.log_every_n_steps=1"]
STEPS_PER_EPOCH = 3  # TINY_RUN's --max-steps-per-epoch


# --------------------------------------------------------------------------------------------------
# Config and unit tests (no launches)
# --------------------------------------------------------------------------------------------------


def test_trackers_default_to_none_and_wandb_to_offline() -> None:
    config = build_config(BASE_YAML)
    assert config.logging.trackers == [] and config.logging.wandb_mode == "offline"
    assert TrainConfig().logging.trackers == []


def test_unknown_tracker_is_refused_by_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"logging\.trackers\[1\]' must be one of 'wandb', 'tensorboard'"):
        build_config(BASE_YAML, [("logging.trackers", ["wandb", "mlflow"])])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("logging.trackers", "wandb", "must be a list"),
        ("logging.trackers", ["tensorboard", "tensorboard"], "without repeats"),
        ("logging.wandb_mode", "cloud", "must be one of 'offline', 'online'"),
    ],
)
def test_bad_tracker_settings_are_refused(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(BASE_YAML, [(key, value)])


def test_wandb_mode_comes_from_config_unless_wandb_mode_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode("offline") == "offline" and wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("online") == "offline"


def make_run(path: Path, *, is_main: bool) -> RunHandle:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"run_number": 1}))
    return RunHandle(RunLayout(path, "base"), is_main=is_main)


def test_other_ranks_open_no_tracker_and_write_nothing(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run_001", is_main=False)
    config = build_config(BASE_YAML, [("logging.trackers", ["wandb", "tensorboard"])])
    trackers = open_trackers(config, run, resume_step=0)
    assert not trackers.enabled
    trackers.log({"train/loss": 1.0}, step=1)
    trackers.close()
    assert sorted(p.name for p in run.path.iterdir()) == ["metadata.json"]
    assert "trackers" not in json.loads((run.path / "metadata.json").read_text())


class FakeTracker:
    def __init__(self, fail_on_close: bool = False) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []
        self.closed: list[bool] = []
        self.fail_on_close = fail_on_close

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((metrics, step))

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def backfill(self, history: list[dict[str, Any]], steps_per_epoch: int) -> None:
        pass

    def close(self, *, failed: bool) -> None:
        self.closed.append(failed)
        if self.fail_on_close:
            raise RuntimeError("disk full")


def test_missing_values_are_left_out_and_every_tracker_is_closed_once() -> None:
    broken, fine = FakeTracker(fail_on_close=True), FakeTracker()
    trackers = Trackers([broken, fine])
    trackers.log({"epoch/train_loss": 1, "epoch/val_loss": None}, step=3)
    assert fine.logged == [({"epoch/train_loss": 1.0}, 3)]
    trackers.close()  # a tracker failing to close is reported, and the others still close
    trackers.close()
    assert broken.closed == [False] and fine.closed == [False]


def test_trackers_are_closed_as_failed_when_training_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.training import loop

    fake = FakeTracker()
    monkeypatch.setattr(loop, "open_trackers", lambda *args, **kwargs: Trackers([fake]))

    class Crashing:
        config, run = (
            type("Config", (), {"epochs": 1}),
            type("Run", (), {"update": staticmethod(lambda **_: None)}),
        )
        state, stop, trackers, steps_per_epoch = loop.TrainState(), loop.StopSignals(), Trackers(), 1
        topo = type("Topology", (), {"timeout": None})

        class checkpoints:  # no save in flight
            @staticmethod
            def close(*, failed: bool = False) -> None:
                assert failed

        _epoch_or_peer_lost = loop.Trainer._epoch_or_peer_lost
        _complete_epoch_outputs = loop.Trainer._complete_epoch_outputs  # nothing to complete at epoch 0

        def _epoch(self, epoch: int) -> None:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # the training error is not swallowed
        loop.Trainer.fit(Crashing())  # type: ignore[arg-type]
    assert fake.closed == [True]


def test_without_trackers_neither_library_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys, json; from pathlib import Path\n"
        "from trainer.config.schema import CONFIG_DIR\n"
        "from trainer.config.files import build_config\n"
        "from trainer.runs.layout import RunLayout\n"
        "from trainer.runs.metadata import RunHandle\n"
        "from trainer.training.trackers import open_trackers\n"
        f"run = Path({str(tmp_path)!r}) / 'run_001'; run.mkdir(); (run / 'metadata.json').write_text('{{}}')\n"
        "config = build_config(CONFIG_DIR / 'training' / 'base_training.yaml')\n"
        "open_trackers(config, RunHandle(RunLayout(run, 'base'), is_main=True), resume_step=0).close()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'tensorboard') "
        "or m.startswith('torch.utils.tensorboard'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), cwd=REPO, check=True
    )
    assert json.loads(result.stdout.splitlines()[-1]) == []


# --------------------------------------------------------------------------------------------------
# A run with both trackers, then its resume (two single-process launches)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("trackers")
    run = root / "base_training" / "run_001"
    train_base(root, "--epochs", "2", *BOTH, accelerate_config=None)
    first = json.loads((run / "metadata.json").read_text())
    first_events = sorted((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    # No --set this time: the resumed launch takes its trackers from the run's config.json.
    train_base(root, "--resume", "1", "--epochs", "3", accelerate_config=None)
    return {"run": run, "first": first, "first_events": first_events}


def scalar_steps(folder: Path, tag: str) -> list[int]:
    """Steps of ``tag`` across every event file in ``folder``, in file order, with nothing purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # purge_orphaned_data=False: otherwise a restart at step 0 would silently drop the first launch's points
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


@pytest.mark.distributed
def test_wandb_runs_offline_under_the_run_logs_with_its_id_in_metadata(tracked: dict[str, Any]) -> None:
    wandb_id = tracked["first"]["trackers"]["wandb_id"]
    assert wandb_id
    folders = sorted((tracked["run"] / "logs" / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(folders) == 2, "one offline folder per launch, both under the run's single wandb id"
    assert all((f / f"run-{wandb_id}.wandb").is_file() for f in folders)
    assert list((folders[0] / "files" / "media" / "images").glob("samples_*.png")), "sample grid not logged"


@pytest.mark.distributed
def test_tensorboard_writes_events_under_logs_tensorboard(tracked: dict[str, Any]) -> None:
    assert tracked["first_events"], "the first launch wrote no TensorBoard event file"
    events = sorted((tracked["run"] / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2 and set(tracked["first_events"]) < set(events)


@pytest.mark.distributed
def test_resume_continues_the_same_wandb_run(tracked: dict[str, Any]) -> None:
    meta = json.loads((tracked["run"] / "metadata.json").read_text())
    assert meta["trackers"] == tracked["first"]["trackers"]
    assert meta["status"] == "completed" and meta["resumes"]


@pytest.mark.distributed
def test_resumed_tensorboard_steps_keep_increasing(tracked: dict[str, Any]) -> None:
    folder = tracked["run"] / "logs" / "tensorboard"
    per_step = scalar_steps(folder, "train/loss")
    assert per_step == list(range(1, 3 * STEPS_PER_EPOCH + 1)), "train/loss must be logged every step, 1..9"
    per_epoch = scalar_steps(folder, "epoch/train_loss")
    assert per_epoch == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
    for tag in ("train/lr", "train/images_per_sec", "epoch/val_loss", "epoch/seconds", "checkpoint/size_mb"):
        steps = scalar_steps(folder, tag)
        assert all(a < b for a, b in itertools.pairwise(steps)) and steps[-1] == 3 * STEPS_PER_EPOCH, tag
