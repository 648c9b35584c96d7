"""Comparing runs: ``--list-runs --sort/--filter/--plot`` and ``scripts/runs.py show/diff``, on fabricated
runs (metadata, config and checkpoint files written by hand; nothing is trained)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.helpers import REPO, child_env, run_script
from tests.test_runs import make_run_with_metadata
from trainer.cli import build_parser, main
from trainer.runs.layout import RunLayout, kind_root, run_dir
from trainer.runs.listing import SORT_KEYS, filter_keys, filter_runs, list_runs, sort_runs
from trainer.runs.lock import RunLock
from trainer.runs.plots import metric_figure
from trainer.runs.store import RunError
from trainer.storage.atomic import atomic_write_json
from trainer.training.kinds import run_kind

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def history(*values: float, lr: float = 0.002) -> list[dict[str, Any]]:
    return [
        {"epoch": e, "train_loss": v + 0.1, "val_loss": v, "lr": lr, "seconds": 1.5, "checkpoint": None}
        for e, v in enumerate(values, start=1)
    ]


def fabricate(tmp_path: Path, kind: str = "base") -> Path:
    """Four runs of ``kind`` under ``tmp_path`` that differ in every sort key; returns the checkpoint root."""
    root = kind_root(tmp_path, kind)
    specs = [
        # number, best, status, lr, epochs, experiment, dataset
        (1, 0.50, "completed", 0.002, 3, "beta", "Digits"),
        (2, 0.30, "failed", 0.0005, 1, "alpha", "Digits"),
        (3, 0.90, "completed", 0.01, 2, "gamma", "CIFAR10"),
        (4, None, "running", None, 0, "delta", "Digits"),
    ]
    for number, best, status, lr, epochs, experiment, dataset in specs:
        values = [0.95, 0.7, best][-epochs:] if best is not None else []
        make_run_with_metadata(
            root,
            number,
            best=best,
            kind=kind,
            status=status,
            experiment=experiment,
            dataset={"name": dataset, "num_classes": 10},
            epochs_completed=epochs,
            history=history(*values[:epochs], lr=lr or 0.0),
            config_summary={"learning_rate": lr, "batch_size": 32, "model": "diffit_tiny", "seed": 0},
        )
        if status == "running":  # a live launch holds it (this test process, as far as the lock can tell)
            RunLock(RunLayout(run_dir(root, number), kind)).acquire("test")
    return tmp_path


def numbers(rows: list[Any]) -> list[int]:
    return [r.number for r in rows]


# --------------------------------------------------------------------------------------------------
# --sort
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("run", [1, 2, 3, 4]),
        ("best", [2, 1, 3, 4]),  # lower is better for mode min; runs without a best go last
        ("epochs", [1, 3, 2, 4]),  # most epochs first
        ("status", [1, 3, 2, 4]),  # completed, completed, failed, running
        ("lr", [2, 1, 3, 4]),  # no learning rate recorded: last
        ("experiment", [2, 1, 4, 3]),
    ],
)
def test_sort_orders_runs_by_each_key(tmp_path: Path, key: str, expected: list[int]) -> None:
    rows = list_runs(kind_root(fabricate(tmp_path), "base"))
    assert numbers(sort_runs(rows, key)) == expected


def test_sort_by_best_puts_the_highest_first_for_a_max_metric(tmp_path: Path) -> None:
    root = kind_root(tmp_path, "base")
    for number, value in [(1, 0.2), (2, 0.8), (3, 0.5)]:
        make_run_with_metadata(root, number, best=value, mode="max")
    assert numbers(sort_runs(list_runs(root), "best")) == [2, 3, 1]


def test_every_sort_key_is_documented_in_help() -> None:
    text = " ".join(build_parser(run_kind("base")).format_help().split())
    for key in SORT_KEYS:
        assert f"{key}:" in text


def test_unknown_sort_key_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--list-runs", "--sort", "colour"])
    assert exc.value.code == 2
    assert "best" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# --filter
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exprs", "expected"),
    [
        (["status=completed"], [1, 3]),
        (["dataset~digits"], [1, 2, 4]),  # substring, case ignored
        (["status=completed", "dataset~Digits"], [1]),  # every filter must match
        (["lr=0.0005"], [2]),  # numbers compare as numbers
        (["lr=5e-4"], [2]),
        (["experiment=alp"], []),  # '=' is an exact match
        (["experiment~alp"], [2]),
        (["run=3"], [3]),
    ],
)
def test_filters_keep_matching_runs(tmp_path: Path, exprs: list[str], expected: list[int]) -> None:
    rows = list_runs(kind_root(fabricate(tmp_path), "base"))
    assert numbers(filter_runs(rows, exprs)) == expected


def test_unknown_filter_key_is_an_error_listing_the_valid_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fabricate(tmp_path)
    with pytest.raises(RunError, match="valid keys"):
        filter_runs(list_runs(kind_root(root, "base")), ["colour=red"])
    assert main(["--list-runs", "--checkpoint-root", str(root), "--filter", "colour=red"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown --filter key 'colour'")
    for key in ("status", "dataset", "experiment", "lr"):
        assert key in err
    assert "status" in filter_keys()


def test_filter_without_an_operator_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-runs", "--checkpoint-root", str(tmp_path), "--filter", "status"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_json_listing_is_filtered_and_sorted_and_marks_the_best_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fabricate(tmp_path)
    argv = ["--list-runs", "--json", "--checkpoint-root", str(root), "--sort", "best"]
    assert main([*argv, "--filter", "status=completed"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["number"] for r in rows] == [1, 3]
    assert [r["is_best"] for r in rows] == [True, False]  # run 2 (the overall best) is filtered out


def test_table_listing_follows_the_sort_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fabricate(tmp_path)
    assert main(["--list-runs", "--checkpoint-root", str(root), "--sort", "lr"]) == 0
    lines = capsys.readouterr().out.splitlines()[3:]
    assert [line.split()[0] for line in lines] == ["002", "001", "003", "004"]


@pytest.mark.parametrize("flags", [["--sort", "best"], ["--json"], ["--filter", "status=completed"],
                                   ["--plot", "x.png"]])  # fmt: skip
def test_listing_flags_are_refused_without_list_runs(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Alone, none of them starts a training (``--json`` once did)."""
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert f"{flags[0]} only apply to --list-runs" in err and err.count("error:") == 1


