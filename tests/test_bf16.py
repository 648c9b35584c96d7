"""bf16, the precision of every GPU config, on real 2-process launches on the CPU (DeepSpeed's CPU accelerator
runs it): the module computes in bf16 while DeepSpeed keeps fp32 master weights, and a checkpoint holds the
masters. A bf16 run resumes on another number of processes and another ZeRO stage, and switches to fp32 and
back, saying so; LoRA trains on a bf16 base under bf16 ZeRO-3; the listing shows each run's precision; export
writes every dtype. fp16, which needs a GPU, is refused with one line.

Power cuts at every stage under bf16 are in test_power_cuts.py, DeepSpeed's own checkpoint of a bf16 engine
against the trainer's in test_deepspeed_equivalence.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    EPOCHS,
    copy_runs,
    events,
    load_ckpt,
    metadata,
    run_cli,
    run_script,
    train_base,
    train_lora,
)
from trainer.checkpoint.manifest import read_manifests

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def relaunched(bf16_reference: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run 002: a fork of the bf16 reference at epoch 1, trained on 1 process in bf16 (epoch 2), on 2 under
    ZeRO-3 in bf16 (epoch 3), on 2 under ZeRO-2 in fp32 (epoch 4) and in bf16 again (epoch 5). And a LoRA run
    on the bf16 base under bf16 ZeRO-3."""
    root = copy_runs(bf16_reference["root"], tmp_path_factory.mktemp("bf16") / "checkpoints")
    launches = [
        ("single_process", ["--fork", "1", "--from", "1", "--epochs", "2"], ["--mixed_precision", "bf16"]),
        ("cpu_zero3_bf16", ["--resume", "2", "--epochs", "3"], []),
        ("cpu_zero2", ["--resume", "2", "--epochs", "4"], []),
        ("cpu_zero2_bf16", ["--resume", "2", "--epochs", "5"], []),
    ]
    logs = [
        train_base(root, *args, *EPOCHS[2:], accelerate_config=config, launch_args=launch_args).stdout
        for config, args, launch_args in launches
    ]
    lora = train_lora(root, "--epochs", "1", "--base-checkpoint", str(bf16_reference["run"]),
                      accelerate_config="cpu_zero3_bf16")  # fmt: skip
    return {"root": root, "run": root / "base_training" / "run_002", "logs": logs, "lora": lora}


def test_a_bf16_run_continues_on_other_processes_and_zero_stages(relaunched: dict) -> None:
    """What each relaunch says; that every tensor arrives on the other layout, bit for bit, is
    test_deepspeed_equivalence.py's (bf16 sums in another order round differently, so the runs' weights
    cannot tell a lost state from rounding)."""
    logs = relaunched["logs"]
    assert "forked from run 001 at checkpoint epoch_001" in logs[0]
    assert "saved by 2 process(es) (deepspeed-zero2); continuing on 1 (single)" in logs[0]
    assert "saved by 1 process(es) (single); continuing on 2 (deepspeed-zero3)" in logs[1]
    assert "saved by 2 process(es) (deepspeed-zero3); continuing on 2 (deepspeed-zero2)" in logs[2]
    assert not any("continuing in" in log for log in logs[:2])  # bf16 throughout: no change of precision
    assert "Launch: 1 process on 1 machine, cpu, no DeepSpeed, bf16; batch 32 per process" in logs[0]
    assert (
        "Launch: 2 processes on 1 machine, cpu (gloo), DeepSpeed ZeRO-3, bf16; "
        "batch 16 per process x 1 micro-batch per step x 2 processes = 32" in logs[1]
    )
    meta = metadata(relaunched["run"])
    assert meta["status"] == "completed" and meta["epochs_completed"] == 5


def test_a_change_of_precision_on_resume_is_said_and_recorded(relaunched: dict) -> None:
    run, logs = relaunched["run"], relaunched["logs"]
    assert "The checkpoint was trained in bf16; continuing in fp32" in logs[2]
    assert "The checkpoint was trained in fp32; continuing in bf16" in logs[3]
    changes = [(e["tag"], e["from_precision"], e["to_precision"]) for e in events(run, "precision_change")]
    assert changes == [("epoch_003", "bf16", "fp32"), ("epoch_004", "fp32", "bf16")]
    meta = metadata(run)
    assert meta["precision"] == "bf16"
    assert meta["launch"] == {"processes": 2, "machines": 1, "device": "cpu", "backend": "gloo",
                              "distributed": "deepspeed-zero2", "precision": "bf16", "offload": "none",
                              "micro_batch": 16, "accumulation": 1, "global_batch": 32}  # fmt: skip
    assert [r["precision"] for r in meta["resumes"]] == ["bf16", "bf16", "fp32", "bf16"]
    precisions = {m.tag: m.precision for m in read_manifests(run / "checkpoints")}
    assert (
        precisions["epoch_003"] == "bf16"
        and precisions["epoch_004"] == "fp32"
        and precisions["epoch_005"] == "bf16"
    )
    ckpt = load_ckpt(
        run / "checkpoints" / "epoch_005.ckpt"
    )  # the fp32 masters, whatever the model computed in
    assert {t.dtype for t in ckpt["state_dict"].values()} == {torch.float32}


def test_lora_trains_on_a_bf16_base_under_bf16_zero3(relaunched: dict) -> None:
    from trainer import load_model

    run = relaunched["root"] / "lora_finetuning" / "run_001"
    meta = metadata(run)
    assert (meta["status"], meta["precision"], meta["distributed"]) == (
        "completed",
        "bf16",
        "deepspeed-zero3",
    )
    ckpt = load_ckpt(run / "lora_weights" / "epoch_001.ckpt")
    adapters = ckpt["lora_state_dict"]
    assert adapters and all(t.dtype == torch.float32 and t.numel() > 0 for t in adapters.values())
    assert any(t.abs().sum() > 0 for n, t in adapters.items() if ".lora_B." in n)  # trained away from zero
    model = load_model(run)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 16, 16), torch.ones(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


def test_the_listing_shows_precision_and_export_writes_every_dtype(relaunched: dict, tmp_path: Path) -> None:
    root = relaunched["root"]
    listing = run_cli("base", ["--list-runs", "--checkpoint-root", str(root)]).stdout
    header, _, *rows = listing.splitlines()[1:]
    assert "Precision" in header and all(" bf16 " in row for row in rows)
    listed = json.loads(run_cli("base", ["--list-runs", "--json", "--checkpoint-root", str(root)]).stdout)
    assert [r["precision"] for r in listed] == ["bf16", "bf16"]
    for dtype, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = tmp_path / f"{dtype}.ckpt"
        run_script("export.py", [str(relaunched["run"]), "--dtype", dtype, "--out", str(out)])
        assert {t.dtype for t in load_ckpt(out)["state_dict"].values() if t.is_floating_point()} == {expected}


def test_fp16_without_a_gpu_is_refused_with_one_line(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    result = train_base(root, "--epochs", "1", launch_args=["--mixed_precision", "fp16"], check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "ValueError" not in output
    assert not any(
        line.startswith(("[rank0]: Traceback", "[rank1]: Traceback")) for line in output.splitlines()
    )
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fp16 mixed precision, which needs a GPU" in errors[0], output[-3000:]
    assert "cpu_zero2_bf16.yaml" in errors[0] and not root.exists()
    assert "terminate called" not in output and "SIGABRT" not in output  # no worker aborts on its way out
    # the launcher's failure summary, the last thing it prints, carries the line (not "error_file: <N/A>")
    summary = output[output.rindex("Root Cause") :]
    assert f"traceback : {errors[0]}" in summary and "<N/A>" not in summary, summary
