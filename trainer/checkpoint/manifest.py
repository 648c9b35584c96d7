"""Checkpoint manifests: the last file written for a checkpoint, and the proof that it is whole.

A checkpoint (``epoch_003`` or, inside an epoch, ``step_0000042``) is *committed* when its manifest exists:
``<checkpoint folder>/manifests/<tag>.json`` lists every file of the checkpoint with its size and checksum
(``storage/checksums.py``: XXH3-128; sha256 in manifests of earlier versions), plus the counters it was taken at.
A file that several processes wrote side by side (``storage/parts.py``) has one checksum per process's part
instead: ``{"bytes": N, "parts": [{"rank": r, "ranges": [[offset, length], ...], "xxh3_128": ...}, ...]}``,
the parts' ranges tiling the file. Anything without a manifest is an unfinished write; readers ignore it and
the next start of the run removes it. Before a resume loads a checkpoint, ``verify`` re-reads every listed
byte: a missing, truncated or altered file makes the whole checkpoint damaged. Under several processes the
reading is shared out (``verification_shares``): each rank hashes what it is about to load (on the same
processes: the parts it wrote), so that its load finds those bytes in the page cache, and a share of the rest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.checkpoint.folder import MANIFESTS as MANIFEST_DIR
from trainer.checkpoint.folder import is_tag
from trainer.errors import UserError
from trainer.storage.atomic import atomic_write_json
from trainer.storage.checksums import ALGORITHM, file_digest, hash_ranges, recorded
from trainer.storage.json_files import as_int, read_json_file
from trainer.storage.paths import OutsideFolder, relative_inside, within

FORMAT = "diffit-trainer/manifest-v1"
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Manifest:
    tag: str
    epoch: int
    """Epochs completed when the checkpoint was taken."""
    step_in_epoch: int
    """Steps of epoch ``epoch + 1`` already trained (0 for an epoch checkpoint)."""
    global_step: int
    world_size: int
    distributed: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Path relative to the checkpoint folder → ``{"bytes": int, "xxh3_128": str}`` (or ``"sha256"``)."""
    best: dict[str, Any] | None = None
    """The best epoch when the checkpoint was taken (``TrainState.best``), so that a listing knows it even
    when the process died before writing metadata.json."""
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Files outside the checkpoint folder it depends on, by path relative to the run folder, with their
    entries (a LoRA run's stored base: the adapters apply to that file only)."""
    precision: str | None = None
    """What the model computed in (``Topology.precision``); None for a checkpoint that does not say (one
    written before manifests recorded it)."""

    @property
    def is_epoch(self) -> bool:
        return self.tag.startswith("epoch_")

    def describe(self) -> str:
        if self.is_epoch:
            return f"epoch {self.epoch}"
        return f"step {self.global_step} (epoch {self.epoch + 1}, step {self.step_in_epoch} of the epoch)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "tag": self.tag,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "world_size": self.world_size,
            "distributed": self.distributed,
            "files": self.files,
            **({"best": self.best} if self.best is not None else {}),
            **({"references": self.references} if self.references else {}),
            **({"precision": self.precision} if self.precision is not None else {}),
        }


def manifest_path(folder: Path, tag: str) -> Path:
    return folder / MANIFEST_DIR / f"{tag}.json"


Entry = dict[str, Any]
"""A manifest's record of one file: ``{"bytes": N, "<algorithm>": digest}``, or ``{"bytes": N, "parts": [...]}``."""
Item = str | tuple[str, int]
"""What ``verify`` hashes: a file (every part of it), or one part of a file written in parts."""


def whole(size: int, digest: str) -> Entry:
    return {"bytes": size, ALGORITHM: digest}


def write_manifest(
    folder: Path, manifest: Manifest, files: list[Path], known: dict[Path, Entry] | None = None
) -> None:
    """Record ``files`` (paths under ``folder``) in ``manifest`` and commit it atomically, fsynced.

    ``known``: the entries of files hashed while they were written; the others are read and hashed."""
    known = known or {}
    entries = {}
    for path in sorted(files):
        entry = known.get(path)
        if entry is None or entry["bytes"] != path.stat().st_size:
            entry = whole(path.stat().st_size, file_digest(path))
        entries[str(path.relative_to(folder))] = entry
    manifest.files = entries
    (folder / MANIFEST_DIR).mkdir(exist_ok=True)
    atomic_write_json(manifest_path(folder, manifest.tag), manifest.to_dict())


