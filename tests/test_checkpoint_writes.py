"""How a checkpoint's files are written: safetensors straight from the tensors, checksums as the bytes go out
(large blocks on a helper thread), fsync in the background, the merged file from the snapshot, and old
checkpoints purged in the background. In-process, one process, a tiny model: the multi-process paths are
tests/test_faults.py's and tests/test_base_training.py's.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from launch import Topology
from tests.fake_world import end_epoch, new_run, tiny_manager, tiny_states
from trainer.checkpoint.formats import load_checkpoint_file
from trainer.checkpoint.manifest import read_manifests, verify
from trainer.storage.atomic import HASH_ON_THREAD_BYTES, Flusher, HashingWriter, write_file
from trainer.storage.serialization import write_safetensors

TOPO = Topology(rank=0, world_size=1, local_rank=0, deepspeed_stage=None, device=torch.device("cpu"))


def write_hashed(path: Path, write) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Through ``HashingWriter`` with a save's helper threads: large blocks are hashed on one of them."""
    with open(path, "wb") as f, Flusher() as flusher:
        hashed = HashingWriter(f, flusher)
        write(hashed)
    return hashed.entry()


def file_entry(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), xxhash.xxh3_128(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Serialisation and hashing
# --------------------------------------------------------------------------------------------------


def test_safetensors_written_from_the_tensors_load_like_the_librarys(tmp_path: Path) -> None:
    tensors = {
        "weight": torch.randn(3, 5),
        "transposed": torch.randn(4, 6).t(),  # not contiguous
        "half": torch.randn(7).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "steps": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "large": torch.randn(HASH_ON_THREAD_BYTES // 2),  # 2 MiB: hashed on the helper thread
    }
    path = tmp_path / "x.safetensors"
    entry = write_hashed(path, lambda f: write_safetensors(tensors, f))
    assert entry == file_entry(path)  # the hash taken while writing is the file's
    loaded = load_file(str(path))
    library = tmp_path / "library.safetensors"
    library.write_bytes(safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}))
    from_library = load_file(str(library))
    assert loaded.keys() == tensors.keys() == from_library.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor) and torch.equal(loaded[name], from_library[name]), name


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_safetensors_of_other_dtypes_go_through_the_library(tmp_path: Path) -> None:
    tensors = {"f8": torch.randn(4).to(torch.float8_e4m3fn), "w": torch.ones(2)}
    path = tmp_path / "x.safetensors"
    write_hashed(path, lambda f: write_safetensors(tensors, f))
    loaded = load_file(str(path))
    assert loaded["f8"].dtype == torch.float8_e4m3fn
    assert torch.equal(loaded["f8"].view(torch.uint8), tensors["f8"].view(torch.uint8))
    assert torch.equal(loaded["w"], tensors["w"])


