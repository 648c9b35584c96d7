"""The trainer's checkpoints against DeepSpeed's own, on real 2-process launches under ZeRO-2 and ZeRO-3, in
fp32 and in bf16 (the precision of every GPU config: the module computes in bf16, DeepSpeed keeps fp32
masters).

A checkpoint stores every tensor once and by name, written by each rank in pieces (no DeepSpeed shard files),
so these promises are checked against DeepSpeed itself, on the same engine in the same launch
(``tests/scripts/deepspeed_equivalence.py``): the model file users load equals DeepSpeed's ``zero_to_fp32``
of its own checkpoint of that state, Adam's moments equal those in DeepSpeed's shards, and loading the
checkpoint back into a disturbed engine restores the master weights, moments, step and EMA bit for bit, with
the module's weights the cast of the masters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.fake_data import write_fake_cifar
from tests.helpers import REPO, run_script

pytestmark = pytest.mark.distributed
SCRIPT = REPO / "tests" / "scripts" / "deepspeed_equivalence.py"


def equivalence(tmp_path: Path, config: str) -> dict:
    data, work = write_fake_cifar(tmp_path / "data", train_images=8), tmp_path / "work"
    work.mkdir()
    run_script(str(SCRIPT), [str(data), str(work)], accelerate_config=config)
    return json.loads((work / "equivalence.json").read_text())


def restored(tmp_path: Path, config: str, launch_args: list[str]) -> dict:
    """The checkpoint of ``equivalence``'s launch loaded by another (``config``, ``launch_args``)."""
    run_script(str(SCRIPT), [str(tmp_path / "data"), str(tmp_path / "work"), "--restore"],
               accelerate_config=config, launch_args=launch_args)  # fmt: skip
    return json.loads((tmp_path / "work" / "restored.json").read_text())


@pytest.mark.parametrize("config", ["cpu_zero2", "cpu_zero3", "cpu_zero2_bf16", "cpu_zero3_bf16"])
def test_checkpoint_equals_deepspeeds_own_and_restores_every_tensor(tmp_path: Path, config: str) -> None:
    result = equivalence(tmp_path, config)
    assert result["distributed"] == f"deepspeed-zero{config[8]}"
    assert result["dtypes"] == (["torch.bfloat16"] if config.endswith("bf16") else ["torch.float32"])
    assert result["model_file_dtypes"] == ["torch.float32"]  # the masters, whatever the module computes in
    assert result["model_file_vs_zero_to_fp32"] == []  # zero_to_fp32 of DeepSpeed's shards, bit for bit
    assert result["model_file_vs_gathered"] == [] and result["ema_vs_gathered"] == []
    assert result["moments_vs_deepspeed"] == [] and len(result["steps"]) == 1
    assert result["grad_tensors"] == []  # plain data, not graph leaves
    assert (
        result["restored_params"] == [] and result["restored_moments"] == [] and result["restored_ema"] == []
    )
    assert result["restored_steps"] and result["module_vs_masters"] == []
    if config.startswith("cpu_zero3"):  # really sharded: every parameter is split between the two ranks
        assert result["sharded_parameters"] == result["parameters"] > 0


@pytest.mark.parametrize(
    ("saved_by", "loaded_by", "launch_args", "module_dtype"),
    [
        ("cpu_zero2_bf16", "cpu_zero3_bf16", [], "torch.bfloat16"),
        ("cpu_zero3_bf16", "single_process", ["--mixed_precision", "bf16"], "torch.float32"),
    ],
    ids=["bf16-zero2-to-zero3", "bf16-zero3-to-one-process"],
)
def test_a_bf16_checkpoint_restores_every_tensor_on_other_processes_and_stages(
    tmp_path: Path, saved_by: str, loaded_by: str, launch_args: list[str], module_dtype: str
) -> None:
    """One process in bf16 is Accelerate's autocast: fp32 weights, bf16 computation."""
    equivalence(tmp_path, saved_by)
    result = restored(tmp_path, loaded_by, launch_args)
    assert result["distributed"] == ("single" if loaded_by == "single_process" else "deepspeed-zero3")
    assert result["dtypes"] == [module_dtype]
    assert (
        result["restored_params"] == [] and result["restored_moments"] == [] and result["restored_ema"] == []
    )
    assert result["restored_steps"] and result["module_vs_masters"] == []
