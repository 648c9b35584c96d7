"""Going back to any checkpoint: rewind a run (``--resume N --from TAG``), fork it (``--fork N``), start a run
from another's weights (``--init-from``), and export any checkpoint for other tools.

Base runs under real 2-process ZeRO-2 launches against the shared ``reference`` run; LoRA runs and the
single-process cases in this process (``tests.helpers.run_cli``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    EPOCHS,
    assert_bit_identical,
    assert_same_tensors,
    base_argv,
    copy_runs,
    load_ckpt,
    lora_argv,
    run_cli,
    run_in_process,
    train_base,
)
from tests.helpers import (
    metadata as meta,
)
from trainer.config.schema import TrainConfig, from_dict
from trainer.training.factory import build_model

pytestmark = pytest.mark.distributed
RUN = Path("base_training") / "run_001"


def folder_hash(folder: Path) -> str:
    """Every file's path and bytes: equal hashes mean the folder is byte-for-byte unchanged."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_going_back_to_an_epoch_continues_bit_identically_and_keeps_what_came_after(
    reference: dict, tmp_path: Path
) -> None:
    root = copy_runs(reference["root"], tmp_path / "checkpoints")  # every epoch kept
    run = root / RUN
    result = train_base(root, *EPOCHS, "--set", "checkpoint.keep_last_n=1", "--resume", "1", "--from", "2")
    assert (
        "going back to checkpoint epoch_002 of run 001: 2 newer checkpoint(s) moved to superseded/"
        in result.stderr
    )
    assert "Resuming run 001 from epoch 2" in result.stdout
    assert_bit_identical(run, reference["weights"])
    assert sorted(p.name for p in (run / "superseded").iterdir()) == [
        "epoch_003",
        "epoch_004",
    ]  # kept by retention
    [event] = [e for e in meta(run)["events"] if e["kind"] == "rewound"]
    assert event["to"] == "epoch_002" and [m["tag"] for m in event["superseded"]] == [
        "epoch_003",
        "epoch_004",
    ]
    assert [h["epoch"] for h in meta(run)["history"]] == [1, 2, 3, 4]  # cut back to 2, then trained on
    assert meta(run)["trackers"]["branch"] == 1  # the trackers' curves of the abandoned branch stay apart


def test_a_fork_continues_like_its_source_and_never_touches_it(reference: dict, tmp_path: Path) -> None:
    root = copy_runs(reference["root"], tmp_path / "checkpoints")
    before = folder_hash(root / RUN)
    same = train_base(root, *EPOCHS, "--fork", "1", "--from", "epoch_002")
    # a second fork with a changed flag, on one process (this one): a fork may change the process count too
    other = run_cli(
        "base", base_argv(root, *EPOCHS, "--fork", "1", "--from", "2", "--learning-rate", "0.001")
    )
    assert other.returncode == 0, other.stderr[-3000:]
    assert folder_hash(root / RUN) == before  # not a byte of run 001 changed, metadata included
    assert "Resuming run 002 from epoch 2" in same.stdout
    new_folder = root / "base_training" / "run_002"
    assert (
        f"run 002 ({new_folder}), forked from run 001 at checkpoint epoch_002 ({root / RUN})" in same.stdout
    )
    assert_bit_identical(root / "base_training" / "run_002", reference["weights"])
    forked = meta(root / "base_training" / "run_003")["forked_from"]
    assert (forked["run"], forked["tag"], len(forked["manifest_sha256"])) == (1, "epoch_002", 64)
    assert forked["changes"] == [{"key": "learning_rate", "old": 0.002, "new": 0.001}]
    assert "Changed in this fork: learning_rate 0.002 -> 0.001 (from step 6)" in other.stdout
    listing = run_cli("base", ["--list-runs", "--checkpoint-root", str(root)]).stdout
    assert "From" in listing and "001@epoch_002" in listing


def test_from_a_tag_that_does_not_exist_is_refused_and_moves_nothing(reference: dict, tmp_path: Path) -> None:
    root = copy_runs(reference["root"], tmp_path / "checkpoints")
    before = folder_hash(root / RUN)
    for args in (["--resume", "1", "--from", "9"], ["--fork", "1", "--from", "step_0000002"]):
        result = run_cli("base", base_argv(root, *EPOCHS, *args))
        assert result.returncode == 2 and "epoch_001, epoch_002, epoch_003, epoch_004" in result.stderr
    assert folder_hash(root / RUN) == before


