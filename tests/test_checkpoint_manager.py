"""The checkpoint manager's rank rules, on a fake 2-rank world of threads (``tests/fake_world.py``).

A non-zero rank never commits, purges, links, moves or writes metadata; the ranks agree on the resume point
(rank 0 decides), on a stop signal, and on a failed save; a new piece of state is one registration. Real
multi-process launches of the same paths are tests/test_faults.py's and tests/test_base_training.py's.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from launch import PeerLost, Topology
from launch.collectives import SingleProcess
from tests.fake_world import ThreadWorld, end_epoch, new_run, tiny_manager, tiny_states
from trainer.checkpoint.manager import CheckpointManager
from trainer.checkpoint.manifest import read_manifests, verification_shares, verify
from trainer.errors import SaveFailed
from trainer.faults import Faults
from trainer.runs.layout import RunLayout

WRITERS = {
    "commit",
    "publish",
    "retire",
    "discard",
    "clean_start",
    "find_resume_point",
    "reject",
    "repair_links",
}
"""The commit protocol's methods that change files: rank 0's alone."""


class Spy:
    """Records the calls of ``WRITERS`` on a manager's commit protocol, then makes them."""

    def __init__(self, target: Any) -> None:
        self.target, self.calls = target, []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.target, name)
        if name not in WRITERS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call


def spied(manager: CheckpointManager) -> Spy:
    """The manager's commit protocol, wherever the manager uses it (its save jobs included), spied on."""
    spy = Spy(manager.protocol)
    manager.protocol = manager._committer.protocol = spy  # type: ignore[assignment]
    return spy


def train_epochs(manager: CheckpointManager, epochs: range, *, stop_at_epoch: int | None = None,
                 stop_signal: int | None = None) -> list[str | None]:  # fmt: skip
    """Epoch ends (one step boundary each, halfway) as the loop makes them, epoch 1 the best; the tags saved."""
    saved = []
    states = manager.states
    for epoch in epochs:
        states.progress.global_step, states.progress.step_in_epoch = epoch * 2 - 1, 1
        signal = stop_signal if epoch == stop_at_epoch else None
        boundary = manager.maybe_save("step", loss=0.25, stop_signal=signal)
        saved.append(boundary.saved)
        if boundary.stop_signal is not None:
            return saved
        metrics = {"train_loss": 0.5 + epoch / 10}
        is_best = states.progress.update_best(epoch, metrics, "train_loss", "min")
        end_epoch(states, epoch)
        boundary = manager.maybe_save("epoch", metrics=metrics, is_best=is_best, last=epoch == epochs[-1])
        saved.append(boundary.saved)
    manager.close()
    return saved


@pytest.mark.parametrize("async_save", [True, False], ids=["background", "synchronous"])
def test_a_nonzero_rank_never_commits_purges_links_or_writes_metadata(
    tmp_path: Path, async_save: bool
) -> None:
    layout = new_run(tmp_path / "run_001")
    metadata_before = layout.metadata.read_text()
    world = ThreadWorld(2)
    spies: dict[int, Spy] = {}

    def rank(r: int) -> list[str | None]:
        manager = tiny_manager(layout, world.topology(r), tiny_states(), keep_last_n=1, async_save=async_save,
                               save_every_n_steps=1)  # fmt: skip
        spies[r] = spied(manager)
        return train_epochs(manager, range(1, 4))

    saved = world.run(rank)

    tags = ["step_0000001", "epoch_001", "step_0000003", "epoch_002", "step_0000005", "epoch_003"]
    assert saved[0] == saved[1] == tags
    assert spies[1].calls == []
    assert {"commit", "publish"} <= set(spies[0].calls)  # publish links, then retires
    folder = layout.checkpoints
    # keep_last_n=1 and the best (epoch 1); the step checkpoints are older than the newest checkpoint
    assert [m.tag for m in read_manifests(folder)] == ["epoch_001", "epoch_003"]
    assert all(verify(folder, m) is None for m in read_manifests(folder))
    assert sorted(p.name for p in (folder / "state" / "epoch_003").iterdir()) == [
        "optimizer.safetensors", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json",
    ]  # fmt: skip
    # Both ranks wrote their share of the two tensor files; rank 0 alone the rest.
    files = read_manifests(folder)[-1].files
    for name in ("epoch_003.ckpt", "state/epoch_003/optimizer.safetensors"):
        assert [part["rank"] for part in files[name]["parts"]] == [0, 1], name
        assert all(part["ranges"] for part in files[name]["parts"]), name
    events = [json.loads(line) for line in layout.events.read_text().splitlines()]
    assert [e["tag"] for e in events] == tags
    assert layout.metadata.read_text() != metadata_before  # rank 0 recorded the checkpoints on disk


