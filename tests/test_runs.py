"""Run folders' promises: numbers start at 001 and keep growing (as integers, never by name or file time),
racing launches get distinct runs, metadata.json is replaced atomically by rank 0 only, and ``--list-runs``
shows every run (broken ones too) with the best one marked, reading nothing but metadata.json.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trainer.runs.layout import RunLayout, kind_root, run_dir
from trainer.runs.listing import format_table, list_runs
from trainer.runs.metadata import RunHandle, new_metadata, read_metadata, write_metadata
from trainer.runs.store import RunError, allocate_run, resolve_run, run_numbers

TABLE_COLUMNS = ["Run #", "Experiment", "Dataset", "Epochs", "Checkpoints", "Best", "Value", "Status"]


def make_runs(root: Path, *numbers: int) -> None:
    for number in numbers:
        run_dir(root, number).mkdir(parents=True)


def make_run_with_metadata(
    root: Path, number: int, *, best: float | None = None, mode: str = "min", **fields: Any
) -> Path:
    path = run_dir(root, number)
    path.mkdir(parents=True)
    meta = new_metadata(
        number=number,
        kind="base",
        experiment=f"exp{number}",
        dataset="Digits",
        num_classes=10,
        world_size=1,
        distributed="single",
    )
    meta.update(epochs_total=3, epochs_completed=3, checkpoints=[2, 3], status="completed")
    if best is not None:
        meta["best"] = {"epoch": 2, "metric": "val_loss", "value": best, "mode": mode}
    meta.update(fields)
    write_metadata(path, meta)
    return path


# --------------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------------


def test_first_run_is_number_1_in_folder_run_001(tmp_path: Path) -> None:
    root = kind_root(tmp_path / "checkpoints", "base")
    assert allocate_run(root) == 1
    assert (root / "run_001").is_dir()
    assert root == tmp_path / "checkpoints" / "base_training"


def test_run_numbers_continue_after_the_highest_existing_run(tmp_path: Path) -> None:
    make_runs(tmp_path, 1, 2, 7)  # gaps are left alone, never refilled
    (tmp_path / "run_notes").mkdir()
    (tmp_path / "run_42").mkdir()  # not a run folder name: fewer than 3 digits
    (tmp_path / "run_050").write_text("a file, not a run folder")
    assert allocate_run(tmp_path) == 8
    assert allocate_run(tmp_path) == 9
    assert run_numbers(tmp_path) == [1, 2, 7, 8, 9]


def test_allocation_skips_a_number_taken_by_a_file(tmp_path: Path) -> None:
    make_runs(tmp_path, 9)
    (tmp_path / "run_010").write_text("")
    assert allocate_run(tmp_path) == 11


def test_run_1000_follows_run_999_and_listing_sorts_numerically(tmp_path: Path) -> None:
    make_runs(tmp_path, 998, 999)
    assert allocate_run(tmp_path) == 1000
    assert (tmp_path / "run_1000").is_dir()
    assert run_numbers(tmp_path) == [998, 999, 1000]
    assert resolve_run(tmp_path, None) == 1000
    rows = list_runs(tmp_path)
    assert [r.number for r in rows] == [998, 999, 1000]
    lines = format_table(rows, "runs").splitlines()
    assert [line.split()[0] for line in lines[3:]] == ["998", "999", "1000"]


def test_explicit_run_number_is_used_when_free(tmp_path: Path) -> None:
    make_runs(tmp_path, 1)
    assert allocate_run(tmp_path, 42) == 42
    assert (tmp_path / "run_042").is_dir()


def test_explicit_run_number_of_an_existing_run_is_refused_pointing_to_resume(tmp_path: Path) -> None:
    make_runs(tmp_path, 3)
    (run_dir(tmp_path, 3) / "keep.txt").write_text("untouched")
    with pytest.raises(RunError, match="--resume") as info:
        allocate_run(tmp_path, 3)
    assert "003" in str(info.value)
    assert (run_dir(tmp_path, 3) / "keep.txt").read_text() == "untouched"


def test_unwritable_checkpoint_root_is_refused_naming_the_folder_and_the_flag(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    root = blocker / "checkpoints" / "base_training"  # tests run as root: chmod would not stop a write
    with pytest.raises(RunError, match="--checkpoint-root") as info:
        allocate_run(root)
    assert str(root) in str(info.value)


def test_allocation_leaves_no_probe_file_behind(tmp_path: Path) -> None:
    allocate_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_001"]


ALLOCATE_WHEN_STARTED = """
import sys, time
from pathlib import Path
from trainer.runs.store import allocate_run
root, start = Path(sys.argv[1]), Path(sys.argv[2])
deadline = time.monotonic() + 60
while not start.exists():
    if time.monotonic() > deadline:
        sys.exit("start file never appeared")
    time.sleep(0.001)
