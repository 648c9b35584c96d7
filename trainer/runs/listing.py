"""The ``--list-runs`` table: one summary per run from its ``metadata.json``, sorted, filtered, the best marked.

Reads metadata only (no tensors, no torch import), so listing 1,000 runs takes well under a second.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoint.manifest import read_manifests
from trainer.runs.layout import RunLayout, kind_of, run_dir
from trainer.runs.lock import is_live
from trainer.runs.metadata import MalformedMetadata, read_metadata
from trainer.runs.store import RunError, run_numbers
from trainer.storage.json_files import as_int


@dataclass
class RunSummary:
    """One row of ``--list-runs``; plain data, also returned by ``trainer.list_runs``."""

    number: int
    path: str
    kind: str | None
    experiment: str | None
    dataset: str | None
    epochs_completed: int | None
    epochs_total: int | None
    checkpoints: int | None
    best_epoch: int | None
    best_metric: str | None
    best_value: float | None
    status: str
    learning_rate: float | None = None
    best_mode: str = "min"
    """Whether lower (min) or higher (max) values of best_metric are better."""
    is_best: bool = False
    origin: str | None = None
    """Where the run started from: ``003@epoch_020`` (forked from run 3's epoch 20, or its weights)."""
    precision: str | None = None
    """What the model computes in (``fp32``, ``bf16``, ``fp16``) as of the run's latest launch; None for a
    run whose metadata does not say."""
    fid: float | None = None
    """FID of the best epoch: the evaluation with the most samples (``scripts/evaluate.py``), else the one
    computed in training."""
    fid_samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(root: Path, number: int) -> RunSummary:
    """Summary of one run from its metadata, corrected by what is committed (a process that died may not
    have recorded its last checkpoints) and by its lock (a ``running`` run whose process is gone ``died``);
    unreadable metadata gives a row that says so."""
    layout = RunLayout(run_dir(root, number), kind_of(root))
    path = layout.path
    try:
        meta = read_metadata(path)
        committed = read_manifests(layout.checkpoints)
        newest = committed[-1] if committed else None
        behind = newest is not None and newest.global_step > as_int(
            meta.get("global_step") or 0, "global_step"
        )
        best = (newest.best if behind and newest is not None else None) or meta.get("best") or {}
        epochs = newest.epoch if behind and newest is not None else _int_or_none(meta.get("epochs_completed"))
        status = str(meta.get("status", "unknown"))
        if status == "running" and not is_live(layout):
            status = "died"
        dataset = meta.get("dataset") or {}
        config = meta.get("config_summary") or {}
        return RunSummary(
            number=number,
            path=str(path),
            kind=_text(meta.get("kind")),
            experiment=_text(meta.get("experiment")),
            dataset=f"{_text(dataset.get('name'))} ({_int_or_none(dataset.get('num_classes'))})"
            if dataset
            else None,
            epochs_completed=epochs,
            epochs_total=_int_or_none(meta.get("epochs_total")),
            checkpoints=sum(m.is_epoch for m in committed),
            best_epoch=_int_or_none(best.get("epoch")),
            best_metric=_text(best.get("metric")),
            best_value=None if best.get("value") is None else _number(best["value"]),
            status=_text(status) or "unknown",
            learning_rate=None if config.get("learning_rate") is None else _number(config["learning_rate"]),
            best_mode="max" if best.get("mode") == "max" else "min",
            origin=origin(meta),
            precision=_text(meta.get("precision")),
            **fid_of_best(meta, best),
        )
    except FileNotFoundError:
        status = "broken: no metadata.json"
    except MalformedMetadata as e:
        status = f"broken: malformed metadata.json ({e})"
    except (OSError, ValueError) as e:  # unreadable: not a plain file, too large or too deep, not JSON
        status = f"broken: unreadable metadata.json ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    except (AttributeError, TypeError, KeyError) as e:  # valid JSON of the wrong shape
        status = f"broken: malformed metadata.json ({type(e).__name__})"
    return RunSummary(number, str(path), None, None, None, None, None, None, None, None, None, status)


def fid_of_best(meta: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """``fid`` and ``fid_samples`` of the best epoch: of its evaluation with the most samples, else of its
    history entry (an FID in training); empty when it has none."""
    epoch = best.get("epoch")
    if epoch is None:
        return {}
    found = [
        (as_int(e["num_samples"], "num_samples"), _number(e["value"]))
        for e in meta.get("evaluations") or []
        if e.get("epoch") == epoch and e.get("metric") == "fid"
    ]
    found += [
        (as_int(h.get("fid_samples") or 0, "fid_samples"), _number(h["fid"]))
        for h in meta.get("history") or []
        if h.get("epoch") == epoch and h.get("fid") is not None
    ]
    if not found:
        return {}
    samples, value = max(found, key=lambda f: f[0])
    return {"fid": value, "fid_samples": samples or None}


def origin(meta: dict[str, Any]) -> str | None:
    """``RUN@TAG`` of the checkpoint a run was forked from (or took its initial weights from)."""
    record = meta.get("forked_from") or meta.get("init_from") or {}
    if record.get("run") is None:
        return Path(str(record["source"])).name if record.get("source") else None
    return f"{as_int(record['run'], 'run'):03d}@{_text(record.get('tag'))}"


def _int_or_none(value: Any) -> int | None:
    return None if value is None else as_int(value, "a count")


def _text(value: Any) -> str | None:
    """A text field of metadata: a string or absent; anything else is malformed (``TypeError``)."""
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{type(value).__name__} where a text belongs")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{type(value).__name__} where a number belongs")
    return float(value)


def list_runs(root: Path) -> list[RunSummary]:
    """Every run under ``root`` in run-number order; the best by the newest run's metric is marked."""
    return mark_best([summarize(root, n) for n in run_numbers(root)])


def mark_best(rows: list[RunSummary]) -> list[RunSummary]:
    """Set ``is_best`` on the best of ``rows`` by the metric of the newest scored run (and on no other)."""
    for r in rows:
        r.is_best = False
    scored = [r for r in rows if r.best_value is not None]
    if scored:
        newest = max(scored, key=lambda r: r.number)
        metric, mode = newest.best_metric, newest.best_mode
        same = sorted(
            (r for r in scored if r.best_metric == metric and r.best_mode == mode), key=lambda r: r.number
        )
        pick = max if mode == "max" else min
        pick(same, key=lambda r: float(r.best_value or 0.0)).is_best = True
    return rows


# Sort keys of --list-runs --sort. Missing values always go last, whatever the order.
SORT_KEYS: dict[str, str] = {
    "run": "run number (the default)",
    "best": "best value, best first (lower first for mode min, higher first for mode max)",
    "epochs": "epochs completed, most first",
    "status": "status, alphabetically",
    "lr": "learning rate, lowest first",
    "experiment": "experiment name, alphabetically",
    "dataset": "dataset name, alphabetically",
}


def _sort_value(row: RunSummary, key: str) -> Any:
    """What ``sort_runs`` orders ``row`` by (ascending); None when the run does not have it."""
    if key == "best":
        if row.best_value is None:
            return None
        return -row.best_value if row.best_mode == "max" else row.best_value  # 'max': higher is better
    if key == "epochs":
        return None if row.epochs_completed is None else -row.epochs_completed  # most first
    plain = {
        "run": row.number,
        "lr": row.learning_rate,
        "status": row.status,
        "experiment": row.experiment,
        "dataset": row.dataset,
    }
    return plain[key]


def sort_runs(rows: list[RunSummary], key: str) -> list[RunSummary]:
    """``rows`` ordered by one of ``SORT_KEYS``; ties and rows without the value keep run-number order."""
    if key not in SORT_KEYS:
        raise RunError(f"unknown sort key {key!r}; choose one of: {', '.join(SORT_KEYS)}")
    ordered = sorted(rows, key=lambda r: r.number)
    present = [r for r in ordered if _sort_value(r, key) is not None]
    missing = [r for r in ordered if _sort_value(r, key) is None]
    return sorted(present, key=lambda r: _sort_value(r, key)) + missing


# Short names accepted by --filter besides the RunSummary field names themselves.
FILTER_ALIASES = {
    "run": "number",
    "lr": "learning_rate",
    "epochs": "epochs_completed",
    "best": "best_value",
    "metric": "best_metric",
    "mode": "best_mode",
}
_FILTER = re.compile(r"^\s*([A-Za-z_]+)\s*([=~])(.*)$")


def filter_keys() -> list[str]:
    """Every key ``--filter`` accepts: the summary fields and their short aliases."""
    return sorted({*RunSummary.__dataclass_fields__, *FILTER_ALIASES})


@dataclass(frozen=True)
class RunFilter:
    """``key=value`` (equal; numbers compared as numbers) or ``key~text`` (contains, ignoring case)."""

    key: str
    op: str
    value: str

    @classmethod
    def parse(cls, expr: str) -> RunFilter:
        match = _FILTER.match(expr)
        if not match:
            raise RunError(f"--filter takes KEY=VALUE or KEY~SUBSTRING, got {expr!r}")
        key, op, value = match.groups()
        if key not in filter_keys():
            raise RunError(f"unknown --filter key {key!r}; valid keys: {', '.join(filter_keys())}")
        return cls(FILTER_ALIASES.get(key, key), op, value.strip())

    def matches(self, row: RunSummary) -> bool:
        field = getattr(row, self.key)
        if field is None:
            return False
        if self.op == "~":
            return self.value.lower() in str(field).lower()
        if isinstance(field, bool):
            return str(field).lower() == self.value.lower()
        if isinstance(field, int | float):
            try:
                return float(field) == float(self.value)
            except ValueError:
                return False
        return str(field) == self.value


def filter_runs(rows: list[RunSummary], exprs: list[str]) -> list[RunSummary]:
    """The rows matching every ``--filter`` expression (all expressions are checked before any row)."""
    filters = [RunFilter.parse(e) for e in exprs]
    return [r for r in rows if all(f.matches(r) for f in filters)]


def monitored_series(run: Path) -> tuple[str, list[int], list[float]]:
    """(metric, epochs, values) of the metric a run monitors, from its metadata history.

    The metric is the one its ``best`` names; before any best exists, ``val_loss`` if the history has it,
    else ``train_loss``. Epochs without the value are skipped.
    """
    meta = read_metadata(run)
    history = [h for h in meta.get("history") or [] if isinstance(h, dict)]
    metric = (meta.get("best") or {}).get("metric")
    if metric is None:
        metric = "val_loss" if any("val_loss" in h for h in history) else "train_loss"
    points = [
        (h["epoch"], float(h[metric]))
        for h in history
        if type(h.get("epoch")) is int and type(h.get(metric)) in (int, float)  # not bool: hand-edited files
    ]
    return str(metric), [e for e, _ in points], [v for _, v in points]


def format_table(rows: list[RunSummary], title: str) -> str:
    """The human table of ``--list-runs``."""
    if not rows:
        return f"{title}: no runs yet"
    lineage = any(r.origin for r in rows)  # the From column only where some run has one
    mixed = any(r.precision not in (None, "fp32") for r in rows)  # Precision: where some run is not fp32
    fids = any(r.fid is not None for r in rows)  # FID: where some run has one
    headers = ["Run #", "Experiment", "Dataset", *(["From"] if lineage else []), *(["Precision"] if mixed else []),
               "Epochs", "Checkpoints", "Best", "Value", *(["FID (samples)"] if fids else []), "Status"]  # fmt: skip
    body = []
    for r in rows:
        epochs = "-" if r.epochs_completed is None else f"{r.epochs_completed}/{r.epochs_total or '?'}"
        best = "-" if r.best_epoch is None else f"{r.best_metric} @ {r.best_epoch}"
        value = "-" if r.best_value is None else f"{r.best_value:.4f}"
        body.append(
            [
                f"{r.number:03d}",
                r.experiment or "-",
                r.dataset or "-",
                *([r.origin or "-"] if lineage else []),
                *([r.precision or "-"] if mixed else []),
                epochs,
                "-" if r.checkpoints is None else str(r.checkpoints),
                best,
                value + ("  <- best" if r.is_best else ""),
                *([_fid_cell(r)] if fids else []),
                r.status,
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


def _fid_cell(row: RunSummary) -> str:
    if row.fid is None:
        return "-"
    return f"{row.fid:.3f}" + (f" ({row.fid_samples:,})" if row.fid_samples else "")