def committed(tmp_path: Path, epochs: range, world_size: int = 1) -> RunLayout:
    """A base run with ``epochs`` committed by ``world_size`` ranks (every epoch kept)."""
    layout = new_run(tmp_path / "run_001")
    world = ThreadWorld(world_size)

    def rank(r: int) -> None:
        train_epochs(tiny_manager(layout, world.topology(r), tiny_states(), keep_last_n=0), epochs)

    world.run(rank)
    return layout


def test_ranks_agree_on_a_fallback_that_rank_0_alone_carries_out(tmp_path: Path) -> None:
    layout = committed(tmp_path, range(1, 3))
    with open(layout.ckpt("epoch_002"), "r+b") as f:  # damaged: fails its manifest
        f.write(b"\0\0\0\0")
    world = ThreadWorld(2)
    spies: dict[int, Spy] = {}

    def rank(r: int) -> tuple[str | None, int]:
        states = tiny_states(seed=1)
        manager = tiny_manager(layout, world.topology(r), states)
        spies[r] = spied(manager)
        manifest = manager.load()
        return (manifest.tag if manifest else None), states.progress.epoch

    assert world.run(rank) == [("epoch_001", 1), ("epoch_001", 1)]
    assert spies[1].calls == [] and {"clean_start", "find_resume_point", "repair_links"} <= set(
        spies[0].calls
    )
    assert (layout.damaged / "epoch_002").is_dir()
    meta = json.loads(layout.metadata.read_text())
    assert [e["tag"] for e in meta["events"] if e["kind"] == "fallback"] == ["epoch_002"]
    assert meta["resumes"][-1]["checkpoint"] == "epoch_001"


def test_damage_only_rank_1_hashes_is_a_fallback_on_every_rank(tmp_path: Path) -> None:
    """The ranks share the hashing of a checkpoint (rank 1 hashes its own files): what rank 1 finds damaged
    is rank 0's fallback all the same, and the ranks then agree on the next checkpoint."""
    layout = committed(tmp_path, range(1, 4), world_size=2)
    rng = layout.checkpoint_folder.state_root / "epoch_003" / "rng_rank1.pt"
    rng.chmod(0o644)
    with open(rng, "r+b") as f:  # same size, one byte changed
        f.seek(rng.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0xFF]))
    manifest = read_manifests(layout.checkpoints)[-1]
    assert str(rng.relative_to(layout.checkpoints)) in verification_shares(manifest, 2)[1]
    world = ThreadWorld(2)
    spies: dict[int, Spy] = {}

    def rank(r: int) -> str | None:
        manager = tiny_manager(layout, world.topology(r), tiny_states(seed=1))
        spies[r] = spied(manager)
        manifest = manager.load()
        return manifest.tag if manifest else None

    assert world.run(rank) == ["epoch_002", "epoch_002"]
    assert spies[1].calls == [] and {"find_resume_point", "reject"} <= set(spies[0].calls)
    meta = json.loads(layout.metadata.read_text())
    fallbacks = [e for e in meta["events"] if e["kind"] == "fallback"]
    assert [e["tag"] for e in fallbacks] == ["epoch_003"]
    assert "rng_rank1.pt does not match the checksum" in fallbacks[0]["reason"]
    assert (layout.damaged / "epoch_003" / "state__epoch_003" / "rng_rank1.pt").is_file()


def test_resume_restores_every_registered_state(tmp_path: Path) -> None:
    layout = committed(tmp_path, range(1, 3))
    original = tiny_states()  # the same training as the run's: what epoch 2 saved
    restored = tiny_states(seed=7)
    manager = tiny_manager(layout, ThreadWorld(1).topology(0), restored)
    assert manager.load() is not None and restored.progress.epoch == 2
    for name, tensor in original.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], tensor), name
    for name, tensor in original.ema.state_dict().items():
        assert torch.equal(restored.ema.state_dict()[name], tensor), name
    assert restored.optimizer.state_dict()["state"].keys() == original.optimizer.state_dict()["state"].keys()


