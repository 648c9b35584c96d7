"""Bad input to LoRA fine-tuning ends in one clear message and exit code 2, with nothing on disk changed.

Each test gives `scripts/train_lora.py` (one process) one mistake and checks the contract of
`tests/test_bad_input.py`: `error: <what is wrong, how to fix it>` on stderr, exit code 2, no `Traceback`, and
the checkpoint root exactly as it was (no run folder created, no run touched or deleted). One tiny base run
and one tiny LoRA run on it (started from the base RUN FOLDER, both real launches: the session's `tiny_runs`)
are shared by the module; every test that could write works on a private copy of that checkpoint root.

`test_no_base_model_anywhere_...` is a real launch (`launch_lora`: `python scripts/train_lora.py` in a fresh
interpreter), which proves the exit code and the absence of a `Traceback` end to end for this script. The
other cases call the same `trainer.cli.main` in this process (`lora_tiny`, through `tests.helpers.run_cli`),
saving the 10-20 s torch import and start-up of a launch each; why that checks the same things is said in
`tests/test_bad_input.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import lora_argv, run_cli, train_lora
from tests.test_bad_input import assert_refused, assert_unchanged, snapshot

pytestmark = pytest.mark.slow

BASE_RUN = Path("base_training") / "run_001"
LORA_RUN = Path("lora_finetuning") / "run_001"


def launch_lora(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python scripts/train_lora.py` with the tiny-run flags on digits 0-4, never raising on a non-zero exit."""
    return train_lora(root, *args, accelerate_config=None, check=False)


def lora_tiny(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """What `launch_lora` would return, from `trainer.cli.main` called in this process."""
    return run_cli("lora", lora_argv(root, *args))


# --------------------------------------------------------------------------------------------------
# The one base run and the one LoRA run the tests start from
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tiny_runs: Path) -> Path:
    """Checkpoint root holding completed base run 001 and LoRA run 001 (its base given as the run folder)."""
    return tiny_runs


@pytest.fixture
def root_copy(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the checkpoint root (hard links become separate files, mtimes are kept)."""
    root = tmp_path / "ckpt"
    shutil.copytree(finished, root)
    return root


# --------------------------------------------------------------------------------------------------
# Which base model: none, a bad file, a run folder
# --------------------------------------------------------------------------------------------------


@pytest.mark.distributed  # launches the script
def test_no_base_model_anywhere_says_how_to_make_one_and_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    before = snapshot(tmp_path)
    result = launch_lora(root, "--epochs", "1")
    assert_refused(result, "no base model to fine-tune", "train_base.py", "--base-checkpoint")
    assert not (root / "lora_finetuning").exists()
    assert_unchanged(tmp_path, before)


@pytest.mark.parametrize("which", ["missing", "corrupt", "lora-checkpoint"])
def test_bad_base_checkpoint_file_is_refused_naming_it(root_copy: Path, tmp_path: Path, which: str) -> None:
    if which == "missing":
        path = tmp_path / "no_such_base.ckpt"
        phrases = ["base checkpoint not found", str(path)]
    elif which == "corrupt":
        path = tmp_path / "corrupt.ckpt"
        path.write_bytes(os.urandom(8192))
        phrases = ["cannot load checkpoint", str(path)]
    else:
        path = root_copy / LORA_RUN / "lora_weights" / "last.ckpt"
        phrases = [str(path), "is a lora checkpoint", "--base-checkpoint takes a base model"]
    before = snapshot(tmp_path)
    result = lora_tiny(root_copy, "--epochs", "1", "--base-checkpoint", str(path))
    assert_refused(result, *phrases)
    assert not (root_copy / "lora_finetuning" / "run_002").exists()
    assert_unchanged(tmp_path, before)


def test_base_run_folder_as_base_checkpoint_uses_its_best_checkpoint(finished: Path) -> None:
    meta = json.loads((finished / LORA_RUN / "metadata.json").read_text())
    source = meta["base_checkpoint"]["source"]
    assert source.endswith("checkpoints/best.ckpt"), source
    assert Path(source) == (finished / BASE_RUN / "checkpoints" / "best.ckpt").resolve()
    assert meta["status"] == "completed"


# --------------------------------------------------------------------------------------------------
# LoRA configs that select nothing that exists
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        (
            "stages: {encoder.7: null}\n",
            ["encoder.7", "match no stage", "available:", "encoder.0", "bottleneck"],
        ),
        (
            "target_layers: [conv]\n",
            ["conv", "match no layer", "available:", "qkv", "qkv_temb", "proj", "mlp.fc1", "mlp.fc2"],
        ),
    ],
    ids=["unknown-stage", "unknown-layer"],
)
def test_lora_config_matching_nothing_lists_what_exists_and_creates_nothing(
    root_copy: Path, tmp_path: Path, text: str, phrases: list[str]
) -> None:
    config = tmp_path / "bad_lora.yaml"
    config.write_text(text)
    before = snapshot(tmp_path)
    result = lora_tiny(root_copy, "--epochs", "1", "--lora-config", str(config))
    assert_refused(result, *phrases)
    assert_unchanged(tmp_path, before)


# --------------------------------------------------------------------------------------------------
# Resuming a LoRA run whose stored base is gone or changed
# --------------------------------------------------------------------------------------------------


def test_resume_with_the_stored_base_gone_is_refused_and_touches_nothing(root_copy: Path) -> None:
    stored = root_copy / LORA_RUN / "base_model" / "base_model.ckpt"
    stored.unlink()
    before = snapshot(root_copy)
    result = lora_tiny(root_copy, "--resume", "1", "--epochs", "2")
    source = json.loads((root_copy / LORA_RUN / "metadata.json").read_text())["base_checkpoint"]
    assert_refused(result, "stored base model", "run_001", "gone", f"it was a copy of {source['source']}",
                   source["sha256"], f"put that file back at {stored}")  # fmt: skip
    assert_unchanged(root_copy, before)


def test_resume_with_the_stored_base_changed_is_refused_naming_the_record_it_fails(root_copy: Path) -> None:
    stored = root_copy / LORA_RUN / "base_model" / "base_model.ckpt"
    other = torch.load(
        root_copy / BASE_RUN / "checkpoints" / "epoch_001.ckpt", map_location="cpu", weights_only=True
    )
    name = next(k for k, v in other["state_dict"].items() if v.is_floating_point())
    other["state_dict"][name] = other["state_dict"][name] + 1.0
    torch.save(other, stored)  # a valid base checkpoint, but not the one the run was started from
    before = snapshot(root_copy)
    result = lora_tiny(root_copy, "--resume", "1", "--epochs", "2")
    assert_refused(result, "stored base model", "changed", "against its checkpoints' manifests")
    assert_unchanged(root_copy, before)


# --------------------------------------------------------------------------------------------------
# Flags a new LoRA run does not take
# --------------------------------------------------------------------------------------------------


def test_model_flag_on_a_new_lora_run_is_refused_and_creates_nothing(root_copy: Path) -> None:
    before = snapshot(root_copy)
    result = lora_tiny(root_copy, "--epochs", "1", "--model", "diffit_cifar")
    assert_refused(result, "base checkpoint's model", "drop --model")
    assert_unchanged(root_copy, before)
