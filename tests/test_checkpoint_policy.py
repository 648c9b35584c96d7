"""Checkpoint file policy: retention keeps the newest N epochs and never the best one's files, deletes nothing
outside the run, a restart clears only a crashed writer's ``.tmp-`` leftovers, writes are atomic, and only
weights-only checkpoint files of this trainer load.

The run folders are fake (tiny torch.save dicts and empty state folders): no model is trained here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from launch import Topology
from trainer.checkpoint.folder import epoch_tag as epoch_name
from trainer.checkpoint.formats import load_checkpoint_file
from trainer.checkpoint.formats.base import BaseFormat
from trainer.checkpoint.manifest import Manifest, read_manifests, verification_shares, verify, write_manifest
from trainer.checkpoint.protocol import CommitProtocol
from trainer.checkpoint.retention import RetentionPolicy, Scores, plan_retention
from trainer.errors import UserError
from trainer.faults import Faults
from trainer.runs.layout import RunLayout
from trainer.storage.atomic import atomic_write, delete_inside, link_or_copy

TOPO = Topology(rank=0, world_size=1, local_rank=0, deepspeed_stage=None, device=torch.device("cpu"))


class CustomObject:
    """Needs this module's code to unpickle, so weights-only loading must refuse it."""

    def __init__(self) -> None:
        self.value = 1


def fake_run(tmp_path: Path, epochs: range) -> Path:
    """A run folder with ``epoch_NNN.ckpt`` files and ``state/epoch_NNN/`` folders for ``epochs``."""
    run = tmp_path / "run_001"
    (run / "checkpoints" / "state").mkdir(parents=True)
    for epoch in epochs:
        ckpt = run / "checkpoints" / f"{epoch_name(epoch)}.ckpt"
        torch.save({"state_dict": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}, ckpt)
        state = run / "checkpoints" / "state" / epoch_name(epoch)
        state.mkdir()
        (state / "trainer_state.json").write_text("{}")
    return run


def manager(run: Path, keep_last_n: int) -> CommitProtocol:
    """The commit protocol of a base run, after the clean start every resume begins with (which commits the
    checkpoints of a run written before manifests existed, as these fake runs are)."""
    layout = RunLayout(run, "base")
    fmt = BaseFormat(layout.checkpoint_folder, TOPO, config={})
    protocol = CommitProtocol(layout.checkpoint_folder, RetentionPolicy(keep_last_n=keep_last_n))
    for note in protocol.clean_start(fmt.adopt):
        print(note)
    return protocol


def epochs_with_state(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("epoch_")) for p in (run / "checkpoints" / "state").iterdir())


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --------------------------------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------------------------------


def test_retention_keeps_last_n_and_never_deletes_best(tmp_path: Path) -> None:
    run = fake_run(tmp_path, range(1, 7))
    ckpts = run / "checkpoints"
    link_or_copy(ckpts / "epoch_002.ckpt", ckpts / "best.ckpt")
    link_or_copy(ckpts / "epoch_006.ckpt", ckpts / "last.ckpt")
    checkpoints = manager(run, keep_last_n=2)
    removed = checkpoints.retire(best_epoch=2)
    assert checkpoints.epochs_on_disk() == [2, 5, 6]
    assert epochs_with_state(run) == [2, 5, 6]
    assert {p.name for p in removed} == {f"{epoch_name(e)}{s}" for e in (1, 3, 4) for s in (".ckpt", "")}
    assert load_checkpoint_file(ckpts / "best.ckpt")["epoch"] == 2
    assert load_checkpoint_file(ckpts / "last.ckpt")["epoch"] == 6


def test_retention_when_best_is_among_the_newest_keeps_exactly_n(tmp_path: Path) -> None:
    run = fake_run(tmp_path, range(1, 6))
    checkpoints = manager(run, keep_last_n=2)
    checkpoints.retire(best_epoch=5)
    assert checkpoints.epochs_on_disk() == [4, 5]
    assert epochs_with_state(run) == [4, 5]


