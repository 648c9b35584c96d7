"""A run's config from files and flags, in three layers, each validated the same way (``from_dict``):
  1. a training YAML (``configs/training/*.yaml``) whose ``model:`` and ``data:`` entries name a preset
     (``configs/model/NAME.yaml``, ``configs/data/NAME.yaml``), a YAML path, or an inline mapping;
  2. command-line flags (``--epochs``, ``--model`` ...), applied as dotted overrides;
  3. ``--set key=value`` overrides (value parsed as YAML, so ``--set model.channels=[32,64]`` works).
Also ``diff_keys``: where two configs differ.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml

from trainer.config.schema import CONFIG_DIR, ConfigError, TrainConfig, from_dict

T = TypeVar("T")


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load``; a missing or malformed file is a ``ConfigError``."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}:{_where(e)} is not valid YAML: {_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def _where(error: yaml.YAMLError) -> str:
    """``LINE:COLUMN`` (1-based) where the parser stopped, for one line naming the spot."""
    mark = getattr(error, "problem_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None)
    context = getattr(error, "context", None)
    return " ".join(str(part) for part in (problem, f"({context})" if context else None) if part) or str(
        error
    )


def preset_names(section: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / section).glob("*.yaml"))


def resolve_preset(section: str, ref: str) -> Path:
    """A preset name (``diffit_tiny``) or a path to a YAML file."""
    candidate = Path(ref)
    if candidate.suffix in (".yaml", ".yml") or candidate.parent != Path("."):
        if not candidate.is_file():
            raise ConfigError(f"{section} config file not found: {candidate}")
        return candidate
    path = CONFIG_DIR / section / f"{ref}.yaml"
    if not path.is_file():
        names = preset_names(section)
        hint = difflib.get_close_matches(ref, names, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"unknown {section} '{ref}'{suggestion}; choose one of {', '.join(names)} or pass a YAML file path"
        )
    return path


# Aliases of the seed workflow's --dataset flag.
DATASET_ALIASES = {"cifar10": "cifar10", "cifar": "cifar10", "cifar100": "cifar100", "digits": "digits"}


def _section(raw: Any, section: str) -> dict[str, Any]:
    """A training YAML's ``model:``/``data:`` entry: a preset name/path or an inline mapping."""
    if isinstance(raw, str):
        return load_yaml(resolve_preset(section, raw))
    if isinstance(raw, dict):
        return raw
    raise ConfigError(f"'{section}' must be a preset name, a YAML path or a mapping, got {raw!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value parsed as YAML (numbers, lists, null...)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. --set checkpoint.keep_last_n=2), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a nested dict; validation of the key happens when the dataclass is built."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def build_config(
    base: dict[str, Any] | Path,
    overrides: list[tuple[str, Any]] = (),  # type: ignore[assignment]
    cls: type[T] = TrainConfig,  # type: ignore[assignment]
) -> T:
    """Training YAML (or an already loaded dict, e.g. a run's config.json) plus overrides → validated config.

    ``model``/``data`` overrides that are strings (``--model diffit_cifar``) replace the whole section with
    that preset; dotted ones (``model.channels``) change one key. An ``experiment`` holding ``{data}`` gets the
    data preset's name there (``diffit_lora_{data}`` with ``--data digits_0_4``: ``diffit_lora_digits_0_4``).
    """
    data = load_yaml(base) if isinstance(base, Path) else _deep_copy(base)
    preset = data.get("data") if isinstance(data.get("data"), str) else None
    for section in ("model", "data", "lora"):
        if section in data and data[section] is not None:
            data[section] = _section(data[section], section)
    for key, value in overrides:
        if key in ("model", "data", "lora"):
            if key == "data" and isinstance(value, str):
                value = preset = DATASET_ALIASES.get(value.lower(), value)
            data[key] = _section(value, key)
        else:
            apply_override(data, key, value)
    experiment = data.get("experiment")
    if isinstance(experiment, str) and "{data}" in experiment:  # named after the data preset trained on
        data["experiment"] = experiment.replace("{data}", preset or "custom_data")
    return from_dict(cls, data)


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(data))  # plain data only, which is all a config may hold


def diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys
