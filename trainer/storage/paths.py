"""Paths that files name, kept inside their folder: what a run folder from someone else may not make the tool do.

A manifest names the files of its checkpoint, a run folder may hold links planted by whoever wrote it: every
path read from a file goes through ``relative_inside`` where the file is parsed (relative, normalised, no
``..``), and every path the tool reads or writes under a folder through ``within`` (no component of it a
symbolic link), so a bad entry is a damaged file, never a read or a write elsewhere. The folders the tool
moves files into or deletes from are checked to be real folders of the run (``real_folder``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from trainer.errors import UserError


class OutsideFolder(UserError, ValueError):
    """A path that would leave its folder, or pass through a symbolic link (a run folder that is not the
    tool's to touch: one clear line, exit 2)."""


def relative_inside(text: object) -> str:
    """``text`` as a path relative to its folder that stays inside it: a non-empty string, not absolute, no
    empty, ``.`` or ``..`` component, no NUL; returned as written. Raises ``OutsideFolder``."""
    if not isinstance(text, str) or not text or "\0" in text or "\\" in text:
        raise OutsideFolder(f"{text!r} is not a relative path")
    path = PurePosixPath(text)
    if path.is_absolute() or text.startswith("/") or any(part in ("", ".", "..") for part in text.split("/")):
        raise OutsideFolder(f"{text!r} leaves its folder")
    return text


def within(folder: Path, relative: str) -> Path:
    """``folder / relative`` where no component below ``folder`` is a symbolic link (those that exist are
    checked; the rest will be created by the tool). Raises ``OutsideFolder``."""
    path = folder
    for part in relative_inside(relative).split("/"):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return folder / relative
        if stat.S_ISLNK(mode):
            raise OutsideFolder(f"{path} is a symbolic link")
    return path


def real_folder(path: Path, run: Path) -> Path:
    """``path``, a folder of the run ``run`` the tool moves files into or deletes from: created if missing,
    refused (``OutsideFolder``) when it, or a folder between it and the run, is a symbolic link. ``run``
    itself may be that folder."""
    relative = path.relative_to(run).as_posix()
    return_path = run if relative == "." else within(run, relative)
    return_path.mkdir(parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(return_path).st_mode):
        raise OutsideFolder(f"{return_path} is not a folder")
    return return_path