def test_retention_without_a_best_epoch_keeps_the_newest_n(tmp_path: Path) -> None:
    run = fake_run(tmp_path, range(1, 5))
    checkpoints = manager(run, keep_last_n=1)
    checkpoints.retire(best_epoch=None)
    assert checkpoints.epochs_on_disk() == [4]
    assert epochs_with_state(run) == [4]


def test_retention_with_keep_last_n_0_keeps_every_epoch(tmp_path: Path) -> None:
    run = fake_run(tmp_path, range(1, 6))
    checkpoints = manager(run, keep_last_n=0)
    assert checkpoints.retire(best_epoch=None) == []
    assert checkpoints.epochs_on_disk() == [1, 2, 3, 4, 5]
    assert epochs_with_state(run) == [1, 2, 3, 4, 5]


def test_retention_orders_epochs_as_numbers_past_999(tmp_path: Path) -> None:
    run = fake_run(tmp_path, range(998, 1002))
    checkpoints = manager(run, keep_last_n=2)
    checkpoints.retire(best_epoch=None)
    assert checkpoints.epochs_on_disk() == [1000, 1001]
    assert names(run / "checkpoints" / "state") == {"epoch_1000", "epoch_1001"}


def test_retention_touches_only_epoch_files(tmp_path: Path) -> None:
    run = fake_run(tmp_path, range(1, 4))
    ckpts = run / "checkpoints"
    for other in ("best.ckpt", "last.ckpt", "epoch_final.ckpt", "notes.txt"):
        (ckpts / other).write_text("keep me")
    (run / "logs").mkdir()
    manager(run, keep_last_n=1).retire(best_epoch=None)
    assert names(ckpts) == {
        "best.ckpt",
        "last.ckpt",
        "epoch_final.ckpt",
        "notes.txt",
        "epoch_003.ckpt",
        "state",
        "manifests",
    }
    assert (run / "logs").is_dir()


@pytest.mark.parametrize("linked", ["ckpt-file", "state-folder"])
def test_retention_never_deletes_outside_the_run(tmp_path: Path, linked: str) -> None:
    """A symlink in checkpoints/ pointing elsewhere: the link may go, or retention may refuse; the target stays."""
    run = fake_run(tmp_path, range(2, 5))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.ckpt").write_bytes(b"precious")
    (outside / "model.safetensors").write_bytes(b"also precious")
    ckpts = run / "checkpoints"
    if linked == "ckpt-file":
        (ckpts / "epoch_001.ckpt").symlink_to(outside / "precious.ckpt")
        (ckpts / "state" / "epoch_001").mkdir()
    else:
        torch.save({"state_dict": {}}, ckpts / "epoch_001.ckpt")
        (ckpts / "state" / "epoch_001").symlink_to(outside, target_is_directory=True)

    checkpoints = manager(run, keep_last_n=2)
    try:
        checkpoints.retire(best_epoch=None)
    except RuntimeError as e:  # the current refusal; deleting only the link would be as good
        assert "outside run folder" in str(e)

    assert (outside / "precious.ckpt").read_bytes() == b"precious"
    assert (outside / "model.safetensors").read_bytes() == b"also precious"
    assert checkpoints.epochs_on_disk()[-2:] == [3, 4]
    assert epochs_with_state(run)[-2:] == [3, 4]


def test_delete_inside_run_refuses_the_run_folder_itself_and_paths_outside(tmp_path: Path) -> None:
    run = fake_run(tmp_path, range(1, 2))
    (tmp_path / "sibling").mkdir()
    manager(run, keep_last_n=1)
    for path in (run, run / "checkpoints" / ".." / "..", tmp_path / "sibling", run / ".." / "sibling"):
        with pytest.raises(RuntimeError, match="outside run folder"):
            delete_inside(path, run)
    assert run.is_dir()
    assert (tmp_path / "sibling").is_dir()


# --------------------------------------------------------------------------------------------------
# Leftovers of a crashed writer
# --------------------------------------------------------------------------------------------------


