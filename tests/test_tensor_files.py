"""The checkpoint's tensor files: laid out before a byte is written, written by several processes side by side
(each its part, hashed as it goes out), read back by slices, and checked part by part against the manifest.
In-process: "processes" here are calls (or threads) writing the same file; the real launches are in
tests/test_deepspeed_equivalence.py and every distributed suite.
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from trainer.checkpoint.job import entries_of
from trainer.checkpoint.manifest import Manifest, verification_shares, verify
from trainer.checkpoint.sharding.owned import shares
from trainer.storage.atomic import Flusher
from trainer.storage.checksums import hash_ranges
from trainer.storage.parts import Part, merge_ranges, write_part
from trainer.storage.tensor_files import (
    TensorSpec,
    read_layout,
    safetensors_layout,
    torch_file_layout,
)
from trainer.storage.tensor_reader import TensorFileReader, layout_record, recorded_layout


def full_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3),
        "bias": torch.randn(5),  # fewer elements than some worlds have ranks
        "scalar": torch.randn(()),
        "empty": torch.zeros(0, 4),
        "half": torch.randn(33).bfloat16(),
        "steps": torch.arange(7),
    }


def write_by_ranks(
    path: Path, layout, tensors: dict[str, torch.Tensor], prefix: str, world: int
) -> list[Part]:  # type: ignore[no-untyped-def]
    """Every rank of ``world`` writes its share of the tensors (rank 0 also the header), at once."""
    parts: list[Part | None] = [None] * world

    def rank(r: int) -> None:
        blocks = list(layout.header) if r == 0 else []
        share = shares({name: t.numel() for name, t in tensors.items()}, r, world)
        for name, tensor in tensors.items():
            flat = tensor.reshape(-1)
            start, count = share[name]
            blocks.append((layout.span(f"{prefix}{name}", start, count)[0], flat[start : start + count]))
        with Flusher() as flusher:
            parts[r] = write_part(path, blocks, flusher, rank=r)
            flusher.wait()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p is not None for p in parts)
    return parts  # type: ignore[return-value]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_torch_file_written_by_several_ranks_loads_like_torch_saves(tmp_path: Path, world: int) -> None:
    tensors = full_tensors()
    obj = {"format": "x", "state_dict": {k: TensorSpec.of(v) for k, v in tensors.items()}, "epoch": 3,
           "metrics": {"val_loss": 0.25}}  # fmt: skip
    layout = torch_file_layout(obj)
    path = tmp_path / "model.ckpt"
    parts = write_by_ranks(path, layout, tensors, "state_dict/", world)

    assert path.stat().st_size == layout.size
    loaded = torch.load(path, weights_only=True)  # and without mmap: torch checks no CRC of ours
    assert loaded["epoch"] == 3 and loaded["metrics"] == {"val_loss": 0.25} and loaded["format"] == "x"
    assert loaded["state_dict"].keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded["state_dict"][name].dtype == tensor.dtype and torch.equal(
            loaded["state_dict"][name], tensor
        )
    mapped = torch.load(path, weights_only=True, mmap=True)
    assert all(torch.equal(mapped["state_dict"][k], v) for k, v in tensors.items())
    # Every byte written exactly once: the parts tile the file, and each part's checksum is its bytes'.
    covered = merge_ranges([r for part in parts for r in part.ranges])
    assert covered == [(0, layout.size)] and sum(p.nbytes for p in parts) == layout.size
    data = path.read_bytes()
    for part in parts:
        expected = xxhash.xxh3_128(b"".join(data[o : o + n] for o, n in part.ranges)).hexdigest()
        assert part.digest == expected == hash_ranges(path, part.ranges)
    assert nonempty(read_layout(path)) == nonempty(layout)


def nonempty(layout) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Where the layout puts each tensor that has bytes (an empty one may be anywhere)."""
    return {key: offset for key, offset in layout.offsets.items() if layout.specs[key].nbytes}


def test_a_safetensors_file_written_in_parts_loads_with_the_library(tmp_path: Path) -> None:
    tensors = full_tensors()
    layout = safetensors_layout({f"exp_avg/{k}": TensorSpec.of(v) for k, v in tensors.items()})
    path = tmp_path / "optimizer.safetensors"
    write_by_ranks(path, layout, tensors, "exp_avg/", 2)
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[f"exp_avg/{k}"], v) for k, v in tensors.items())
    assert read_layout(path).offsets == layout.offsets and read_layout(path).size == layout.size