def test_a_stop_signal_on_one_rank_stops_every_rank_after_a_committed_checkpoint(tmp_path: Path) -> None:
    layout = new_run(tmp_path / "run_001")
    world = ThreadWorld(2)

    def rank(r: int) -> list[str | None]:
        manager = tiny_manager(layout, world.topology(r), tiny_states())
        return train_epochs(manager, range(1, 4), stop_at_epoch=2, stop_signal=15 if r == 1 else None)

    assert world.run(rank) == [[None, "epoch_001", "step_0000003"]] * 2
    tags = [m.tag for m in read_manifests(layout.checkpoints)]
    assert tags == ["epoch_001", "step_0000003"]  # committed before maybe_save returned


def test_a_failed_write_on_one_rank_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    layout = new_run(tmp_path / "run_001")
    world = ThreadWorld(2)

    def rank(r: int) -> str:
        faults = Faults("enospc@write:tag=epoch_002", rank=r) if r == 1 else Faults(rank=r)
        manager = tiny_manager(layout, world.topology(r), tiny_states(), faults=faults, keep_last_n=0)
        try:
            train_epochs(manager, range(1, 4))
        except SaveFailed as e:
            return str(e)
        return "no error"

    messages = world.run(rank)
    assert all(
        "checkpoint epoch_002 could not be written (rank 1: No space left on device" in m for m in messages
    )
    assert [m.tag for m in read_manifests(layout.checkpoints)] == ["epoch_001"]
    assert not (layout.checkpoint_folder.state_root / "epoch_002").exists() and not list(
        layout.path.rglob(".tmp-*")
    )


class LosesItsPeerIn(SingleProcess):
    """Rank 0's collectives in a world of 2 whose rank 1 dies while it saves ``tag``: that save's rendezvous
    fails as it would in a launch; rank 1 reports nothing else, so the others answer as a lone rank's."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def all_gather(self, value: Any, *, what: str) -> list[Any]:
        return [value, value]

    def background_exchange(self, value: Any, *, what: str) -> list[Any] | None:
        if self.tag in what:
            raise PeerLost(what, "Connection closed by peer", timedelta(minutes=0.5))
        return [value, (None, {})]  # rank 1: no error, no files of its own


@pytest.mark.parametrize("async_save", [True, False], ids=["background", "synchronous"])
def test_a_rank_lost_in_a_save_is_reported_as_a_lost_rank_and_the_save_discarded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], async_save: bool
) -> None:
    layout = new_run(tmp_path / "run_001")
    topo = Topology(rank=0, world_size=2, local_rank=0, deepspeed_stage=None, device=torch.device("cpu"),
                    comm=LosesItsPeerIn("epoch_002"))  # fmt: skip
    manager = tiny_manager(layout, topo, tiny_states(), async_save=async_save, keep_last_n=0)
    with pytest.raises(PeerLost, match=r"the save of epoch_002 .*: another process of this launch died"):
        try:
            train_epochs(manager, range(1, 4))
        except PeerLost:
            manager.close(failed=True)
            raise
    assert "warning: rank 0: checkpoint epoch_002 was not saved" in capsys.readouterr().err
    assert [m.tag for m in read_manifests(layout.checkpoints)] == ["epoch_001"]
    assert not (layout.checkpoint_folder.state_root / "epoch_002").exists() and not list(
        layout.path.rglob(".tmp-*")
    )
    events = json.loads(layout.metadata.read_text())["events"]
    assert [e["tag"] for e in events if e["kind"] == "save_failed"] == ["epoch_002"]


class Counter:
    """A piece of state of the kind an LR scheduler is: JSON-compatible, replicated."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def test_a_new_piece_of_state_is_saved_and_restored_by_registering_it(tmp_path: Path) -> None:
    layout = new_run(tmp_path / "run_001")
    states = tiny_states()
    states.extra["counter"] = Counter(41)
    train_epochs(tiny_manager(layout, ThreadWorld(1).topology(0), states), range(1, 2))

    restored = tiny_states()
    restored.extra["counter"] = Counter()
    tiny_manager(layout, ThreadWorld(1).topology(0), restored).load()
    assert restored.extra["counter"].value == 41


def test_a_manager_creates_nothing_before_its_first_save(tmp_path: Path) -> None:
    layout = new_run(tmp_path / "run_001")
    before = sorted(p.relative_to(layout.path) for p in layout.path.rglob("*"))
    tiny_manager(layout, ThreadWorld(1).topology(0), tiny_states()).close()
    assert sorted(p.relative_to(layout.path) for p in layout.path.rglob("*")) == before