def test_hashing_writer_hashes_large_and_small_blocks_in_order(tmp_path: Path) -> None:
    blocks = [b"head", os.urandom(3 * HASH_ON_THREAD_BYTES), b"middle", os.urandom(HASH_ON_THREAD_BYTES), b""]
    path = tmp_path / "blocks.bin"
    entry = write_hashed(path, lambda f: [f.write(memoryview(b)) for b in blocks])
    assert entry == (sum(map(len, blocks)), xxhash.xxh3_128(b"".join(blocks)).hexdigest())
    assert entry == file_entry(path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_hashing_on_a_thread_works_in_a_forked_child(tmp_path: Path) -> None:
    block = os.urandom(2 * HASH_ON_THREAD_BYTES)
    write_hashed(tmp_path / "parent.bin", lambda f: f.write(block))  # the parent has used helper threads
    pid = os.fork()
    if pid == 0:  # the child: a helper thread of its own, or this write would wait forever
        try:
            ok = write_hashed(tmp_path / "child.bin", lambda f: f.write(block)) == file_entry(
                tmp_path / "parent.bin"
            )
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("hashing in the forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_files_handed_to_the_flusher_are_on_disk_and_closed_after_wait(tmp_path: Path) -> None:
    blocks = [os.urandom(HASH_ON_THREAD_BYTES) for _ in range(3)]
    with Flusher() as flusher:
        entries = [
            write_file(tmp_path / f"{i}.bin", lambda f, b=b: f.write(b), flusher)
            for i, b in enumerate(blocks)
        ]
        flusher.wait()
    for i, block in enumerate(blocks):
        assert (
            entries[i]
            == file_entry(tmp_path / f"{i}.bin")
            == (len(block), xxhash.xxh3_128(block).hexdigest())
        )


def test_flusher_reports_a_failed_fsync_and_still_closes_the_file() -> None:
    read_end, write_end = os.pipe()  # fsync of a pipe fails (EINVAL), as it can on a lost network disk
    f = os.fdopen(write_end, "wb")
    try:
        with Flusher() as flusher:
            flusher.close(f)
            with pytest.raises(OSError):
                flusher.wait()
        assert f.closed
    finally:
        os.close(read_end)


# --------------------------------------------------------------------------------------------------
# A real save, in this process
# --------------------------------------------------------------------------------------------------


def save(checkpoints, states, epoch: int) -> dict:  # type: ignore[no-untyped-def]
    """One epoch-end save (epoch 1 is the best), waited for; its record from logs/events.jsonl."""
    if epoch == 1:
        states.progress.best = {"epoch": 1, "metric": "val_loss", "value": 0.5, "mode": "min"}
    end_epoch(states, epoch)
    boundary = checkpoints.maybe_save("epoch", metrics={"train_loss": 0.5}, is_best=epoch == 1)
    assert boundary.saved == f"epoch_{epoch:03d}"
    checkpoints.close()
    events = checkpoints.journal.layout.events.read_text().splitlines()
    return json.loads(events[-1])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_writes_every_tensor_once_from_the_snapshot_and_purges_old_checkpoints(
    tmp_path: Path, async_save: bool
) -> None:
    states = tiny_states()
    model, optimizer, ema = states.model, states.optimizer, states.ema
    layout = new_run(tmp_path / "run_001")
    run = layout.path
    checkpoints = tiny_manager(layout, TOPO, states, keep_last_n=1, async_save=async_save)
    first = save(checkpoints, states, epoch=1)
    folder = run / "checkpoints"
    state = folder / "state" / "epoch_001"

    # The weights and the EMA are in the model file users load, Adam's moments beside it: nothing twice.
    merged = load_checkpoint_file(folder / "epoch_001.ckpt")
    moments = load_file(str(state / "optimizer.safetensors"))
    assert sorted(p.name for p in state.iterdir()) == [
        "optimizer.safetensors",
        "rng_rank0.pt",
        "trainer_state.json",
    ]
    assert merged["state_dict"].keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(merged["state_dict"][name], tensor)
    for name, tensor in ema.state_dict().items():
        assert torch.equal(merged["ema_state_dict"][name], tensor)
    names = dict(model.named_parameters())
    assert moments.keys() == {f"{key}/{name}" for key in ("exp_avg", "exp_avg_sq") for name in names}
    for name, p in names.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[f"{key}/{name}"], optimizer.state[p][key])
    assert (merged["epoch"], merged["global_step"], merged["metrics"], merged["config"]) == (
        1, 2, {"train_loss": 0.5}, {"lr": 0.1}
    )  # fmt: skip
    [manifest] = read_manifests(folder)
    assert verify(folder, manifest) is None
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]
    assert os.path.samefile(folder / "last.ckpt", folder / "epoch_001.ckpt")
    assert os.path.samefile(folder / "best.ckpt", folder / "epoch_001.ckpt")
    assert first["tag"] == "epoch_001" and first["bytes"] == sum(e["bytes"] for e in manifest.files.values())
    assert first["write_seconds"] > 0 and first["blocked_seconds"] >= 0 and first["background"] == async_save

    # The snapshot of a background save counts every tensor once, though the merged file shares them.
    tensors = [*model.state_dict().values(), *ema.state_dict().values()]
    tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    held = sum(t.numel() * t.element_size() for t in tensors)
    if async_save:
        assert held <= first["snapshot_bytes"] < held + 50_000  # + the RNG states
    else:
        assert first["snapshot_bytes"] == 0

    save(checkpoints, states, epoch=2)  # keep_last_n=1 drops epoch 1, but it is the best
    save(checkpoints, states, epoch=3)  # drops epoch 2, in the background, waited for
    assert [m.tag for m in read_manifests(folder)] == ["epoch_001", "epoch_003"]
    assert sorted(p.name for p in (folder / "state").iterdir()) == ["epoch_001", "epoch_003"]
    assert not (folder / "epoch_002.ckpt").exists()
