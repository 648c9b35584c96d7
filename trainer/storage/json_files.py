"""JSON files of a run read as data from someone else: a regular file, of bounded size and depth, or refused.

Every JSON file the tool reads from a run folder (``metadata.json``, manifests, ``run.lock``,
``trainer_state.json``, ``config.json``) goes through ``read_json_file``: no FIFO to hang on, no device or
symbolic link to read from, no 2 GB file held in memory, no nesting deep enough to exhaust the stack, no
400-digit integer. Floats may be ``inf`` or ``NaN`` (``1e400``; a diverged run's loss is ``NaN``): readers
check the fields they use, ``as_int`` among them. Each reader then checks the fields it uses; a file that
fails is reported (a ``broken`` run, a damaged checkpoint, a stale lock), never a crash.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 << 20
"""The largest JSON file read (a manifest of a large launch or a long run's metadata stays far below)."""
MAX_DEPTH = 64
"""Deeper nesting than any file of the tool has is refused."""


class BadJsonFile(ValueError):
    """A JSON file that cannot be read as data: not a regular file, too large, malformed or too deep."""


def read_json_file(path: Path, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``, read as described above; ``FileNotFoundError`` when it is absent,
    ``BadJsonFile`` (a ``ValueError``) saying why it cannot be read."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: a symbolic link
        raise BadJsonFile(f"{path.name} cannot be opened as a plain file ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadJsonFile(f"{path.name} is not a regular file")
        if info.st_size > max_bytes:
            raise BadJsonFile(f"{path.name} has {info.st_size} bytes (at most {max_bytes} are read)")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadJsonFile(f"{path.name} is larger than {max_bytes} bytes")
    return parse_json(data, path.name)


def parse_json(data: bytes | str, name: str) -> Any:
    """``data`` as JSON, within ``MAX_DEPTH``, integers within 64 bits; ``BadJsonFile`` otherwise."""
    if _depth(data) > MAX_DEPTH:
        raise BadJsonFile(f"{name} is nested more than {MAX_DEPTH} deep")
    try:
        return json.loads(data, parse_int=_bounded)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadJsonFile(f"{name} is not valid JSON ({reason})") from None


def _bounded(text: str) -> int:
    if len(text.lstrip("-")) > 18:  # beyond 64 bits: no counter of the tool gets there
        raise ValueError(f"{text[:20]}... is out of range")
    return int(text)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
"""Every byte but the four brackets: what ``bytes.translate`` deletes to leave only those."""


def _depth(data: bytes | str) -> int:
    """How deep brackets nest in ``data``, strings left out: checked before the parser recurses into it (at C
    speed but for a walk over the brackets alone)."""
    raw = data.encode() if isinstance(data, str) else data
    brackets = _STRING.sub(b"", raw).translate(None, _BRACKETS)
    return max(itertools.accumulate(1 if b in (0x5B, 0x7B) else -1 for b in brackets), default=0)


def as_int(value: Any, what: str) -> int:
    """``value`` as an int when it is one (a bool or a float with a fraction, or ``inf``, is not), else
    ``ValueError`` naming ``what``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value != value
        or value
        in (
            float("inf"),
            float("-inf"),
        )
    ):
        raise ValueError(f"{what} is not a number: {value!r}"[:200])
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{what} is not a whole number: {value!r}")
    return int(value)
