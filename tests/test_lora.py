"""LoRA fine-tuning under real `accelerate launch` (2 processes, DeepSpeed ZeRO-2 and ZeRO-3 on the CPU).

The session's tiny base run (one process, `tiny_runs`) is fine-tuned on digits 0-4 (5 classes, so the label
embedding is resized):
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
from typing import Any

import pytest
import torch

from tests.fake_world import ThreadWorld, end_epoch, new_run, tiny_manager
from tests.helpers import (
    assert_close_tensors,
    assert_same_tensors,
    copy_runs,
    load_ckpt,
    lora_argv,
    metadata,
    old_run,
    run_cli,
    run_script,
    train_lora,
)
from trainer import load_model
from trainer.checkpoint.formats import load_checkpoint_file
from trainer.checkpoint.formats.base import BaseFormat
from trainer.checkpoint.formats.lora import LoraFormat
from trainer.checkpoint.states import RNGState, TrainingStates, TrainState
from trainer.config.files import build_config
from trainer.config.schema import TrainConfig, from_dict
from trainer.runs.layout import RunLayout
from trainer.runs.store import store_base
from trainer.training.ema import EMA
from trainer.training.factory import base_weights, build_lora_model, build_model, load_weights

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def lora(tiny_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    copy_runs(tiny_runs / "base_training", root / "base_training")  # the session's one-epoch base run
    straight = train_lora(root, "--epochs", "4", "--set", "checkpoint.keep_last_n=2")
    # run 002: every epoch kept; rank 1 gets SIGTERM after step 5 (inside epoch 2); a copy is kept
    interrupted = train_lora(root, "--epochs", "4", "--set", "checkpoint.keep_last_n=0",
                             env={"DIFFIT_FAULTS": "signal@step:step=5:rank=1"})  # fmt: skip
    copy = root.parent / f"{root.name}-copy"
    shutil.copytree(root, copy, symlinks=True)
    resumed = train_lora(root, "--resume", "2", "--epochs", "4")
    train_lora(root, "--epochs", "2", accelerate_config="cpu_zero3")
    # the copy of run 002 resumes on one process without DeepSpeed
    single = run_cli("lora", lora_argv(copy, "--resume", "2", "--epochs", "4"))  # in this process
    assert single.returncode == 0, single.stderr[-3000:]
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
    meta = metadata(run)
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
    assert (
        lora["interrupted"].returncode == 0 and "stopped by SIGTERM at step 5" in lora["interrupted"].stdout
    )
    meta = metadata(lora["resumed"])
    assert [e["kind"] for e in meta["events"]] == ["interrupted"]
    assert meta["resumes"][0]["checkpoint"] == "step_0000005"


def test_lora_resume_on_one_process_continues_the_two_process_run(lora: dict) -> None:
    assert "saved by 2 process(es) (deepspeed-zero2); continuing on 1 (single)" in lora["single_log"]
    straight = load_ckpt(lora["straight"] / "lora_weights" / "last.ckpt")
    single = load_ckpt(lora["single"] / "lora_weights" / "last.ckpt")
    assert single["epoch"] == 4 and single["global_step"] == straight["global_step"]
    for key in ("lora_state_dict", "ema_state_dict"):
        assert_close_tensors(straight[key], single[key])  # equal up to the order of float sums


def test_zero3_adapters_are_real_tensors_equal_to_zero2s(lora: dict) -> None:
    """Gathered from ZeRO-3 partitions, the adapters are full tensors (not shape [0]) with the live values."""
    z3 = load_ckpt(lora["zero3"] / "lora_weights" / "epoch_002.ckpt")
    z2 = load_ckpt(lora["resumed"] / "lora_weights" / "epoch_002.ckpt")  # same seed, data and steps
    assert z3["distributed"] == "deepspeed-zero3"
    for name, tensor in z3["lora_state_dict"].items():
        assert tensor.numel() > 0 and tensor.shape == z2["lora_state_dict"][name].shape, name
    # equal up to the order of float sums (ZeRO-3 reduce-scatters where ZeRO-2 all-reduces)
    assert_close_tensors(z2["lora_state_dict"], z3["lora_state_dict"])
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
    run_script("export.py", [str(lora["straight"]), "--out", str(out)])  # the script as users run it
    merged = load_model(out)
    adapted = load_model(lora["straight"])
    x, sigma, labels = torch.randn(4, 1, 16, 16), torch.full((4,), 2.0), torch.tensor([0, 1, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(merged(x, sigma, labels), adapted(x, sigma, labels), rtol=1e-4, atol=1e-5)
    ckpt = load_ckpt(out)
    build_model(from_dict(TrainConfig, ckpt["config"])).load_state_dict(ckpt["state_dict"], strict=True)


def test_a_lora_run_written_before_the_checkpoint_package_resumes_bit_identically(
    lora: dict, tmp_path: Path
) -> None:
    """A LoRA run on the same base as run 001 here, written by the trainer as it was before checkpointing became
    a package, stopped by SIGTERM after step 5 (``OLD_RUNS``). Bit-identical to the straight run where one of
    its copies was written on a machine that computes as this one; elsewhere, equal up to rounding."""
    fixture, exact = old_run("lora_finetuning", lora["straight"])
    root = tmp_path / "checkpoints"
    shutil.copytree(fixture, root / "lora_finetuning")
    result = train_lora(root, "--resume", "1", "--epochs", "4")
    assert "Resuming run 001 from step 5 (epoch 2, step 2 of the epoch)" in result.stdout
    straight = load_ckpt(lora["straight"] / "lora_weights" / "epoch_004.ckpt")
    resumed = load_ckpt(root / "lora_finetuning" / "run_001" / "lora_weights" / "epoch_004.ckpt")
    same = assert_same_tensors if exact else assert_close_tensors
    same(straight["lora_state_dict"], resumed["lora_state_dict"])
    same(straight["ema_state_dict"], resumed["ema_state_dict"])


def test_list_runs_shows_lora_datasets_and_class_counts(lora: dict) -> None:
    table = run_cli("lora", ["--list-runs", "--checkpoint-root", str(lora["root"])]).stdout
    assert "LoRA fine-tuning runs" in table and "Digits 0-4 (5)" in table and "<- best" in table
    assert table.count("completed") == 3
    rows = json.loads(
        run_cli("lora", ["--list-runs", "--json", "--checkpoint-root", str(lora["root"])]).stdout
    )
    assert all(r["epochs_completed"] == r["epochs_total"] for r in rows), rows  # N/N, not N/?


@pytest.mark.slow
def test_the_trainers_adapter_file_is_under_five_percent_of_its_diffit_cifar_checkpoint(
    tmp_path: Path,
) -> None:
    """The paper's CIFAR model with the default blockwise config on 5 classes (trees): the epoch file the
    LoRA format writes (adapters, their EMA and Adam state, RNG, history) against the merged epoch file the
    base format writes for the base (weights + EMA), both saved by the trainer's own checkpoint manager."""
    config = build_config(Path("configs/training/lora_finetuning.yaml"), [("model", "diffit_cifar")])
    config.model.in_channels, config.model.num_classes, config.lora.num_classes = 3, 10, 5  # type: ignore[union-attr]
    topo = ThreadWorld(1).topology(0)

    def saved(module: torch.nn.Module, layout: RunLayout, fmt: Any) -> Path:
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params)
        for p in params:  # one step: Adam's moments exist, as in every checkpoint after the first step
            p.grad = torch.randn_like(p)
        optimizer.step()
        states = TrainingStates(module, optimizer, EMA(module.named_parameters(), halflife_kimg=1,
                                rampup_ratio=None), TrainState(), RNGState(0))  # fmt: skip
        manager = tiny_manager(layout, topo, states, fmt, async_save=False)
        end_epoch(states, 1)
        manager.maybe_save("epoch", metrics={"train_loss": 1.0}, is_best=True, last=True)
        manager.close()
        return layout.ckpt("epoch_001")

    base = build_model(config)
    base_layout = new_run(tmp_path / "base_training" / "run_001")
    base_file = saved(base, base_layout, BaseFormat(base_layout.checkpoint_folder, topo, config.to_dict()))
    lora_layout = new_run(tmp_path / "lora_finetuning" / "run_001", "lora")
    store_base(base_file, lora_layout.stored_base)  # the adapters' manifests name the base they apply to
    model = build_lora_model(config, base.state_dict())
    adapter_file = saved(
        model,
        lora_layout,
        LoraFormat(lora_layout.checkpoint_folder, topo, config.to_dict(), lora_layout.stored_base),
    )

    ratio = adapter_file.stat().st_size / base_file.stat().st_size
    assert ratio <= 0.05, f"adapter is {ratio:.1%} of the base checkpoint"
    ckpt = load_ckpt(adapter_file)
    assert ckpt["lora_state_dict"] and not any("base_layer" in n for n in ckpt["lora_state_dict"])
