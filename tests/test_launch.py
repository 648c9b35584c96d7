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