print(allocate_run(root))
"""


def test_concurrent_allocations_get_distinct_runs(tmp_path: Path) -> None:
    root, start, launches = tmp_path / "base_training", tmp_path / "start", 6
    make_runs(root, 4)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ALLOCATE_WHEN_STARTED, str(root), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(launches)
    ]
    time.sleep(0.5)  # let the interpreters start and wait on the start file, so the calls really race
    start.touch()
    numbers = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        numbers.append(int(out))
    assert sorted(numbers) == list(range(5, 5 + launches))
    assert run_numbers(root) == [4, *range(5, 5 + launches)]


# --------------------------------------------------------------------------------------------------
# Resolution (--resume)
# --------------------------------------------------------------------------------------------------


def test_resume_without_a_number_picks_the_highest_number_not_the_newest_folder(tmp_path: Path) -> None:
    make_runs(tmp_path, 2, 10, 9)
    future = time.time() + 3600
    os.utime(run_dir(tmp_path, 2), (future, future))  # run 2 touched most recently
    assert resolve_run(tmp_path, None) == 10


def test_resume_of_an_existing_number_returns_it(tmp_path: Path) -> None:
    make_runs(tmp_path, 1, 2, 3)
    assert resolve_run(tmp_path, 2) == 2


def test_resume_of_a_missing_run_is_refused_listing_the_available_runs(tmp_path: Path) -> None:
    make_runs(tmp_path, 1, 3)
    with pytest.raises(RunError, match="run 002 does not exist") as info:
        resolve_run(tmp_path, 2)
    assert "001, 003" in str(info.value)


@pytest.mark.parametrize("exists", [True, False], ids=["empty-root", "missing-root"])
def test_resume_with_no_runs_is_refused(tmp_path: Path, exists: bool) -> None:
    root = tmp_path / "base_training"
    if exists:
        root.mkdir()
    with pytest.raises(RunError, match="no run to resume"):
        resolve_run(root, None)
    with pytest.raises(RunError, match="runs there: none"):
        resolve_run(root, 1)


# --------------------------------------------------------------------------------------------------
# metadata.json
# --------------------------------------------------------------------------------------------------


def test_write_metadata_replaces_the_file_atomically_and_stamps_updated_at(tmp_path: Path) -> None:
    path = make_run_with_metadata(tmp_path, 1)
    meta = read_metadata(path)
    meta["updated_at"] = "2000-01-01T00:00:00+00:00"
    meta["epochs_completed"] = 2
    inode_before = (path / "metadata.json").stat().st_ino
    write_metadata(path, meta)
    assert sorted(p.name for p in path.iterdir()) == ["metadata.json"]  # no temporary file left
    assert (path / "metadata.json").stat().st_ino != inode_before  # a new file renamed in, not rewritten
    on_disk = json.loads((path / "metadata.json").read_text())
    assert on_disk["epochs_completed"] == 2
    assert on_disk["updated_at"] != "2000-01-01T00:00:00+00:00"
    assert on_disk["created_at"] == meta["created_at"]


def test_new_metadata_records_the_run_and_starts_running(tmp_path: Path) -> None:
    meta = new_metadata(
        number=5,
        kind="base",
        experiment="e",
        dataset="CIFAR-10",
        num_classes=10,
        world_size=2,
        distributed="ddp",
    )
    assert meta["run_number"] == 5
    assert meta["status"] == "running"
    assert meta["dataset"] == {"name": "CIFAR-10", "num_classes": 10}
    assert json.loads(json.dumps(meta)) == meta  # plain JSON data


def test_run_handle_on_the_main_process_records_progress(tmp_path: Path) -> None:
    path = make_run_with_metadata(tmp_path, 1, status="running")
    run = RunHandle(RunLayout(path, "base"), is_main=True)
    run.update(epochs_completed=1, checkpoints=[1])
    run.finish("completed")
    meta = read_metadata(path)
    assert (meta["epochs_completed"], meta["checkpoints"], meta["status"]) == (1, [1], "completed")


def test_run_handle_on_other_ranks_never_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run_dir(tmp_path, 1)
    path.mkdir()  # no metadata.json at all: a non-main rank must not even read it

    progress = {"epoch": 1, "global_step": 10, "history": [{"epoch": 1}], "best": {"epoch": 1}}
    run = RunHandle(RunLayout(path, "base"), is_main=False)
    run.print("only rank 0 prints")
    run.update(status="completed")
    run.record_progress(progress, kept=[1])
    run.record_resume(
        checkpoint="epoch_001", progress=progress, world_size=2, distributed="ddp", precision="bf16"
    )
    run.record_save({"tag": "epoch_001"})
    run.record_event("fallback", tag="epoch_002", reason="test")
    run.warn("only rank 0 warns")
    run.finish("failed")
    assert list(path.iterdir()) == []
    assert capsys.readouterr() == ("", "")


# --------------------------------------------------------------------------------------------------
# Listing (--list-runs)
# --------------------------------------------------------------------------------------------------


def test_listing_table_has_the_columns_and_marks_the_lowest_loss_as_best(tmp_path: Path) -> None:
    make_run_with_metadata(tmp_path, 1, best=0.30)
    make_run_with_metadata(tmp_path, 2, best=0.10)
    make_run_with_metadata(tmp_path, 3, best=0.20)
    rows = list_runs(tmp_path)
    assert [r.is_best for r in rows] == [False, True, False]
    lines = format_table(rows, "Base model training runs").splitlines()
    assert lines[0] == "Base model training runs"
    assert [c.strip() for c in lines[1].split("  ") if c.strip()] == TABLE_COLUMNS
    best_lines = [line for line in lines if "<- best" in line]
    assert len(best_lines) == 1
    assert best_lines[0].startswith("002")
    assert "0.1000" in best_lines[0]
    assert "Digits (10)" in best_lines[0]
    assert "3/3" in best_lines[0]


def test_listing_marks_the_highest_value_for_a_metric_to_maximise(tmp_path: Path) -> None:
    make_run_with_metadata(tmp_path, 1, best=0.3, mode="max")
    make_run_with_metadata(tmp_path, 2, best=0.1, mode="max")
    rows = list_runs(tmp_path)
    assert [r.is_best for r in rows] == [True, False]


def test_listing_of_an_empty_root_says_no_runs(tmp_path: Path) -> None:
    assert list_runs(tmp_path / "missing") == []
    assert "no runs yet" in format_table([], "Base model training runs")


@pytest.mark.parametrize(
    "content",
    [None, b"", b'{"run_number": 2, "status": "runn', b"[1, 2, 3]", b"\x00\xff not utf-8"],
    ids=["missing", "empty", "truncated", "not-an-object", "binary"],
)
def test_runs_with_missing_or_corrupt_metadata_are_listed_as_broken(
    tmp_path: Path, content: bytes | None
) -> None:
    make_run_with_metadata(tmp_path, 1, best=0.5)
    run_dir(tmp_path, 2).mkdir()
    if content is not None:
        (run_dir(tmp_path, 2) / "metadata.json").write_bytes(content)
    make_run_with_metadata(tmp_path, 3, best=0.4)
    rows = list_runs(tmp_path)
    assert [r.number for r in rows] == [1, 2, 3]
    assert rows[1].status.startswith("broken")
    assert [r.is_best for r in rows] == [False, False, True]
    broken_line = format_table(rows, "runs").splitlines()[4]
    assert broken_line.startswith("002") and "broken" in broken_line


def test_runs_with_wrongly_shaped_metadata_are_listed_as_broken(tmp_path: Path) -> None:
    make_run_with_metadata(tmp_path, 1, best=0.5)
    run_dir(tmp_path, 2).mkdir()
    (run_dir(tmp_path, 2) / "metadata.json").write_text('{"best": 3, "dataset": "Digits"}')
    rows = list_runs(tmp_path)
    assert rows[1].status.startswith("broken")


def test_listing_rows_convert_to_json(tmp_path: Path) -> None:
    make_run_with_metadata(tmp_path, 1, best=0.25, config_summary={"learning_rate": 0.001})
    run_dir(tmp_path, 2).mkdir()
    rows = [r.to_dict() for r in list_runs(tmp_path)]
    assert json.loads(json.dumps(rows)) == rows
    assert rows[0]["number"] == 1
    assert rows[0]["experiment"] == "exp1"
    assert rows[0]["best_value"] == 0.25
    assert rows[0]["best_metric"] == "val_loss"
    assert rows[0]["learning_rate"] == 0.001
    assert rows[0]["is_best"] is True
    assert rows[1]["status"] == "broken: no metadata.json"


def test_listing_1000_runs_reads_only_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = json.dumps({"status": "completed", "best": None, "checkpoints": [1]})
    for number in range(1, 1001):
        path = run_dir(tmp_path, number)
        (path / "checkpoints").mkdir(parents=True)
        (path / "metadata.json").write_text(text)
        (path / "config.json").write_text("{}")
    opened: list[Path] = []
    real_open, real_os_open = builtins.open, os.open

    def recording_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(file, int):  # os.fdopen: the file os.open opened
            opened.append(Path(file))
        return real_open(file, *args, **kwargs)

    def recording_os_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(os, "open", recording_os_open)
    rows = list_runs(tmp_path)
    monkeypatch.undo()
    assert len(rows) == 1000
    assert [r.number for r in rows] == list(range(1, 1001))
    assert {p.name for p in opened} == {"metadata.json"}
    assert len(opened) == 1000


def test_a_jobs_run_is_its_jobs_only_once_its_files_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another launch of the job finds the run by its key file and reads its metadata at once: the key file
    is written last."""
    from trainer.runs import store

    seen: list[bool] = []
    write = store.write_metadata

    def watching(run: Path, metadata: dict[str, Any]) -> None:
        seen.append((run / "run_key").exists())
        write(run, metadata)

    monkeypatch.setattr(store, "write_metadata", watching)
    meta = new_metadata(
        kind="base", experiment="e", dataset="d", num_classes=2, world_size=1, distributed="single"
    )
    layout, lock = store.create_run(tmp_path, "base", None, config={}, metadata=meta, key="jobA")
    lock.release()
    assert seen == [False] and layout.run_key.read_text() == "jobA\n"
    assert read_metadata(layout.path)["run_key"] == "jobA"