def test_slices_are_read_into_any_tensor_by_key(tmp_path: Path) -> None:
    tensors = full_tensors()
    model = torch_file_layout({"state_dict": {k: TensorSpec.of(v) for k, v in tensors.items()}})
    moments = safetensors_layout({"exp_avg/bias": TensorSpec.of(tensors["bias"])})
    write_by_ranks(tmp_path / "model.ckpt", model, tensors, "state_dict/", 1)
    write_by_ranks(tmp_path / "optimizer.safetensors", moments, {"bias": tensors["bias"]}, "exp_avg/", 1)
    files = {
        tmp_path / "model.ckpt": None,
        tmp_path / "optimizer.safetensors": recorded_layout(layout_record(moments)),
    }
    with TensorFileReader(files) as read:  # a layout read from the file, and one recorded at the save
        whole = torch.empty(8, 3, 3, 3)
        read("state_dict/conv.weight", 0, whole)  # straight into its memory
        assert torch.equal(whole, tensors["conv.weight"])
        window = torch.empty(2, 5)
        read("state_dict/conv.weight", 7, window)
        assert torch.equal(window.reshape(-1), tensors["conv.weight"].reshape(-1)[7:17])
        strided = torch.zeros(5, 2)[:, 0]  # not contiguous, and a cast from bf16
        read("state_dict/half", 3, strided)
        assert torch.equal(strided, tensors["half"][3:8].float())
        bias = torch.empty(5)
        read("exp_avg/bias", 0, bias)
        assert torch.equal(bias, tensors["bias"]) and "exp_avg/bias" in read and "nothing" not in read
        with pytest.raises(ValueError, match="outside"):
            read("state_dict/bias", 3, torch.empty(4))
        with pytest.raises(KeyError):
            read("state_dict/nothing", 0, torch.empty(1))


def test_a_damaged_safetensors_header_is_refused_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header of"):
        read_layout(path)
    path.write_bytes((20).to_bytes(8, "little") + b'{"a": {"dtype": "F32"}}')  # cut short
    with pytest.raises(ValueError, match="not JSON"):
        read_layout(path)
    path.write_bytes((23).to_bytes(8, "little") + b'{"a": {"dtype": "F32"}}')
    with pytest.raises(ValueError, match="malformed"):
        read_layout(path)
    header = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"short")  # 16 bytes of data promised
    with pytest.raises(ValueError, match="does not fit the file"):
        read_layout(path)


def test_write_part_never_truncates_or_follows_a_link(tmp_path: Path) -> None:
    path = tmp_path / "shared.bin"
    with Flusher() as flusher:
        write_part(path, [(4, b"BBBB")], flusher, rank=1)
        write_part(path, [(0, b"AAAA")], flusher, rank=0)  # the second writer keeps the first one's bytes
        flusher.wait()
    assert path.read_bytes() == b"AAAABBBB"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "link.bin").symlink_to(victim)
    with Flusher() as flusher, pytest.raises(OSError):
        write_part(tmp_path / "link.bin", [(0, b"evil")], flusher, rank=0)
    assert victim.read_bytes() == b"keep"
    with Flusher() as flusher, pytest.raises(ValueError, match="overlap"):
        write_part(tmp_path / "x.bin", [(0, b"abcd"), (2, b"ef")], flusher, rank=0)


def manifest_of(tmp_path: Path, world: int) -> tuple[Path, Manifest]:
    """A checkpoint folder whose model file ``world`` ranks wrote, with its manifest entries as a save makes
    them (``entries_of`` the ranks' reports)."""
    tensors = full_tensors()
    layout = torch_file_layout({"state_dict": {k: TensorSpec.of(v) for k, v in tensors.items()}})
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    parts = write_by_ranks(folder / "epoch_001.ckpt", layout, tensors, "state_dict/", world)
    (folder / "rng_rank0.pt").write_bytes(b"rng")
    reports: list[dict] = [{"epoch_001.ckpt": part} for part in parts]
    reports[0]["rng_rank0.pt"] = {"bytes": 3, "xxh3_128": xxhash.xxh3_128(b"rng").hexdigest()}
    entries = entries_of(reports)
    return folder, Manifest("epoch_001", 1, 0, 3, world, "ddp", files=entries)