def test_list_runs_refuses_a_checkpoint_root_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not runs")
    assert main(["--list-runs", "--checkpoint-root", str(tmp_path / "notes.txt")]) == 2
    assert "is a file, not a folder of runs" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# --plot
# --------------------------------------------------------------------------------------------------


def test_plot_figure_has_one_labelled_line_per_run_with_history(tmp_path: Path) -> None:
    rows = list_runs(kind_root(fabricate(tmp_path), "base"))
    axes = metric_figure(rows).axes[0]
    lines = axes.get_lines()
    assert len(lines) == 3  # run 4 has no epochs yet
    labels = [line.get_label() for line in lines]
    assert labels[0] == "run 001 · lr 0.002 · Digits (10)"
    assert labels[2] == "run 003 · lr 0.01 · CIFAR10 (10)"
    assert np.asarray(lines[0].get_xdata()).tolist() == [1, 2, 3]
    assert np.asarray(lines[0].get_ydata()).tolist() == [0.95, 0.7, 0.5]
    assert axes.get_xlabel() == "epoch"
    assert axes.get_ylabel() == "val_loss"


@pytest.mark.parametrize("kind", ["base", "lora"])
def test_plot_writes_a_png_of_the_listed_runs(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fabricate(tmp_path / "ck", kind)
    out = tmp_path / "plots" / "runs.png"
    argv = ["--list-runs", "--json", "--checkpoint-root", str(root), "--plot", str(out)]
    assert main([*argv, "--filter", "status=completed"], kind=kind) == 0
    captured = capsys.readouterr()
    assert [r["number"] for r in json.loads(captured.out)] == [1, 3]  # stdout stays pure JSON
    assert f"Wrote {out}" in captured.err
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert sorted(os.listdir(out.parent)) == ["runs.png"]  # no temporary file left behind


@pytest.mark.distributed
def test_under_the_launcher_the_listing_and_its_chart_are_written_once(tmp_path: Path) -> None:
    root = fabricate(tmp_path / "ck", "lora")
    out = tmp_path / "runs.png"
    result = run_script("train_lora.py", ["--list-runs", "--json", "--checkpoint-root", str(root), "--plot",
                                          str(out)], accelerate_config="cpu_zero2")  # fmt: skip
    assert [r["number"] for r in json.loads(result.stdout)] == [1, 2, 3, 4]  # one table: valid JSON
    assert result.stderr.count(f"Wrote {out}") == 1 and out.read_bytes().startswith(PNG_MAGIC)


def test_plot_with_nothing_to_draw_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "empty.png"
    assert main(["--list-runs", "--checkpoint-root", str(tmp_path), "--plot", str(out)]) == 2
    assert "no" in capsys.readouterr().err and not out.exists()


def test_list_runs_does_not_import_matplotlib_or_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from trainer.cli import main; "
        f"assert main(['--list-runs', '--checkpoint-root', {str(fabricate(tmp_path))!r}, '--sort', 'best']) == 0; "
        "heavy = [m for m in ('matplotlib', 'torch') if m in sys.modules]; assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------
# scripts/runs.py show / diff
# --------------------------------------------------------------------------------------------------


def load_runs_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runs_script", REPO / "scripts" / "runs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIG = {
    "experiment": "digits",
    "model": {"name": "diffit_tiny", "channels": [16, 32]},
    "learning_rate": 0.002,
    "edm": {"num_steps": 4, "rho": 7.0},
}


def run_with_files(root: Path, number: int, config: dict[str, Any]) -> Path:
    """A base run with config.json, three epochs of history and checkpoints 2 (best) and 3 (last)."""
    path = make_run_with_metadata(kind_root(root, "base"), number, best=0.4, history=history(0.6, 0.4, 0.45))
    atomic_write_json(path / "config.json", config)
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "epoch_002.ckpt").write_bytes(b"x" * 2_000_000)
    (path / "checkpoints" / "epoch_003.ckpt").write_bytes(b"x" * 3_000_000)
    os.link(path / "checkpoints" / "epoch_002.ckpt", path / "checkpoints" / "best.ckpt")
    os.link(path / "checkpoints" / "epoch_003.ckpt", path / "checkpoints" / "last.ckpt")
    return path


