"""``scripts/runs.py show`` and ``diff``: one run's config, history and checkpoints; two runs' config diff.

Text only, read from ``config.json``, ``metadata.json`` and the checkpoint folder; no tensors are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.checkpoint.manifest import read_manifests
from trainer.checkpoint.retention import Scores, plan_retention
from trainer.config.files import diff_keys
from trainer.config.schema import CheckpointConfig, from_dict
from trainer.errors import UserError
from trainer.runs.layout import RunLayout, kind_root, run_dir
from trainer.runs.listing import summarize
from trainer.runs.metadata import read_metadata
from trainer.runs.store import RunError, read_config, resolve_run

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "lr", "seconds", "checkpoint"]
_ABSENT = "(absent)"


def find_run(checkpoint_root: Path, kind: str, number: int) -> Path:
    """The folder of run ``number``; a missing run is a ``RunError`` naming the runs that exist."""
    root = kind_root(checkpoint_root, kind)
    return run_dir(root, resolve_run(root, number))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: ``{"edm": {"rho": 7}}`` → ``{"edm.rho": 7}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def lookup(data: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key, or ``_ABSENT``."""
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def show_value(value: Any) -> str:
    return value if value is _ABSENT else json.dumps(value)


def table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append(indent + "  ".join("-" * w for w in widths))
    lines += [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def checkpoint_files(run: Path) -> list[tuple[str, int, str]]:
    """(path relative to the run, bytes, note) of every ``.ckpt`` in the run.

    ``best.ckpt``/``last.ckpt`` are hard links to an epoch file: the epoch file's note says which of them
    point at it, and theirs names the file (or says "copy" where the file system could not link).
    """
    layout = RunLayout.detect(run)
    if layout is None:
        return []
    found: list[Path] = []
    for folder in (layout.checkpoints, layout.stored_base.parent):
        if folder.is_dir():
            found += sorted(p for p in folder.glob("*.ckpt") if not p.name.startswith("."))
    aliases = [p for p in found if p.stem in ("best", "last")]
    why = kept_because(layout)
    rows = []
    for path in found:
        if path in aliases:
            target = [p.name for p in found if p not in aliases and _same_file(p, path)]
            note = f"{path.stem} -> {target[0]}" if target else f"{path.stem} (copy)"
        elif path == layout.stored_base:
            note = "base model the adapters apply to"
        else:
            links = [a.stem for a in aliases if _same_file(path, a)]
            kept = f"kept: {', '.join(why[path.stem])}" if path.stem in why else ""
            note = "; ".join(filter(None, [", ".join(links), kept]))
        rows.append((str(path.relative_to(run)), path.stat().st_size, note))
    return rows


def kept_because(layout: RunLayout) -> dict[str, list[str]]:
    """Why retention keeps each committed checkpoint of the run (its rules, as the run is configured)."""
    try:
        policy = from_dict(
            CheckpointConfig, read_config(layout.config).get("checkpoint") or {}, "checkpoint."
        )
        meta = read_metadata(layout.path)
        best = meta.get("best") or {}
        scores = Scores.from_history(meta.get("history") or [], best)
        return plan_retention(
            read_manifests(layout.checkpoints), policy.retention(), best.get("epoch"), scores
        ).keep
    except (UserError, OSError, ValueError, TypeError, AttributeError, KeyError):  # hand-edited or damaged
        return {}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def format_show(run: Path) -> str:
    """Everything ``runs.py show`` prints about one run. Its header comes from ``--list-runs``'s summary (the
    same checks of every field); a file that cannot be read is said so in its own section."""
    summary = summarize(run.parent, int(run.name.removeprefix("run_")))
    lines = [
        f"Run {run.name.removeprefix('run_')} ({run})",
        f"  kind: {summary.kind or '-'}   experiment: {summary.experiment or '-'}   status: {summary.status}",
        f"  dataset: {summary.dataset or '-'}   epochs: {_cell(summary.epochs_completed)}/"
        f"{summary.epochs_total or '?'}",
    ]
    if summary.origin:
        lines.append(f"  started from: run {summary.origin}")
    if summary.best_epoch is not None:
        lines.append(f"  best: {summary.best_metric} = {_cell(summary.best_value)} at epoch {summary.best_epoch} "
                     f"(mode {summary.best_mode})")  # fmt: skip
    lines += ["", "Config (config.json):"]
    try:
        lines += [
            f"  {key} = {show_value(value)}"
            for key, value in flatten(read_config(run / "config.json")).items()
        ]
    except RunError as e:
        lines.append(f"  (cannot be shown: {e})")
    lines += ["", "History:"]
    history = _history(run) if not summary.status.startswith("broken") else []
    if history:
        columns = [c for c in HISTORY_COLUMNS if any(c in h for h in history)]
        lines += table(columns, [[_cell(h.get(c)) for c in columns] for h in history])
    else:
        lines.append("  (no epochs yet)")
    files = checkpoint_files(run)
    lines += ["", "Checkpoints on disk:"]
    if files:
        body = [[name, f"{size / 1e6:.2f} MB", note] for name, size, note in files]
        lines += table(["file", "size", "note"], body)
    else:
        lines.append("  (none)")
    return "\n".join(lines)


def _history(run: Path) -> list[dict[str, Any]]:
    try:
        history = read_metadata(run).get("history")
    except (OSError, ValueError):
        return []
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def format_diff(run_a: Path, run_b: Path) -> str:
    """The config keys that differ between two runs, with both values."""
    a, b = read_config(run_a / "config.json"), read_config(run_b / "config.json")
    keys = diff_keys(a, b)
    name_a, name_b = f"run {run_a.name.removeprefix('run_')}", f"run {run_b.name.removeprefix('run_')}"
    if not keys:
        return f"{name_a} and {name_b} have the same config"
    lines = [f"Config keys that differ between {name_a} and {name_b}:"]
    lines += table(
        ["key", name_a, name_b], [[k, show_value(lookup(a, k)), show_value(lookup(b, k))] for k in keys]
    )
    return "\n".join(lines)