def test_verify_checks_every_part_and_that_the_parts_cover_the_file(tmp_path: Path) -> None:
    folder, manifest = manifest_of(tmp_path, 2)
    entry = manifest.files["epoch_001.ckpt"]
    assert entry["bytes"] == (folder / "epoch_001.ckpt").stat().st_size and len(entry["parts"]) == 2
    assert verify(folder, manifest) is None
    assert verify(folder, manifest, [("epoch_001.ckpt", 1)]) is None

    rank1_byte = entry["parts"][1]["ranges"][0][0]
    with open(folder / "epoch_001.ckpt", "r+b") as f:  # one byte of rank 1's part
        f.seek(rank1_byte)
        old = f.read(1)
        f.seek(rank1_byte)
        f.write(bytes([old[0] ^ 1]))
    assert verify(folder, manifest, [("epoch_001.ckpt", 0)]) is None  # rank 0's part is intact
    assert "epoch_001.ckpt does not match the checksum" in (verify(folder, manifest) or "")

    hollow = dict(entry, parts=entry["parts"][:1])  # a manifest that would leave bytes unchecked
    manifest.files["epoch_001.ckpt"] = hollow
    assert "its manifest is damaged: the parts of epoch_001.ckpt" in (verify(folder, manifest) or "")


def test_on_the_same_processes_each_rank_verifies_the_part_it_wrote(tmp_path: Path) -> None:
    _, manifest = manifest_of(tmp_path, 2)
    same = verification_shares(manifest, 2, same_layout=True)
    assert same[0][-1] == ("epoch_001.ckpt", 0) and same[1][-1] == ("epoch_001.ckpt", 1)
    assert "rng_rank0.pt" in same[0]
    for world in (1, 2, 3):  # elsewhere the parts are dealt out: every item exactly once either way
        shares = verification_shares(manifest, world)
        items = sorted(map(str, (item for share in shares for item in share)))
        assert items == sorted(map(str, ["rng_rank0.pt", ("epoch_001.ckpt", 0), ("epoch_001.ckpt", 1)]))


def test_sync_file_range_starts_writeback_without_waiting(tmp_path: Path) -> None:
    """Blocks past the writeback threshold start the disk on the file; the file is fsynced once, closed by
    the flusher, and its bytes are all there."""
    from trainer.storage.atomic import WRITEBACK_BYTES

    block = os.urandom(WRITEBACK_BYTES // 2 + 1)
    path = tmp_path / "big.bin"
    with Flusher() as flusher:
        part = write_part(path, [(0, block), (len(block), block), (2 * len(block), block)], flusher, rank=0)
        flusher.wait()
    assert path.read_bytes() == block * 3 and part.ranges == [(0, 3 * len(block))]


def test_the_layout_reads_torch_s_own_offsets_back_when_its_record_order_is_not_the_usual(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trainer.storage import tensor_files

    obj = {"state_dict": {k: TensorSpec.of(v) for k, v in full_tensors().items()}, "epoch": 1}
    usual = torch_file_layout(obj)
    monkeypatch.setattr(tensor_files, "_holes_in_order", lambda specs, holes: None)
    asked = torch_file_layout(obj)
    assert nonempty(asked) == nonempty(usual) and asked.header == usual.header and asked.size == usual.size


def test_shares_cut_the_tensors_end_to_end_into_even_stretches() -> None:
    sizes = {"a": 5, "b": 0, "c": 7, "d": 1}
    for world in (1, 2, 3, 5, 20):
        cut = [shares(sizes, r, world) for r in range(world)]
        for name, numel in sizes.items():  # every element of every tensor, exactly once
            owned = sorted((s, c) for rank in cut for s, c in [rank[name]] if c)
            assert sum(c for _, c in owned) == numel
            assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(owned))
        totals = [sum(c for _, c in rank.values()) for rank in cut]
        assert max(totals) - min(totals) <= 1
    assert shares(sizes, 0, 2) == {"a": (0, 5), "b": (0, 0), "c": (0, 1), "d": (0, 0)}
    assert shares(sizes, 1, 2) == {"a": (0, 0), "b": (0, 0), "c": (1, 6), "d": (0, 1)}