def read_manifests(folder: Path) -> list[Manifest]:
    """Every readable manifest in ``folder``, oldest first (by global step). Unreadable ones are skipped:
    an interrupted manifest write leaves only a temporary file, so a bad manifest means outside damage,
    and ``unreadable_manifests`` reports those."""
    found = []
    for path in sorted((folder / MANIFEST_DIR).glob("*.json")):
        manifest = _parse(path)
        if manifest is not None:
            found.append(manifest)
    return sorted(found, key=lambda m: (m.global_step, m.is_epoch))


def unreadable_manifests(folder: Path) -> list[Path]:
    return [p for p in sorted((folder / MANIFEST_DIR).glob("*.json")) if _parse(p) is None]


def _parse(path: Path) -> Manifest | None:
    """The manifest in ``path``, or None when it is unreadable or names anything it may not: a tag outside the
    tag grammar or other than its file's name, a file outside its checkpoint's own paths (``_entries``)."""
    try:
        data = read_json_file(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("tag") != path.stem:
            return None
        tag = data["tag"]
        if not is_tag(tag):
            return None
        best = data.get("best")
        return Manifest(
            tag=tag,
            epoch=as_int(data["epoch"], "epoch"),
            step_in_epoch=as_int(data["step_in_epoch"], "step_in_epoch"),
            global_step=as_int(data["global_step"], "global_step"),
            world_size=as_int(data["world_size"], "world_size"),
            distributed=str(data["distributed"]),
            files=_entries(tag, data["files"]),
            best=best if isinstance(best, dict) else None,
            references=_references(data.get("references", {})),
            precision=_precision(data.get("precision")),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _precision(value: Any) -> str | None:
    if value is not None and value not in PRECISIONS:
        raise ValueError(f"precision {value!r} is none of {', '.join(PRECISIONS)}")
    return value


def _entries(tag: str, files: Any) -> dict[str, Entry]:
    """A manifest's ``files``, each checked: a path inside the checkpoint folder that carries the tag (``<tag>.ckpt``
    or anything under a ``<tag>/`` folder: a checkpoint's own files only), a whole number of bytes."""
    if not isinstance(files, dict):
        raise TypeError("files is not an object")
    for relative, entry in files.items():
        parts = relative_inside(relative).split("/")
        if tag not in parts[:-1] and parts != [f"{tag}{Path(relative).suffix}"]:
            raise ValueError(f"{relative} is not a file of {tag}")
        if not isinstance(entry, dict) or as_int(entry.get("bytes"), "bytes") < 0:
            raise ValueError(f"the entry of {relative} is malformed")
    return dict(files)


def _references(references: Any) -> dict[str, Entry]:
    if not isinstance(references, dict):
        raise TypeError("references is not an object")
    for relative, entry in references.items():
        relative_inside(relative)
        if not isinstance(entry, dict) or as_int(entry.get("bytes"), "bytes") < 0:
            raise ValueError(f"the reference to {relative} is malformed")
    return dict(references)


def listing(path: Path) -> tuple[Path, Manifest, str] | None:
    """(its folder, the committed manifest that lists it, its key there) of a file a committed manifest of its
    own folder lists (by itself, or as the file it is a hard link to: ``best.ckpt``); None for a loose file."""
    folder = path.parent
    if not (folder / MANIFEST_DIR).is_dir():
        return None
    for manifest in reversed(read_manifests(folder)):
        for relative in manifest.files:
            try:
                if os.path.samefile(folder / relative, path):
                    return folder, manifest, relative
            except OSError:
                continue
    return None


def committed_file(path: Path) -> bool:
    """Whether ``path`` is (a hard link to) a file that a committed manifest of its folder lists: a checkpoint
    file the trainer wrote and never rewrites, safe to hard-link to."""
    return listing(path) is not None


def verify_file(path: Path) -> bool:
    """Check a checkpoint file on its own against the committed manifest that lists it: True when it matches,
    False for a loose file (no manifest lists it); ``UserError`` saying why it does not match."""
    found = listing(path)
    if found is None:
        return False
    folder, manifest, relative = found
    reason = verify(folder, Manifest(**{**manifest.__dict__, "files": {relative: manifest.files[relative]}}))
    if reason is not None:
        raise UserError(
            f"{path} is checkpoint {manifest.tag} of {folder.parent.name}, which is damaged: {reason}"
        )
    return True


def verify(folder: Path, manifest: Manifest, hashed: Sequence[Item] | None = None) -> str | None:
    """None if every file of the checkpoint is present with its recorded size and checksum, else why not.

    Sizes are checked first (cheap); the files (or parts) are then hashed in parallel, one per core, since a
    resume waits for this. ``hashed``: what to hash, in this order (default: everything); every file's size is
    checked either way."""
    if not manifest.files:
        return "its manifest lists no files"
    for relative, expected in manifest.files.items():
        try:
            path = within(folder, relative)
        except OutsideFolder as e:
            return f"{relative} is not a file of the checkpoint's own ({e})"
        if not path.is_file():
            return f"{relative} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{relative} has {size} bytes, {expected['bytes']} were written (truncated or overwritten)"
    items = list(manifest.files) if hashed is None else list(hashed)
    if not items:
        return None
    try:
        checks = [check for item in items for check in _checks(manifest, item)]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return f"its manifest is damaged: {e.args[0] if e.args else type(e).__name__}"
    with ThreadPoolExecutor(max_workers=min(len(checks), os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda c: hash_ranges(folder / c[0], c[1], c[2]), checks)
        for (relative, _, algorithm, value), digest in zip(checks, digests):
            if digest != value:
                return (f"{relative} does not match the checksum ({algorithm}) recorded when it was written (the "
                        "file was altered)")  # fmt: skip
    return None


def _checks(manifest: Manifest, item: Item) -> list[tuple[str, list[tuple[int, int]], str, str]]:
    """(file, ranges, algorithm, recorded digest) to hash for one item of ``verify``."""
    relative, index = (item, None) if isinstance(item, str) else item
    entry = manifest.files[relative]
    if "parts" not in entry:
        algorithm, digest = recorded(entry)
        return [(relative, [(0, int(entry["bytes"]))], algorithm, digest)]
    parts = _tiling_parts(relative, entry)
    chosen = parts if index is None else [parts[index]]
    return [(relative, ranges, *recorded(part)) for part, ranges in ((p, _ranges(p)) for p in chosen)]


def _tiling_parts(relative: str, entry: Entry) -> list[dict[str, Any]]:
    """The parts of a file written in parts, checked to cover every byte of it exactly once."""
    parts = entry["parts"]
    covered = sorted(r for part in parts for r in _ranges(part))
    end = 0
    for offset, length in covered:
        if offset != end or length <= 0:
            raise ValueError(f"the parts of {relative} do not cover it (at byte {end})")
        end += length
    if end != entry["bytes"]:
        raise ValueError(f"the parts of {relative} cover {end} of its {entry['bytes']} bytes")
    return list(parts)


def _ranges(part: dict[str, Any]) -> list[tuple[int, int]]:
    return [(int(offset), int(length)) for offset, length in part["ranges"]]


_RANK_IN_NAME = re.compile(r"(?:pp_rank_|_rank)(\d+)[_.]")
"""The data-parallel rank a checkpoint file is named for: DeepSpeed's ``zero_pp_rank_N_...`` shards, the
trainer's ``ema_rankN``/``rng_rankN`` files (``mp_rank_00`` is the model-parallel rank: not matched)."""


def verification_shares(
    manifest: Manifest, world_size: int, *, same_layout: bool = False
) -> list[list[Item]]:
    """What each of ``world_size`` ranks hashes when they verify ``manifest`` together: every byte exactly
    once. A file named for a rank of this launch goes to that rank (the one that loads it), and so does the
    part a rank wrote when this launch has the processes that wrote the checkpoint (``same_layout``: each
    rank then loads exactly its own part). The rest (the files every rank reads, parts and files of ranks
    that are not here) go to the rank with the fewest bytes so far, largest first. Each rank's own items come
    last, so that its load right after finds them in the page cache. Only speed depends on these choices:
    any split verifies every byte."""
    own: list[list[Item]] = [[] for _ in range(world_size)]
    owned_bytes = [0] * world_size
    shared: list[tuple[int, Item]] = []
    for relative, entry in manifest.files.items():
        if "parts" in entry and isinstance(entry["parts"], list):
            for index, part in enumerate(entry["parts"]):
                size = sum(int(length) for _, length in part.get("ranges", []))
                rank = int(part.get("rank", -1)) if same_layout else -1
                if 0 <= rank < world_size:
                    own[rank].append((relative, index))
                    owned_bytes[rank] += size
                else:
                    shared.append((size, (relative, index)))
            continue
        match = _RANK_IN_NAME.search(Path(relative).name)
        rank = int(match.group(1)) if match else world_size
        if rank < world_size:
            own[rank].append(relative)
            owned_bytes[rank] += int(entry["bytes"])
        else:
            shared.append((int(entry["bytes"]), relative))
    dealt: list[list[Item]] = [[] for _ in range(world_size)]
    for size, item in sorted(shared, key=lambda s: (-s[0], str(s[1]))):
        rank = owned_bytes.index(min(owned_bytes))
        dealt[rank].append(item)
        owned_bytes[rank] += size
    return [dealt[rank] + own[rank] for rank in range(world_size)]
