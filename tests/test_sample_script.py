"""``scripts/sample.py`` draws a grid from any run: one row per requested class, base and LoRA alike.

Two launches (one sample grid from each of the session's tiny base and LoRA runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import run_in_process, run_script

pytestmark = pytest.mark.distributed

SCALE, PAD = 2, 2  # trainer.training.samples.save_grid: cells are image·scale + pad, plus one pad at the edge
IMAGE_SIZE = 16  # diffit_tiny on digits


def grid_height(rows: int) -> int:
    return rows * (IMAGE_SIZE * SCALE + PAD) + PAD


def test_sample_script_draws_one_row_per_class_for_base_and_lora_runs(
    tiny_runs: Path, tmp_path: Path
) -> None:
    root = tiny_runs
    base_run, lora_run = root / "base_training" / "run_001", root / "lora_finetuning" / "run_001"
    fast = ["--steps", "4", "--seed", "1"]

    base_png = tmp_path / "base.png"
    # the script as users run it; the LoRA case below in this process
    result = run_script(
        "sample.py", [str(base_run), "--classes", "0,3,7", "--n", "6", *fast, "--out", str(base_png)]
    )
    assert "3 row(s) x 2 images" in result.stdout
    width, height = Image.open(base_png).size
    assert height == grid_height(3)
    assert width > 2 * IMAGE_SIZE * SCALE

    # The LoRA run fine-tunes on digits 0-4: classes by name, and by default every one of its 5 classes.
    lora_png = tmp_path / "lora.png"
    result = run_in_process(
        "sample.py", [str(lora_run), "--which", "last", "--n", "5", *fast, "--out", str(lora_png)], check=True
    )
    assert "5 row(s) x 1 images" in result.stdout
    assert Image.open(lora_png).size[1] == grid_height(5)
    assert Image.open(lora_png).format == "PNG"


def test_sample_script_refuses_too_few_images_and_an_existing_out_and_takes_tags(
    tiny_runs: Path, tmp_path: Path
) -> None:
    base_run = tiny_runs / "base_training" / "run_001"
    out = tmp_path / "grid.png"
    few = run_in_process("sample.py", [str(base_run), "--n", "4", "--steps", "2", "--out", str(out)])
    assert few.returncode == 2 and "--n 4 is fewer than the 10 classes drawn" in few.stderr
    assert not out.exists()
    out.write_bytes(b"someone's picture")
    kept = run_in_process("sample.py", [str(base_run), "--n", "10", "--steps", "2", "--out", str(out)])
    assert kept.returncode == 2 and "pass --force" in kept.stderr and out.read_bytes() == b"someone's picture"
    args = [str(base_run), "--which", "epoch_001", "--n", "10", "--steps", "2", "--out", str(out), "--force"]
    run_in_process("sample.py", args, check=True)
    assert Image.open(out).format == "PNG"


def test_export_refuses_an_out_it_cannot_tell_the_format_of(tiny_runs: Path, tmp_path: Path) -> None:
    base_run = tiny_runs / "base_training" / "run_001"
    result = run_in_process("export.py", [str(base_run), "--out", str(tmp_path / "z.txt")])
    assert result.returncode == 2 and "name a .ckpt or .safetensors file, or pass --format" in result.stderr
    assert not (tmp_path / "z.txt").exists()
