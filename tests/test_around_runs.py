"""Nothing a user does around a run loses or silently changes it: stored bases, a best that exists, damaged
metadata, changed flags on resume, the images/s of a resumed epoch, file modes, sample grids.

Tiny single-process runs, in this process (``tests.helpers.run_cli``, the twin of a plain `python` launch);
the cases that need separate processes launch them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import base_argv, copy_runs, lora_argv, run_cli, run_in_process
from tests.helpers import metadata as meta
from trainer.errors import UserError
from trainer.runs.layout import RunLayout

pytestmark = pytest.mark.slow
NO_GRIDS = ("--set", "logging.sample_every_n_epochs=0")


def base(root: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return run_cli("base", base_argv(root, *NO_GRIDS, *args), env=env)


def lora(root: Path, *args: str) -> Any:
    return run_cli("lora", lora_argv(root, *NO_GRIDS, "--max-steps-per-epoch", "1", *args))


def ok(result: Any) -> Any:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def refused(result: Any, *phrases: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


RUN = Path("base_training") / "run_001"


# --------------------------------------------------------------------------------------------------
# A best that exists; which base a LoRA run uses
# --------------------------------------------------------------------------------------------------


def test_a_new_best_is_saved_whatever_the_epoch_interval(tmp_path: Path) -> None:
    """mode max on a falling loss: epoch 1 is the best, though only every second epoch is due."""
    ok(
        base(
            tmp_path,
            "--epochs",
            "2",
            "--set",
            "checkpoint.save_every_n_epochs=2",
            "--set",
            "checkpoint.mode=max",
        )
    )
    layout = RunLayout(tmp_path / RUN, "base")
    assert meta(layout.path)["best"]["epoch"] == 1
    assert os.path.samefile(layout.ckpt("best"), layout.ckpt("epoch_001"))
    from trainer import load_model

    load_model(layout.path)  # best.ckpt exists


def test_a_lora_run_says_which_base_it_uses_and_why(tiny_runs: Path, tmp_path: Path) -> None:
    root = copy_runs(tiny_runs, tmp_path / "checkpoints")
    newest = ok(lora(root, "--epochs", "1"))
    assert "(the best checkpoint of base run 001, the newest completed one)" in newest.stdout
    (root / "base").mkdir()
    shutil.copyfile(root / RUN / "checkpoints" / "best.ckpt", root / "base" / "base_model_last.ckpt")
    handed = ok(lora(root, "--epochs", "1"))
    assert "(the hand-off file base/base_model_last.ckpt, found without --base-checkpoint)" in handed.stdout


# --------------------------------------------------------------------------------------------------
# A stored base never changes under a run
# --------------------------------------------------------------------------------------------------


def test_a_second_hand_off_leaves_the_stored_base_of_earlier_lora_runs_alone(
    tiny_runs: Path, tmp_path: Path
) -> None:
    root = copy_runs(tiny_runs, tmp_path / "checkpoints")
    hand_off = root / "base" / "base_model_last.ckpt"
    hand_off.parent.mkdir()
    shutil.copyfile(root / RUN / "checkpoints" / "best.ckpt", hand_off)  # the specification's `cp`
    ok(lora(root, "--epochs", "1"))
    stored = RunLayout(root / "lora_finetuning" / "run_002", "lora").stored_base
    before = stored.read_bytes()
    from trainer import load_model

    model = load_model(stored.parent.parent)
    newer = torch.load(hand_off, weights_only=True)  # the hand-off done again, with another base
    newer["ema_state_dict"] = {k: v + 1 for k, v in newer["ema_state_dict"].items()}
    with open(hand_off, "r+b") as f:  # `cp` writes into the existing file
        f.truncate(0)
        torch.save(newer, f)
    assert stored.read_bytes() == before and not os.path.samefile(stored, hand_off)
    again = load_model(stored.parent.parent)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # the run's own base run checkpoint is committed, read-only, and linked rather than copied
    first = RunLayout(root / "lora_finetuning" / "run_001", "lora").stored_base
    assert os.path.samefile(first, root / RUN / "checkpoints" / "best.ckpt")
    assert not stat.S_IMODE(first.stat().st_mode) & 0o222


def test_the_hand_off_command_copies_a_checked_base_and_replaces_an_earlier_read_only_one(
    tiny_runs: Path, tmp_path: Path
) -> None:
    """``runs.py hand-off N`` as a user (no permission override, as root in CI): the folder is made, the copy
    is the checkpoint's bytes and writable, and a second hand-off replaces a read-only first one (a plain
    ``cp`` of a committed, read-only checkpoint leaves such a copy); the next LoRA run takes it."""
    import subprocess

    from tests.helpers import REPO, child_env, without_permission_override

    root = copy_runs(tiny_runs, tmp_path / "checkpoints")
    hand_off = root / "base" / "base_model_last.ckpt"
    command = [
        sys.executable,
        str(REPO / "scripts" / "runs.py"),
        "hand-off",
        "1",
        "--checkpoint-root",
        str(root),
    ]
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=120,
                                preexec_fn=without_permission_override)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"Handed off base run 001's best checkpoint: {hand_off}" in result.stdout
        assert hand_off.read_bytes() == (root / RUN / "checkpoints" / "best.ckpt").read_bytes()
        assert stat.S_IMODE(hand_off.stat().st_mode) & 0o200
        hand_off.chmod(0o444)  # as `cp` of a read-only committed checkpoint would have left it
    run = ok(lora(root, "--epochs", "1"))
    assert f"Base model: {hand_off.resolve()} (the hand-off file" in run.stdout


def test_every_reader_of_a_changed_stored_base_refuses_it(tiny_runs: Path, tmp_path: Path) -> None:
    root = copy_runs(tiny_runs, tmp_path / "checkpoints")
    run = root / "lora_finetuning" / "run_001"
    stored = RunLayout(run, "lora").stored_base
    stored.unlink()  # a link to the base run's file: replace it by a changed copy
    original = torch.load(root / RUN / "checkpoints" / "best.ckpt", weights_only=True)
    original["ema_state_dict"] = {k: v * 2 for k, v in original["ema_state_dict"].items()}
    torch.save(original, stored)
    from trainer import load_model

    with pytest.raises(UserError, match="changed since the run started"):
        load_model(run)
    exported = run_in_process("export.py", [str(run), "--out", str(tmp_path / "out.ckpt")])
    sampled = run_in_process(
        "sample.py",
        [str(run), "--classes", "0", "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png")],
    )
    for result in (exported, sampled, lora(root, "--resume", "1")):
        refused(result, "changed since the run started")


# --------------------------------------------------------------------------------------------------
# Damaged metadata.json / config.json
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated metadata", "deleted metadata", "truncated config"])
def test_resume_rebuilds_damaged_metadata_or_config_from_the_checkpoints(tmp_path: Path, damage: str) -> None:
    ok(base(tmp_path, "--epochs", "2"))
    run = tmp_path / RUN
    name = "config.json" if "config" in damage else "metadata.json"
    if "deleted" in damage:
        (run / name).unlink()
    else:
        (run / name).write_text((run / name).read_text()[:40])
    if name == "metadata.json":
        from trainer.api import list_runs

        assert list_runs(tmp_path)[0].status.startswith("broken")
    result = ok(base(tmp_path, "--epochs", "3", "--resume", "1"))
    assert f"{run / name} was" in result.stderr and "rebuilt from checkpoint epoch_002" in result.stderr
    assert "Traceback" not in result.stderr
    if "deleted" not in damage:
        assert (run / "damaged" / name).read_text() == (run / "damaged" / name).read_text()[:40]
    record = meta(run)
    assert record["status"] == "completed" and record["epochs_completed"] == 3
    assert [e["file"] for e in record["events"] if e["kind"] == "repaired"] == [name]
    assert json.loads((run / "config.json").read_text())["epochs"] == 3


# --------------------------------------------------------------------------------------------------
# Changed flags on resume
# --------------------------------------------------------------------------------------------------


def test_a_resume_may_change_epochs_and_learning_rate_and_says_so(tmp_path: Path) -> None:
    ok(base(tmp_path, "--epochs", "2"))
    result = ok(base(tmp_path, "--epochs", "3", "--learning-rate", "0.001", "--resume", "1"))
    assert "Changed on resume: learning_rate 0.002 -> 0.001 (from step 6)" in result.stdout
    assert "Changed on resume: epochs 2 -> 3 (from step 6)" in result.stdout
    record = meta(tmp_path / RUN)
    [event] = [e for e in record["events"] if e["kind"] == "config_changed"]
    assert event["global_step"] == 6 and {c["key"] for c in event["changes"]} == {"epochs", "learning_rate"}
    assert record["config_summary"]["learning_rate"] == 0.001
    assert [h["lr"] for h in record["history"]] == [0.002, 0.002, 0.001]  # history keeps its meaning


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (["--seed", "7"], ["a resume cannot change seed (0 -> 7)"]),
        (["--set", "edm.p_mean=-1.0"], ["a resume cannot change edm.p_mean"]),
        (["--epochs", "1"], ["--epochs 1 is fewer than the 2 epochs this run has already trained"]),
        (["--batch-size", "16"], ["batch_size cannot change from 32 to 16", "1 steps into an epoch"]),
    ],
    ids=["seed", "loss", "fewer-epochs", "batch-inside-an-epoch"],
)
def test_a_resume_refuses_changes_it_cannot_keep_exact_and_touches_nothing(
    tmp_path: Path, args: list[str], phrases: list[str]
) -> None:
    ok(base(tmp_path, "--epochs", "3", env={"DIFFIT_FAULTS": "signal@step:step=7"}))  # epoch 3, 1 step in
    if "--epochs" in args:  # a completed 2-epoch run
        shutil.rmtree(tmp_path / RUN)
        ok(base(tmp_path, "--epochs", "2"))
    before = tree(tmp_path)
    refused(base(tmp_path, *args, "--resume", "1"), *phrases)
    assert tree(tmp_path) == before


def test_a_batch_size_may_change_at_an_epoch_start(tmp_path: Path) -> None:
    ok(base(tmp_path, "--epochs", "1"))
    result = ok(base(tmp_path, "--epochs", "2", "--batch-size", "16", "--resume", "1"))
    assert "Changed on resume: batch_size 32 -> 16 (from step 3)" in result.stdout
    assert meta(tmp_path / RUN)["config_summary"]["batch_size"] == 16


def test_a_resumed_epoch_counts_only_the_images_it_trained(tmp_path: Path) -> None:
    ok(base(tmp_path, "--epochs", "2", env={"DIFFIT_FAULTS": "signal@step:step=4"}))  # 1 of epoch 2's 3 steps
    ok(base(tmp_path, "--epochs", "2", "--resume", "1"))
    entry = meta(tmp_path / RUN)["history"][1]
    assert entry["images_per_sec"] * entry["seconds"] == pytest.approx(2 * 32, rel=0.02)  # 2 steps of 32


# --------------------------------------------------------------------------------------------------
# Smaller things
# --------------------------------------------------------------------------------------------------


def test_the_adapter_export_follows_the_umask_like_every_other_file(tiny_runs: Path) -> None:
    adapter = RunLayout(tiny_runs / "lora_finetuning" / "run_001", "lora").adapter
    from trainer.storage.atomic import umask

    for path in adapter.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask(), path


def test_a_sample_grid_of_many_classes_draws_a_bounded_number_of_rows(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    from trainer.config.schema import TrainConfig
    from trainer.training import samples

    drawn: dict[str, Any] = {}

    def fake_grid(model: Any, *, classes: list[int], per_class: int, **kwargs: Any) -> torch.Tensor:
        drawn["classes"] = classes
        return torch.zeros(len(classes) * per_class, 3, 8, 8)

    monkeypatch.setattr(samples, "sample_grid", fake_grid)
    samples.draw_grid(
        torch.nn.Linear(1, 1), TrainConfig(), [f"class {i}" for i in range(40)], tmp_path / "g.png"
    )
    assert drawn["classes"] == [0, 4, 9, 13, 17, 22, 26, 30, 35, 39]
    assert samples.spread(5, 10) == [0, 1, 2, 3, 4]


def test_advice_names_what_the_run_has(tiny_runs: Path, tmp_path: Path) -> None:
    """A checkpoint the run does not have is named with those it has (by load_model, sample.py and export.py
    alike); a LoRA run given as the base is said to be one."""
    from trainer import load_model

    run = tiny_runs / RUN  # one epoch: best, epoch_001, last
    with pytest.raises(
        UserError, match=r"run_001 has no checkpoint epoch_005 .*; it has best, epoch_001, last$"
    ):
        load_model(run, which=5)
    sampled = run_in_process("sample.py", [str(run), "--which", "5", "--out", str(tmp_path / "g.png")])
    refused(sampled, "has no checkpoint epoch_005", "it has best, epoch_001, last")
    exported = run_in_process("export.py", [str(run), "--which", "5", "--out", str(tmp_path / "m.ckpt")])
    refused(
        exported,
        "has no checkpoint epoch_005 (never saved, or removed by retention)",
        "it has best, epoch_001, last",
    )
    root = copy_runs(tiny_runs, tmp_path / "checkpoints")
    given = root / "lora_finetuning" / "run_001"
    refused(
        lora(root, "--base-checkpoint", str(given), "--epochs", "1"),
        f"--base-checkpoint {given} is a LoRA run",
    )
