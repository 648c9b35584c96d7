"""LoRA fine-tuning under real `accelerate launch` (2 processes, DeepSpeed ZeRO-2 and ZeRO-3 on the CPU).

One tiny base run (one process) is fine-tuned on digits 0-4 (5 classes, so the label embedding is resized):
  run 001: 4 epochs straight (ZeRO-2, keep_last_n=2);
  run 002: 4 epochs, stopped by SIGTERM on rank 1 inside epoch 2, then `--resume 2` (ZeRO-2, every epoch
  kept); a copy of the stopped run resumes on one process without DeepSpeed instead;
  run 003: 2 epochs under ZeRO-3.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_same_tensors, load_ckpt, run_script, train_base, train_lora
from trainer import load_model
from trainer.checkpoint.formats.base import load_checkpoint_file
from trainer.config import TrainConfig, build_config, from_dict
from trainer.factory import base_weights, build_lora_model, build_model, load_weights

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    train_base(root, "--epochs", "1", accelerate_config=None)
    straight = train_lora(root, "--epochs", "4", "--set", "checkpoint.keep_last_n=2")
    # run 002: every epoch kept; rank 1 gets SIGTERM after step 5 (inside epoch 2); a copy is kept
    interrupted = train_lora(root, "--epochs", "4", "--set", "checkpoint.keep_last_n=0",
                             env={"DIFFIT_FAULTS": "signal@step:step=5:rank=1"})  # fmt: skip
    copy = root.parent / f"{root.name}-copy"
    shutil.copytree(root, copy, symlinks=True)
    resumed = train_lora(root, "--resume", "2", "--epochs", "4")
    train_lora(root, "--epochs", "2", accelerate_config="cpu_zero3")
    # the copy of run 002 resumes on one process without DeepSpeed
    single = train_lora(copy, "--resume", "2", "--epochs", "4", accelerate_config=None)
    runs = root / "lora_finetuning"
    return {"root": root, "straight": runs / "run_001", "resumed": runs / "run_002", "zero3": runs / "run_003",
            "base": root / "base_training" / "run_001", "log": straight.stdout, "resume_log": resumed.stdout,
            "interrupted": interrupted, "single": copy / "lora_finetuning" / "run_002",
            "single_log": single.stdout}  # fmt: skip


def test_lora_run_has_the_documented_layout(lora: dict) -> None:
    run = lora["straight"]
    for path in ("config.json", "metadata.json", "base_model/base_model.ckpt", "lora_weights/best.ckpt",
                 "lora_weights/last.ckpt", "lora_weights/epoch_004.ckpt", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "logs/samples/epoch_004.png"):  # fmt: skip
        assert (run / path).is_file(), path
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["kind"] == "lora" and meta["status"] == "completed" and meta["epochs_completed"] == 4
    assert meta["dataset"] == {"name": "Digits 0-4", "num_classes": 5}
    assert meta["base_checkpoint"]["source"].endswith("base_training/run_001/checkpoints/best.ckpt")
    assert len(meta["base_checkpoint"]["sha256"]) == 64
    # the base is stored once, as a hard link to the source where the filesystem allows it
    assert os.path.samefile(run / "base_model" / "base_model.ckpt", meta["base_checkpoint"]["source"])
    assert sorted(int(p.stem[-3:]) for p in (run / "lora_weights").glob("epoch_*.ckpt")) == sorted(
        {3, 4, meta["best"]["epoch"]}
    )


def test_adapter_checkpoint_holds_only_trainable_tensors_and_resume_state(lora: dict) -> None:
    ckpt = load_ckpt(lora["straight"] / "lora_weights" / "last.ckpt")
    for key in ("lora_state_dict", "ema_state_dict", "optimizer", "rng", "epoch", "global_step", "metrics"):
        assert key in ckpt, key
    assert "state_dict" not in ckpt
    names = list(ckpt["lora_state_dict"])
    assert names and all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in names)
    assert any("label_embed.modules_to_save" in n for n in names)  # resized to 5 classes, trained in full
    assert len(ckpt["rng"]) == 2  # every rank's RNG state
    assert set(ckpt["optimizer"]["moments"]["exp_avg"]) == set(names)


def test_lora_resume_is_bit_identical_to_an_uninterrupted_run(lora: dict) -> None:
    straight = load_ckpt(lora["straight"] / "lora_weights" / "last.ckpt")
    resumed = load_ckpt(lora["resumed"] / "lora_weights" / "last.ckpt")
    assert resumed["epoch"] == 4 and resumed["global_step"] == straight["global_step"]
    assert_same_tensors(straight["lora_state_dict"], resumed["lora_state_dict"])
    assert_same_tensors(straight["ema_state_dict"], resumed["ema_state_dict"])
    assert "Resuming run 002 from step 5 (epoch 2, step 2 of the epoch)" in lora["resume_log"]


def test_lora_stop_signal_saves_an_adapter_step_checkpoint_and_exits_0(lora: dict) -> None:
    assert lora["interrupted"].returncode == 0 and "Received SIGTERM" in lora["interrupted"].stderr
    meta = json.loads((lora["resumed"] / "metadata.json").read_text())
    assert [e["kind"] for e in meta["events"]] == ["interrupted"]
    assert meta["resumes"][0]["checkpoint"] == "step_0000005"


def test_lora_resume_on_one_process_continues_the_two_process_run(lora: dict) -> None:
    assert "saved by 2 process(es) (deepspeed-zero2); continuing on 1 (single)" in lora["single_log"]
    straight = load_ckpt(lora["straight"] / "lora_weights" / "last.ckpt")
    single = load_ckpt(lora["single"] / "lora_weights" / "last.ckpt")
    assert single["epoch"] == 4 and single["global_step"] == straight["global_step"]
    for key in ("lora_state_dict", "ema_state_dict"):
        for name, tensor in straight[key].items():  # equal up to the order of float sums
            torch.testing.assert_close(single[key][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")


def test_zero3_adapters_are_real_tensors_equal_to_zero2s(lora: dict) -> None:
    """Gathered from ZeRO-3 partitions, the adapters are full tensors (not shape [0]) with the live values."""
    z3 = load_ckpt(lora["zero3"] / "lora_weights" / "epoch_002.ckpt")
    z2 = load_ckpt(lora["resumed"] / "lora_weights" / "epoch_002.ckpt")  # same seed, data and steps
    assert z3["distributed"] == "deepspeed-zero3"
    for name, tensor in z3["lora_state_dict"].items():
        assert tensor.numel() > 0 and tensor.shape == z2["lora_state_dict"][name].shape, name
        # equal up to the order of float sums (ZeRO-3 reduce-scatters where ZeRO-2 all-reduces)
        torch.testing.assert_close(tensor, z2["lora_state_dict"][name], rtol=1e-4, atol=1e-5)
    model = load_model(lora["zero3"], which=2, ema=False)  # the adapters arrive in the model
    params = dict(model.named_parameters())
    for name, tensor in z3["lora_state_dict"].items():
        assert torch.equal(params[name].detach(), tensor), name


def test_peft_from_pretrained_round_trip(lora: dict) -> None:
    from peft import PeftModel

    from model.lora import resize_label_embedding

    base_ckpt = load_checkpoint_file(lora["straight"] / "base_model" / "base_model.ckpt")
    base = build_model(from_dict(TrainConfig, base_ckpt["config"]))
    load_weights(base, base_weights(base_ckpt))
    resize_label_embedding(base, 5)
    peft_model = PeftModel.from_pretrained(base, str(lora["straight"] / "adapter")).eval()
    ours = load_model(lora["straight"])  # best, EMA: what adapter/ exports
    x, sigma, labels = torch.randn(4, 1, 16, 16), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x, sigma, labels), ours(x, sigma, labels))


def test_export_matches_the_adapted_model_and_loads_like_a_base_checkpoint(
    lora: dict, tmp_path: Path
) -> None:
    out = tmp_path / "merged.ckpt"
    run_script("export.py", [str(lora["straight"]), "--out", str(out)])
    merged = load_model(out)
    adapted = load_model(lora["straight"])
    x, sigma, labels = torch.randn(4, 1, 16, 16), torch.full((4,), 2.0), torch.tensor([0, 1, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(merged(x, sigma, labels), adapted(x, sigma, labels), rtol=1e-4, atol=1e-5)
    ckpt = load_ckpt(out)
    build_model(from_dict(TrainConfig, ckpt["config"])).load_state_dict(ckpt["state_dict"], strict=True)


def test_list_runs_shows_lora_datasets_and_class_counts(lora: dict) -> None:
    table = run_script("train_lora.py", ["--list-runs", "--checkpoint-root", str(lora["root"])]).stdout
    assert "LoRA fine-tuning runs" in table and "Digits 0-4 (5)" in table and "<- best" in table
    assert table.count("completed") == 3


def test_adapter_is_under_five_percent_of_a_diffit_cifar_checkpoint(tmp_path: Path) -> None:
    """Default blockwise config on the paper's CIFAR model, 5 classes (trees): adapter file vs base file."""
    config = build_config(Path("configs/training/lora_finetuning.yaml"), [("model", "diffit_cifar")])
    config.model.in_channels, config.model.num_classes, config.lora.num_classes = 3, 10, 5  # type: ignore[union-attr]
    base = build_model(config)
    base_file = tmp_path / "base.ckpt"
    # Distinct copies throughout: torch.save stores a shared tensor once, which would flatter either file.
    ema = {n: p.detach().clone() for n, p in base.named_parameters()}
    torch.save({"state_dict": base.state_dict(), "ema_state_dict": ema}, base_file)
    model = build_lora_model(config, base.state_dict())
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def copy() -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in trainable.items()}

    adapter_file = tmp_path / "adapter.ckpt"  # weights, EMA and both Adam moments, as the trainer saves
    torch.save({"lora_state_dict": copy(), "ema_state_dict": copy(),
                "optimizer": {"exp_avg": copy(), "exp_avg_sq": copy()}}, adapter_file)  # fmt: skip
    ratio = adapter_file.stat().st_size / base_file.stat().st_size
    assert ratio <= 0.05, f"adapter is {ratio:.1%} of the base checkpoint"
    assert not any("base_layer" in n or n.endswith("original_module.weight") for n in trainable)