def test_restart_removes_tmp_leftovers_in_checkpoints_and_state_but_nothing_else(tmp_path: Path) -> None:
    run = fake_run(tmp_path, range(1, 3))
    ckpts, state = run / "checkpoints", run / "checkpoints" / "state"
    (ckpts / ".tmp-epoch_003.ckpt.1234").write_bytes(b"half a checkpoint")
    (ckpts / ".tmp-last.ckpt.1234").write_bytes(b"")
    (state / ".tmp-epoch_003").mkdir()
    (state / ".tmp-epoch_003" / "model.safetensors").write_bytes(b"partial")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (state / ".tmp-epoch_004").symlink_to(outside, target_is_directory=True)
    # Not leftovers of a checkpoint writer: other folders, nested files, names merely containing "tmp".
    (run / ".tmp-not-in-checkpoints").write_text("keep")
    (run / ".tmp-metadata.json.1234").write_text(
        '{"half": '
    )  # a metadata write cut short: kept here (a resume clears it)
    (state / "epoch_001" / ".tmp-inner").write_text("keep")
    (ckpts / "notes.tmp").write_text("keep")
    (ckpts / "tmp-epoch_009.ckpt").write_text("keep")

    manager(run, keep_last_n=2)

    assert names(ckpts) == {
        "epoch_001.ckpt",
        "epoch_002.ckpt",
        "state",
        "manifests",
        "notes.tmp",
        "tmp-epoch_009.ckpt",
    }
    assert names(state) == {"epoch_001", "epoch_002"}
    assert (state / "epoch_001" / ".tmp-inner").is_file()
    assert (run / ".tmp-not-in-checkpoints").is_file()
    assert (outside / "keep").read_text() == "keep"


# --------------------------------------------------------------------------------------------------
# Atomic writes and links
# --------------------------------------------------------------------------------------------------


def test_link_or_copy_makes_a_hard_link(tmp_path: Path) -> None:
    src, dst = tmp_path / "epoch_001.ckpt", tmp_path / "best.ckpt"
    src.write_bytes(b"weights")
    dst.write_bytes(b"an older best")
    link_or_copy(src, dst)
    assert os.path.samefile(src, dst)
    assert not dst.is_symlink()
    assert names(tmp_path) == {"epoch_001.ckpt", "best.ckpt"}


def test_link_or_copy_falls_back_to_a_copy_where_links_are_impossible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    src, dst = tmp_path / "epoch_001.ckpt", tmp_path / "last.ckpt"
    src.write_bytes(b"weights")
    dst.write_bytes(b"an older last")
    link_or_copy(src, dst)
    assert dst.read_bytes() == b"weights"
    assert not os.path.samefile(src, dst)
    assert not dst.is_symlink()
    assert names(tmp_path) == {"epoch_001.ckpt", "last.ckpt"}


def test_link_or_copy_of_a_missing_file_leaves_no_dangling_link_and_keeps_the_old_one(tmp_path: Path) -> None:
    dst = tmp_path / "last.ckpt"
    dst.write_bytes(b"previous last")
    with pytest.raises(FileNotFoundError):
        link_or_copy(tmp_path / "epoch_009.ckpt", dst)
    assert dst.read_bytes() == b"previous last"
    assert names(tmp_path) == {"last.ckpt"}


def test_atomic_write_keeps_the_old_file_when_the_writer_fails_midway(tmp_path: Path) -> None:
    target = tmp_path / "epoch_001.ckpt"
    target.write_bytes(b"old complete file")

    def crash_midway(f: object) -> None:
        f.write(b"half of the new")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # even a Ctrl-C mid-write leaves the old file whole

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash_midway)
    assert target.read_bytes() == b"old complete file"
    assert names(tmp_path) == {"epoch_001.ckpt"}


def test_atomic_write_replaces_the_file_with_the_complete_new_one(tmp_path: Path) -> None:
    target = tmp_path / "metadata.json"
    target.write_bytes(b"old")
    atomic_write(target, lambda f: f.write(b"new and complete"))
    assert target.read_bytes() == b"new and complete"
    assert names(tmp_path) == {"metadata.json"}


# --------------------------------------------------------------------------------------------------
# Loading merged checkpoint files
# --------------------------------------------------------------------------------------------------