# --------------------------------------------------------------------------------------------------
# LoRA runs, one process
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_runs(tiny_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_runs plus LoRA run 002: 3 epochs straight, every epoch kept."""
    root = copy_runs(tiny_runs, tmp_path_factory.mktemp("going_back") / "checkpoints")
    lora(root, "--epochs", "3", "--set", "checkpoint.keep_last_n=0")
    return root


def lora(root: Path, *args: str) -> Any:
    result = run_cli("lora", lora_argv(root, "--set", "logging.sample_every_n_epochs=0", *args))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def lora_final(run: Path) -> dict[str, torch.Tensor]:
    return load_ckpt(run / "lora_weights" / "epoch_003.ckpt")["lora_state_dict"]


def test_a_lora_run_goes_back_and_forks_bit_identically(lora_runs: Path, tmp_path: Path) -> None:
    root = copy_runs(lora_runs, tmp_path / "checkpoints")
    runs = root / "lora_finetuning"
    straight = lora_final(runs / "run_002")
    lora(root, "--epochs", "3", "--fork", "2", "--from", "1")
    assert_same_tensors(straight, lora_final(runs / "run_003"))
    assert meta(runs / "run_003")["forked_from"]["kind"] == "lora"
    lora(root, "--epochs", "3", "--resume", "2", "--from", "best")  # best: the newest epoch here
    lora(root, "--epochs", "3", "--resume", "2", "--from", "epoch_001")
    assert_same_tensors(straight, lora_final(runs / "run_002"))
    assert (runs / "run_002" / "superseded" / "epoch_002" / "epoch_002.ckpt").is_file()


# --------------------------------------------------------------------------------------------------
# Weights only, and export
# --------------------------------------------------------------------------------------------------


def test_init_from_takes_weights_and_ema_with_a_fresh_optimizer_and_refuses_another_architecture(
    tiny_runs: Path, tmp_path: Path
) -> None:
    root = copy_runs(tiny_runs, tmp_path / "checkpoints")
    source = load_ckpt(root / RUN / "checkpoints" / "best.ckpt")
    refused = run_cli("base", base_argv(root, "--epochs", "1", "--init-from", str(root / RUN), "--set",
                                        "model.channels=[8,16]"))  # fmt: skip
    assert (
        refused.returncode == 2
        and "another architecture: channels ([16, 32] there, [8, 16] here)" in refused.stderr
    )
    result = run_cli("base", base_argv(root, "--epochs", "1", "--max-steps-per-epoch", "1", "--set",
                                       "learning_rate=1e-12", "--init-from", str(root / RUN)))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    best = (root / RUN / "checkpoints" / "best.ckpt").resolve()
    assert (
        f"Starting from the weights and EMA of {best} (a fresh optimizer, counters and schedule)"
        in result.stdout
    )
    run = root / "base_training" / "run_002"
    warm = load_ckpt(run / "checkpoints" / "epoch_001.ckpt")
    assert warm["global_step"] == 1  # counters start over
    for name, tensor in source["state_dict"].items():  # one step at lr 1e-12: the weights it started from
        torch.testing.assert_close(warm["state_dict"][name], tensor, rtol=0, atol=1e-6)
    assert meta(run)["init_from"]["tag"] == "best" and meta(run)["init_from"]["run"] == 1


def test_export_round_trips_any_checkpoint_for_other_tools(tiny_runs: Path, tmp_path: Path) -> None:
    from trainer import load_model

    run = tiny_runs / RUN
    out = tmp_path / "model.safetensors"
    run_in_process("export.py", [str(run), "--out", str(out)], check=True)
    config = from_dict(TrainConfig, json.loads(out.with_suffix(".json").read_text())["config"])
    model = build_model(config)
    model.load_state_dict(load_file(str(out)), strict=True)
    for name, tensor in load_model(run).state_dict().items():  # EMA weights, as load_model gives them
        assert torch.equal(model.state_dict()[name], tensor), name
    refused = run_in_process("export.py", [str(run), "--out", str(out)])
    assert refused.returncode == 2 and "pass --force" in refused.stderr
    half = tmp_path / "half.safetensors"
    run_in_process("export.py", [str(run), "--out", str(half), "--dtype", "bf16", "--raw"], check=True)
    raw = load_ckpt(run / "checkpoints" / "best.ckpt")["state_dict"]
    for name, tensor in load_file(str(half)).items():
        expected = raw[name].to(torch.bfloat16) if raw[name].is_floating_point() else raw[name]
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    merged = tmp_path / "lora.ckpt"
    run_in_process(
        "export.py", [str(tiny_runs / "lora_finetuning" / "run_001"), "--out", str(merged)], check=True
    )
    ckpt = load_ckpt(merged)
    build_model(from_dict(TrainConfig, ckpt["config"])).load_state_dict(ckpt["state_dict"], strict=True)
