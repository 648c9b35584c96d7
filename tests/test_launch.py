"""launch/: the distributed set-up that needs no launch to test."""

from __future__ import annotations

import os
from pathlib import Path

from launch.accelerator import SHM_PREFIX, remove_stale_shm_segments


def test_stale_deepspeed_shm_segments_are_removed_and_those_in_use_kept(tmp_path: Path) -> None:
    """A SIGKILLed run leaves its all-reduce segment; a later launch on the same port would map it."""
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    uid = os.getuid()
    stale = shm / f"{SHM_PREFIX}{uid}_127.0.0.1_29500_1"
    open_fd = shm / f"{SHM_PREFIX}{uid}_127.0.0.1_29500_0"
    mapped = shm / f"{SHM_PREFIX}{uid}_127.0.0.1_29600_0"
    other_user = shm / f"{SHM_PREFIX}{uid + 1}_127.0.0.1_29500_1"
    unrelated = shm / "something_else"
    for f in (stale, open_fd, mapped, other_user, unrelated):
        f.write_bytes(b"x")
    (proc / "100" / "fd").mkdir(parents=True)
    (proc / "100" / "fd" / "3").symlink_to(open_fd)
    (proc / "100" / "maps").write_text("")
    (proc / "200" / "fd").mkdir(parents=True)
    (proc / "200" / "maps").write_text(f"7f00-7f01 rw-s 00000000 00:1a 42  {mapped}\n")
    (proc / "self").mkdir()  # not a pid

    assert remove_stale_shm_segments(shm, proc) == [stale]
    assert sorted(p.name for p in shm.iterdir()) == sorted(
        p.name for p in (open_fd, mapped, other_user, unrelated)
    )


def test_the_launch_says_what_it_is_in_one_line() -> None:
    import torch

    from launch.world import Topology

    cpu = Topology(0, 2, 0, 2, torch.device("cpu"), precision="bf16", backend="gloo")
    assert cpu.describe(16) == (
        "Launch: 2 processes on 1 machine, cpu (gloo), DeepSpeed ZeRO-2, bf16; "
        "batch 16 per process x 1 micro-batch per step x 2 processes = 32"
    )
    cluster = Topology(
        3, 16, 3, 3, torch.device("cuda"), precision="bf16", machines=2, backend="nccl", offload="cpu"
    )
    assert cluster.describe(8, 4).startswith(
        "Launch: 16 processes on 2 machines, cuda (nccl), DeepSpeed ZeRO-3 offloading to cpu, bf16; "
        "batch 8 per process x 4 micro-batches per step x 16 processes = 512"
    )
    assert cluster.record(8, 4)["global_batch"] == 512 and cluster.record(8, 4)["offload"] == "cpu"
    laptop = Topology(0, 1, 0, None, torch.device("cpu"))
    assert laptop.describe(32).startswith("Launch: 1 process on 1 machine, cpu, no DeepSpeed, fp32;")