def test_checkpoint_file_with_weights_loads(tmp_path: Path) -> None:
    path = tmp_path / "epoch_001.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "epoch": 1, "config": {"lr": 0.1}}, path)
    data = load_checkpoint_file(path)
    assert torch.equal(data["state_dict"]["w"], torch.ones(3))
    assert data["config"] == {"lr": 0.1}


def test_checkpoint_that_needs_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "epoch_001.ckpt"
    torch.save({"state_dict": {}, "extra": CustomObject()}, path)
    with pytest.raises(UserError, match="cannot load checkpoint") as info:
        load_checkpoint_file(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)  # one clear line, not torch's whole explanation


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"hello, I am a text file\n", "cannot load checkpoint"),
        (b"", "cannot load checkpoint"),
        ({"weights": torch.ones(1)}, "not a checkpoint of this trainer"),
        ([torch.ones(1)], "not a checkpoint of this trainer"),
    ],
    ids=["text", "empty", "dict-without-state_dict", "list"],
)
def test_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path, content: object, reason: str) -> None:
    path = tmp_path / "epoch_001.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(UserError, match=reason) as info:
        load_checkpoint_file(path)
    assert str(path) in str(info.value)


def test_missing_checkpoint_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "epoch_042.ckpt"
    with pytest.raises(UserError, match="checkpoint not found") as info:
        load_checkpoint_file(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------------
# Manifests: commit record, verification, fallback, uncommitted leftovers
# --------------------------------------------------------------------------------------------------


def committed_run(tmp_path: Path, epochs: range) -> tuple[Path, CommitProtocol]:
    """A fake run whose epochs are committed with real manifests (written by the manager's adoption)."""
    run = fake_run(tmp_path, epochs)
    return run, manager(run, keep_last_n=0)


def test_write_manifest_then_verify_detects_missing_truncated_and_altered_files(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    (folder / "state" / "epoch_001").mkdir(parents=True)
    files = [folder / "epoch_001.ckpt", folder / "state" / "epoch_001" / "shard.pt"]
    for f in files:
        f.write_bytes(b"0123456789" * 100)
    manifest = Manifest("epoch_001", 1, 0, 3, 2, "deepspeed-zero2")
    write_manifest(folder, manifest, files)
    (loaded,) = read_manifests(folder)
    assert loaded.files == manifest.files and verify(folder, loaded) is None
    assert loaded.files["state/epoch_001/shard.pt"]["bytes"] == 1000

    with open(files[1], "r+b") as f:  # same size, one byte changed
        f.write(b"X")
    assert "does not match the checksum (xxh3_128)" in (verify(folder, loaded) or "")
    os.truncate(files[1], 10)
    assert "has 10 bytes, 1000 were written" in (verify(folder, loaded) or "")
    files[1].unlink()
    assert verify(folder, loaded) == "state/epoch_001/shard.pt is missing"


def test_verification_shares_hash_every_file_once_each_rank_its_own_files_last() -> None:
    mib = 1 << 20
    sizes = {
        "epoch_003.ckpt": 200 * mib,  # the merged file: nobody's own
        "state/epoch_003/trainer_state.json": 1,
        "state/epoch_003/zero_pp_rank_0_mp_rank_00_model_states.pt": mib,
        "state/epoch_003/zero_pp_rank_0_mp_rank_00_optim_states.pt": 150 * mib,
        "state/epoch_003/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": 150 * mib,
        "state/epoch_003/zero_pp_rank_1_mp_rank_00_model_states.pt": mib,
        "state/epoch_003/ema_rank0.safetensors": 50 * mib,
        "state/epoch_003/ema_rank1.safetensors": 50 * mib,
        "state/epoch_003/rng_rank0.pt": 10,
        "state/epoch_003/rng_rank1.pt": 10,
    }
    manifest = Manifest("epoch_003", 3, 0, 30, 2, "deepspeed-zero3",
                        files={name: {"bytes": n, "xxh3_128": "0"} for name, n in sizes.items()})  # fmt: skip

    rank0, rank1 = verification_shares(manifest, 2)
    assert sorted(rank0 + rank1) == sorted(sizes)  # every file, once
    # The dealt-out files first, each to the rank with fewer bytes so far, then the rank's own files.
    assert rank0[0] == "epoch_003.ckpt" and rank1[0] == "state/epoch_003/trainer_state.json"
    assert all("rank_0" in f or "rank0" in f for f in rank0[1:])
    assert all("rank_1" in f or "rank1" in f for f in rank1[1:])

    # A smaller launch: rank 1's files are dealt out too, largest first.
    (alone,) = verification_shares(manifest, 1)
    state = "state/epoch_003/"
    assert alone == [
        "epoch_003.ckpt", f"{state}bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", f"{state}ema_rank1.safetensors",
        f"{state}zero_pp_rank_1_mp_rank_00_model_states.pt", f"{state}rng_rank1.pt", f"{state}trainer_state.json",
        f"{state}zero_pp_rank_0_mp_rank_00_model_states.pt", f"{state}zero_pp_rank_0_mp_rank_00_optim_states.pt",
        f"{state}ema_rank0.safetensors", f"{state}rng_rank0.pt",
    ]  # fmt: skip
    # A larger one: the ranks without files of their own get the rest.
    assert verification_shares(manifest, 4)[2:] == [["epoch_003.ckpt"], [f"{state}trainer_state.json"]]


def test_manifests_of_earlier_versions_are_checked_with_the_sha256_they_recorded(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    ckpt = folder / "epoch_001.ckpt"
    ckpt.write_bytes(b"0123456789" * 100)
    old = {"bytes": 1000, "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    manifest = Manifest("epoch_001", 1, 0, 3, 1, "single", files={"epoch_001.ckpt": old})
    assert verify(folder, manifest) is None
    with open(ckpt, "r+b") as f:
        f.write(b"X")
    assert "does not match the checksum (sha256)" in (verify(folder, manifest) or "")
    manifest.files["epoch_001.ckpt"] = {"bytes": 1000, "md5": "0" * 32}
    assert "its manifest is damaged: no checksum of a known algorithm" in (verify(folder, manifest) or "")


def test_runs_without_manifests_are_adopted_not_deleted(tmp_path: Path) -> None:
    _run, checkpoints = committed_run(tmp_path, range(1, 4))
    assert [m.tag for m in checkpoints.committed()] == ["epoch_001", "epoch_002", "epoch_003"]
    assert checkpoints.epochs_on_disk() == [1, 2, 3]


def test_restart_removes_uncommitted_checkpoints_and_keeps_committed_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = committed_run(tmp_path, range(1, 3))
    ckpts = run / "checkpoints"
    # A save killed after the state folder was renamed but before its manifest: never committed.
    (ckpts / "state" / "epoch_003").mkdir()
    (ckpts / "state" / "epoch_003" / "mp_rank_00_model_states.pt").write_bytes(b"complete but uncommitted")
    torch.save({"state_dict": {}}, ckpts / "epoch_003.ckpt")
    (ckpts / "state" / "step_0000010").mkdir()

    manager(run, keep_last_n=0)

    assert names(ckpts / "state") == {"epoch_001", "epoch_002"}
    assert not (ckpts / "epoch_003.ckpt").exists()
    assert "Removed an uncommitted checkpoint" in capsys.readouterr().out


def test_resume_point_falls_back_past_damaged_checkpoints_and_moves_them_aside(tmp_path: Path) -> None:
    run, checkpoints = committed_run(tmp_path, range(1, 4))
    ckpts = run / "checkpoints"
    link_or_copy(ckpts / "epoch_003.ckpt", ckpts / "last.ckpt")
    with open(ckpts / "epoch_003.ckpt", "r+b") as f:
        f.write(b"\0\0\0\0")

    point = checkpoints.find_resume_point()

    assert point.manifest is not None and point.manifest.tag == "epoch_002"
    assert [(d["tag"], d["moved_to"]) for d in point.damaged] == [("epoch_003", "damaged/epoch_003")]
    assert "checksum" in point.damaged[0]["reason"]
    moved = run / "damaged" / "epoch_003"
    assert names(moved) == {"manifests__epoch_003.json", "epoch_003.ckpt", "state__epoch_003"}
    assert [m.tag for m in checkpoints.committed()] == ["epoch_001", "epoch_002"]
    checkpoints.repair_links(best_epoch=1)
    assert os.path.samefile(ckpts / "last.ckpt", ckpts / "epoch_002.ckpt")
    assert os.path.samefile(ckpts / "best.ckpt", ckpts / "epoch_001.ckpt")


def test_resume_point_with_nothing_intact_reports_every_damaged_checkpoint(tmp_path: Path) -> None:
    run, checkpoints = committed_run(tmp_path, range(1, 3))
    for epoch in (1, 2):
        (run / "checkpoints" / "state" / epoch_name(epoch) / "trainer_state.json").unlink()
    (run / "checkpoints" / "manifests" / "epoch_009.json").write_text("{not json")

    point = checkpoints.find_resume_point()

    assert point.manifest is None
    assert [d["tag"] for d in point.damaged] == ["epoch_009", "epoch_002", "epoch_001"]
    assert names(run / "damaged") == {"epoch_001", "epoch_002", "epoch_009"}


def test_retention_removes_the_manifest_before_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = committed_run(tmp_path, range(1, 4))
    checkpoints = manager(run, keep_last_n=1)
    calls: list[str] = []

    def spy(path: Path, root: Path) -> None:
        manifest = run / "checkpoints" / "manifests" / (path.name.removesuffix(".ckpt") + ".json")
        calls.append(f"{path.name} (manifest present: {manifest.exists()})")
        delete_inside(path, root)

    monkeypatch.setattr("trainer.checkpoint.protocol.delete_inside", spy)
    checkpoints.retire(best_epoch=None)
    assert calls and all("manifest present: False" in c for c in calls)
    assert [m.tag for m in checkpoints.committed()] == ["epoch_003"]


def test_step_checkpoints_older_than_the_newest_checkpoint_are_dropped(tmp_path: Path) -> None:
    run, checkpoints = committed_run(tmp_path, range(1, 2))
    folder = run / "checkpoints"
    for step in (4, 5):
        state = folder / "state" / f"step_{step:07d}"
        state.mkdir()
        (state / "trainer_state.json").write_text("{}")
        write_manifest(
            folder, Manifest(state.name, 1, step - 3, step, 1, "single"), [state / "trainer_state.json"]
        )
    checkpoints.retire(best_epoch=None)
    assert [m.tag for m in checkpoints.committed()] == ["epoch_001", "step_0000005"]
    assert names(folder / "state") == {"epoch_001", "step_0000005"}


def test_fault_spec_parsing_and_filters(tmp_path: Path) -> None:
    faults = Faults("enospc@write:tag=epoch_002:rank=0;signal@step:step=5:rank=1", rank=0)
    faults.point("write")  # no tag given: no match
    with pytest.raises(OSError, match="No space left"):
        faults.point("write", tag="epoch_002", step=3)
    with pytest.raises(OSError, match="No space left"):  # a full disk stays full for that checkpoint
        faults.point("write", tag="epoch_002", step=3)
    faults.point("write", tag="epoch_003")
    faults.point("step", step=5)  # the signal is for rank 1
    assert not Faults().enabled and faults.enabled
    with pytest.raises(ValueError, match="bad fault"):
        Faults("explode@write")


def test_fault_hook_comes_from_the_environment_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIFFIT_FAULTS", "enospc@write")
    faults = Faults.from_environment(rank=0)
    monkeypatch.delenv("DIFFIT_FAULTS")
    with pytest.raises(OSError):  # read when the launch started, not at each point
        faults.point("write")
    assert not Faults.from_environment(rank=0).enabled


# --------------------------------------------------------------------------------------------------
# Retention rules, alone and combined (Orbax-style: any rule keeps a checkpoint)
# --------------------------------------------------------------------------------------------------


def epochs_of(count: int, steps: tuple[int, ...] = ()) -> list[Manifest]:
    """Committed epochs 1..count (3 steps each) and step checkpoints at ``steps``, oldest first."""
    found = [Manifest(f"epoch_{e:03d}", e, 0, 3 * e, 1, "single") for e in range(1, count + 1)]
    found += [Manifest(f"step_{s:07d}", s // 3, s % 3, s, 1, "single") for s in steps]
    return sorted(found, key=lambda m: (m.global_step, m.is_epoch))


# val_loss by epoch: the best is epoch 2 (early), then 5, 7, 3
SCORES = Scores({1: 0.9, 2: 0.1, 3: 0.5, 4: 0.8, 5: 0.2, 6: 0.7, 7: 0.3, 8: 0.6, 9: 0.75, 10: 0.65}, "min")


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        (RetentionPolicy(keep_last_n=2), {"epoch_002": ["best"], "epoch_009": ["last 2"], "epoch_010": ["last 2"]}),
        (RetentionPolicy(keep_last_n=1, keep_best_n=3),
         {"epoch_002": ["best", "best 3"], "epoch_005": ["best 3"], "epoch_007": ["best 3"], "epoch_010": ["last 1"]}),
        (RetentionPolicy(keep_last_n=1, keep_every_n_epochs=4),
         {"epoch_002": ["best"], "epoch_004": ["every 4"], "epoch_008": ["every 4"], "epoch_010": ["last 1"]}),
        (RetentionPolicy(keep_last_n=2, keep_best_n=2, keep_every_n_epochs=5),
         {"epoch_002": ["best", "best 2"], "epoch_005": ["every 5", "best 2"], "epoch_009": ["last 2"],
          "epoch_010": ["last 2", "every 5"]}),
    ],
    ids=["last-n", "best-n", "every-n", "all-combined"],
)  # fmt: skip
def test_retention_rules_keep_exactly_the_expected_checkpoints_and_say_why(
    policy: RetentionPolicy, kept: dict[str, list[str]]
) -> None:
    plan = plan_retention(epochs_of(10, steps=(28, 31)), policy, best_epoch=2, scores=SCORES)
    assert plan.keep == {**kept, "step_0000031": ["newest"]}
    assert set(plan.drop) == {f"epoch_{e:03d}" for e in range(1, 11)} - set(kept) | {"step_0000028"}


def test_best_n_ranks_by_the_monitored_metric_in_its_mode() -> None:
    plan = plan_retention(epochs_of(4), RetentionPolicy(keep_last_n=1, keep_best_n=2), None,
                          Scores({1: 0.9, 2: 0.1, 3: 0.5, 4: 0.8}, "max"))  # fmt: skip
    assert plan.keep == {"epoch_001": ["best 2"], "epoch_004": ["last 1", "best 2"]}


def test_superseded_checkpoints_are_outside_retention(tmp_path: Path) -> None:
    """Going back moves newer checkpoints to superseded/; retention neither counts nor deletes them."""
    run = fake_run(tmp_path, range(1, 6))
    checkpoints = manager(run, keep_last_n=1)
    [third] = [m for m in checkpoints.committed() if m.tag == "epoch_003"]
    moved = checkpoints.supersede_after(third)
    assert [m["tag"] for m in moved] == ["epoch_004", "epoch_005"]
    assert checkpoints.epochs_on_disk() == [1, 2, 3]
    checkpoints.retire(best_epoch=None)
    assert checkpoints.epochs_on_disk() == [3]
    superseded = run / "superseded"
    assert sorted(p.name for p in superseded.iterdir()) == ["epoch_004", "epoch_005"]
    assert (superseded / "epoch_005" / "epoch_005.ckpt").is_file()


def test_a_tag_that_does_not_exist_or_is_damaged_is_refused_listing_the_tags(tmp_path: Path) -> None:
    run = fake_run(tmp_path, range(1, 3))
    checkpoints = manager(run, keep_last_n=0)
    assert checkpoints.resolve("2").tag == checkpoints.resolve("epoch_002").tag == "epoch_002"
    for spec, phrase in (("7", "has no checkpoint '7'"), ("soon", "--from takes an epoch number")):
        with pytest.raises(UserError, match=phrase) as info:
            checkpoints.resolve(spec)
        assert "epoch_001, epoch_002" in str(info.value)
    (run / "checkpoints" / "epoch_001.ckpt").write_bytes(b"changed")
    with pytest.raises(UserError, match="epoch_001 of run 001 is damaged"):
        checkpoints.resolve("1")
