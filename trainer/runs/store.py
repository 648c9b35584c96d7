"""Run folders: allocate a new run, find one to resume, create its first files. No tensors here.

Rank rule: only global rank 0 calls the functions that create (``allocate_run``, ``create_run``); the
command line broadcasts what rank 0 decided to the other ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainer.checkpoint.folder import epoch_tag
from trainer.checkpoint.manifest import committed_file, verify_file
from trainer.errors import UserError
from trainer.runs.layout import DEFAULT_BASE, RunLayout, kind_root, run_dir, run_number
from trainer.runs.lock import RunLock
from trainer.runs.metadata import write_metadata
from trainer.storage.atomic import (
    atomic_write,
    atomic_write_json,
    copy_file,
    create_new,
    link_or_copy,
    make_read_only,
    remove_tmp_leftovers,
)
from trainer.storage.checksums import ALGORITHM, ALGORITHMS, sha256_file
from trainer.storage.json_files import read_json_file


class RunError(UserError):
    """A run that cannot be created, found or resumed as asked."""


CONFIG_CHECKSUM = "checksum"
"""The key of ``config.json`` that holds the checksum of the rest of it: a config edited by hand or damaged
is told from the one the trainer wrote (a resume rebuilds it from its checkpoint, ``repair.py``)."""


class ConfigMismatch(RunError):
    """A ``config.json`` whose content does not match the checksum it holds."""


def write_config(path: Path, config: dict[str, Any]) -> None:
    """``config.json``: ``config`` and, last, its checksum."""
    atomic_write_json(path, {**config, CONFIG_CHECKSUM: {ALGORITHM: _config_digest(config, ALGORITHM)}})


def read_config(path: Path) -> dict[str, Any]:
    """The config in ``config.json``, its checksum checked and left out; ``RunError`` saying why it cannot be
    used. A file written before configs held a checksum is taken as it is."""
    try:
        data = read_json_file(path)
    except FileNotFoundError:
        raise RunError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise RunError(f"{path} does not hold a training config")
    checksum = data.pop(CONFIG_CHECKSUM, None)
    if checksum is None:
        return data
    known = [a for a in ALGORITHMS if isinstance(checksum, dict) and a in checksum]
    if not known or checksum[known[0]] != _config_digest(data, known[0]):
        raise ConfigMismatch(
            f"{path} does not match the checksum it holds (edited by hand or damaged); settings change "
            "through flags on --resume or --fork, which record them"
        )
    return data


def _config_digest(config: dict[str, Any], algorithm: str) -> str:
    digest = ALGORITHMS[algorithm]()
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=True).encode())
    return str(digest.hexdigest())


def run_numbers(root: Path) -> list[int]:
    """Numbers of the run folders under ``root``, ascending."""
    if not root.is_dir():
        return []
    numbers = []
    for entry in os.scandir(root):
        number = run_number(entry.name)
        if number is not None and entry.is_dir():
            numbers.append(number)
    return sorted(numbers)


def allocate_run(root: Path, number: int | None = None) -> int:
    """Create a new run folder and return its number (global rank 0 only).

    ``mkdir`` is atomic, so launches racing for the same number each get a distinct folder: the loser of a
    race moves on to the next number. An explicit ``number`` that exists already is refused.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".tmp-write-probe.{os.getpid()}"
        create_new(probe).close()
        probe.unlink()
    except OSError as e:
        raise RunError(
            f"cannot write to the checkpoint folder {root}: {e.strerror}. "
            "Choose another with --checkpoint-root or fix its permissions."
        ) from None
    if number is not None:
        try:
            run_dir(root, number).mkdir()
        except FileExistsError:
            raise RunError(
                f"run {number:03d} already exists in {root}; add --resume to continue it, "
                "or leave out --run-number to start a new run"
            ) from None
        return number
    candidate = (run_numbers(root) or [0])[-1] + 1
    while True:
        try:
            run_dir(root, candidate).mkdir()
            return candidate
        except FileExistsError:
            candidate += 1


def resolve_run(root: Path, number: int | None) -> int:
    """The run to resume: ``number``, or the newest run when None."""
    numbers = run_numbers(root)
    if number is None:
        if not numbers:
            raise RunError(f"there is no run to resume in {root}; start one without --resume")
        return numbers[-1]
    if number not in numbers:
        available = ", ".join(f"{n:03d}" for n in numbers[-10:]) or "none"
        raise RunError(f"run {number:03d} does not exist in {root} (runs there: {available})")
    return number


def clear_leftovers(layout: RunLayout) -> list[Path]:
    """Before a resume (global rank 0): remove what a crash left of a ``metadata.json`` or ``config.json``
    write (the files themselves are whole: they are replaced atomically)."""
    return remove_tmp_leftovers(layout.path, names=(layout.metadata.name, layout.config.name))


def store_base(source: Path, stored: Path) -> None:
    """A LoRA run's copy of its base: a hard link when ``source`` is a checkpoint file the trainer committed
    (read-only, never rewritten), else a copy (a reflink where possible): a hand-off file that is copied over
    later must not change the runs that used it."""
    if committed_file(source):
        link_or_copy(source, stored)
    else:
        copy_file(source, stored)
    make_read_only([stored])


def hand_off(checkpoint_root: Path, number: int, which: str = "best") -> Path:
    """Copy checkpoint ``which`` (best, last, an epoch number or a tag) of base run ``number`` to the hand-off
    file a LoRA run takes when given no base (``DEFAULT_BASE``), once it matches its manifest. A hand-off
    made before is replaced, read-only or not; the new copy is the user's to replace again."""
    root = kind_root(checkpoint_root, "base")
    layout = RunLayout(run_dir(root, resolve_run(root, number)), "base")
    name = epoch_tag(int(which)) if which.isdigit() else which
    source = layout.ckpt(name)
    if not source.is_file():
        raise RunError(f"base run {layout.number:03d} has no checkpoint {which!r} ({source} does not exist)")
    verify_file(source)
    target = checkpoint_root / DEFAULT_BASE
    target.parent.mkdir(parents=True, exist_ok=True)
    copy_file(source, target)
    return target


def create_run(
    root: Path,
    kind: str,
    number: int | None,
    *,
    config: dict[str, Any],
    metadata: dict[str, Any],
    base: Path | None = None,
    key: str | None = None,
) -> tuple[RunLayout, RunLock]:
    """Allocate a run, take its lock and write its first files: folders, ``config.json``, ``metadata.json``
    (global rank 0). Returns the run and its lock, held.

    ``metadata`` is ``new_metadata``'s record without its number; ``base`` (LoRA runs) is the base model
    file, stored once in the run (a hard link where possible) with its sha256 recorded; ``key`` is the job
    an ``--auto-resume`` run belongs to.
    """
    layout = RunLayout(run_dir(root, allocate_run(root, number)), kind)
    lock = RunLock(layout)
    lock.acquire("create it")  # the folder is brand new: the lock is free
    for folder in layout.new_folders():
        folder.mkdir(parents=True)
    record = {**metadata, "run_number": layout.number}  # keeps new_metadata's key order
    if base is not None:
        store_base(base, layout.stored_base)
        record["base_checkpoint"] = {"source": str(base), "sha256": sha256_file(layout.stored_base)}
    if key is not None:
        record["run_key"] = key
    write_config(layout.config, config)
    write_metadata(layout.path, record)
    if key is not None:  # last: it makes the run its job's, and a launch of the job then reads its files
        atomic_write(layout.run_key, lambda f: f.write(f"{key}\n".encode()))
    return layout, lock