def test_show_prints_config_history_and_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_with_files(tmp_path, 1, CONFIG)
    assert load_runs_script().main(["show", "1", "--checkpoint-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "best: val_loss = 0.4 at epoch 2 (mode min)" in out
    assert 'model.name = "diffit_tiny"' in out and "edm.num_steps = 4" in out
    history_rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:3] for row in history_rows] == [
        ["1", "0.7", "0.6"],
        ["2", "0.5", "0.4"],
        ["3", "0.55", "0.45"],
    ]
    checkpoint_lines = {line.split()[0]: line for line in out.splitlines() if ".ckpt" in line}
    assert "2.00 MB" in checkpoint_lines["checkpoints/epoch_002.ckpt"]
    assert checkpoint_lines["checkpoints/epoch_002.ckpt"].endswith("best")
    assert checkpoint_lines["checkpoints/epoch_003.ckpt"].endswith("last")
    assert checkpoint_lines["checkpoints/best.ckpt"].endswith("best -> epoch_002.ckpt")
    assert checkpoint_lines["checkpoints/last.ckpt"].endswith("last -> epoch_003.ckpt")


def test_diff_prints_only_the_keys_that_differ_with_both_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_with_files(tmp_path, 1, CONFIG)
    other = {**CONFIG, "learning_rate": 0.01, "model": {"name": "diffit_tiny", "channels": [32, 64]}}
    del other["experiment"]
    run_with_files(tmp_path, 2, other)
    assert load_runs_script().main(["diff", "1", "2", "--checkpoint-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Config keys that differ between run 001 and run 002:"
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[3:]}
    assert set(rows) == {"experiment", "learning_rate", "model.channels"}
    assert rows["learning_rate"].split() == ["0.002", "0.01"]
    assert rows["model.channels"].split() == ["[16,", "32]", "[32,", "64]"]
    assert rows["experiment"].split() == ['"digits"', "(absent)"]


def test_diff_of_identical_configs_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_with_files(tmp_path, 1, CONFIG)
    run_with_files(tmp_path, 2, CONFIG)
    assert load_runs_script().main(["diff", "1", "2", "--checkpoint-root", str(tmp_path)]) == 0
    assert "same config" in capsys.readouterr().out


def test_runs_script_refuses_a_missing_run(tmp_path: Path) -> None:
    run_with_files(tmp_path, 1, CONFIG)
    for args in (["show", "7"], ["diff", "1", "7"], ["show", "1", "--kind", "lora"]):
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "runs.py"), *args, "--checkpoint-root", str(tmp_path)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: run 00"), result.stderr
        assert result.stdout == ""
