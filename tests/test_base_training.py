"""Base training under real `accelerate launch` with 2 processes and DeepSpeed on the CPU.

One module-scoped run serves every test here (launches are the expensive part): run 001, 2 epochs saved
synchronously, then `--resume 1 --epochs 4` (ZeRO-2, background saves), compared with the session's
uninterrupted `reference` run of the same seed. Resumes from background-saved checkpoints are checked
bit-identical in tests/test_preemption.py.
It keeps the last 2 epochs and picks ``best`` by the *highest* val loss, so the best epoch is an early one
that retention must keep although it is not among the last two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import OLD_RUNS, assert_same_tensors, load_ckpt, metadata, run_cli, train_base
from trainer.checkpoint.manifest import read_manifests
from trainer.config.schema import TrainConfig, from_dict
from trainer.training.factory import build_model

pytestmark = pytest.mark.distributed

POLICY = ["--set", "checkpoint.keep_last_n=2", "--set", "checkpoint.mode=max"]


@pytest.fixture(scope="module")
def zero2(reference: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("zero2")
    train_base(root, "--epochs", "2", *POLICY, "--set", "checkpoint.async_save=false")
    resumed = train_base(root, "--resume", "1", "--epochs", "4", *POLICY)
    return {
        "root": root,
        "run": root / "base_training" / "run_001",
        "log": resumed.stdout,
        "stderr": resumed.stderr,
        "reference": reference,
    }


def test_a_log_that_is_not_a_terminal_reads_as_lines(zero2: dict) -> None:
    """Output to a file or pipe (SLURM, nohup) gets no progress bar: no ``\r``, every line whole."""
    assert "\r" not in zero2["log"] + zero2["stderr"]
    assert "Epoch 4/4: train_loss=" in zero2["log"].splitlines()[-3]  # a whole line, not glued to a bar


def test_a_log_that_is_not_a_terminal_gets_a_progress_line_now_and_then(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from trainer.training import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_SECONDS", 0.0)  # a line at every step
    config = SimpleNamespace(epochs=4, batch_size=32, logging=SimpleNamespace(log_every_n_steps=10))
    trainer = SimpleNamespace(config=config, state=SimpleNamespace(step_in_epoch=0, global_step=7),
                              steps_per_epoch=3, topo=SimpleNamespace(is_main=True),
                              trackers=SimpleNamespace(enabled=False), run=SimpleNamespace(print=print))  # fmt: skip
    meter = progress.EpochProgress(trainer, 3)  # type: ignore[arg-type]
    for step in range(3):
        meter.update(step, loss=0.5, lr=2e-3, last=step == 2)
    meter.close()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["Epoch 3/4: step 1/3", "Epoch 3/4: step 2/3"]
    assert all(", loss=0.5000, " in line and " img/s, lr=2.00e-03" in line for line in lines)
    assert "\r" not in out + err


def test_two_process_zero2_run_trains_and_loss_falls(zero2: dict) -> None:
    meta = metadata(zero2["run"])
    assert meta["world_size"] == 2 and meta["distributed"] == "deepspeed-zero2"
    losses = [entry["train_loss"] for entry in meta["history"]]
    assert len(losses) == 4
    assert losses[-1] < losses[0], losses


def test_base_run_has_the_documented_layout(zero2: dict) -> None:
    run = zero2["run"]
    assert (run / "config.json").is_file() and (run / "metadata.json").is_file() and (run / "logs").is_dir()
    ckpts = run / "checkpoints"
    for name in ("best.ckpt", "last.ckpt", "epoch_004.ckpt", "epoch_003.ckpt"):
        assert (ckpts / name).is_file(), name
    state = ckpts / "state" / "epoch_004"
    assert sorted(p.name for p in state.iterdir()) == [
        "optimizer.safetensors", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json",
    ]  # fmt: skip
    # Each rank wrote its own part of the model file and of Adam's moments: no rank gathers, none rewrites.
    files = read_manifests(ckpts)[-1].files
    for name in ("epoch_004.ckpt", "state/epoch_004/optimizer.safetensors"):
        assert [part["rank"] for part in files[name]["parts"]] == [0, 1], name
    meta = metadata(run)
    for key in ("run_number", "kind", "experiment", "dataset", "status", "created_at", "updated_at",
                "world_size", "distributed", "epochs_completed", "global_step", "best", "history", "resumes"):  # fmt: skip
        assert key in meta, key
    assert meta["status"] == "completed" and meta["kind"] == "base" and meta["epochs_completed"] == 4
    assert meta["dataset"] == {"name": "Digits", "num_classes": 10}
    assert meta["global_step"] == 12
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4]
    grid = Image.open(run / "logs" / "samples" / "epoch_004.png")
    # one row per digit class, 2 samples per row (TINY_RUN), 16 px images drawn 2x with 2 px gaps
    assert grid.format == "PNG" and grid.size[1] == 10 * (16 * 2 + 2) + 2 and grid.size[0] > 2 * 32


def test_checkpoint_loads_weights_only_into_the_model_strictly(zero2: dict) -> None:
    ckpt = load_ckpt(zero2["run"] / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "ema_state_dict", "epoch", "global_step", "metrics", "config"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 4 and ckpt["global_step"] == 12 and "val_loss" in ckpt["metrics"]
    config = from_dict(TrainConfig, ckpt["config"])
    model = build_model(config)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    params = dict(model.named_parameters())
    assert set(ckpt["ema_state_dict"]) == set(params)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())


def test_best_and_last_are_hard_links_to_epoch_files(zero2: dict) -> None:
    ckpts = zero2["run"] / "checkpoints"
    meta = metadata(zero2["run"])
    best_epoch = meta["best"]["epoch"]
    assert os.path.samefile(ckpts / "last.ckpt", ckpts / "epoch_004.ckpt")
    assert os.path.samefile(ckpts / "best.ckpt", ckpts / f"epoch_{best_epoch:03d}.ckpt")
    assert meta["best"]["metric"] == "val_loss"
    values = [h["val_loss"] for h in meta["history"]]
    assert meta["best"]["value"] == max(values)  # mode=max in this fixture


def test_retention_keeps_last_n_and_never_deletes_best(zero2: dict) -> None:
    ckpts = zero2["run"] / "checkpoints"
    meta = metadata(zero2["run"])
    expected = sorted({3, 4, meta["best"]["epoch"]})
    on_disk = sorted(int(p.stem[-3:]) for p in ckpts.glob("epoch_*.ckpt"))
    states = sorted(int(p.name[-3:]) for p in (ckpts / "state").glob("epoch_*"))
    assert on_disk == expected and states == expected
    assert meta["checkpoints"] == expected


def test_resume_is_bit_identical_to_an_uninterrupted_run(zero2: dict) -> None:
    resumed = load_ckpt(zero2["run"] / "checkpoints" / "last.ckpt")
    assert resumed["epoch"] == 4 and resumed["global_step"] == 12
    assert_same_tensors(zero2["reference"]["weights"]["state_dict"], resumed["state_dict"])
    assert_same_tensors(zero2["reference"]["weights"]["ema_state_dict"], resumed["ema_state_dict"])
    a = metadata(zero2["reference"]["run"])["history"]
    b = metadata(zero2["run"])["history"]
    assert [h["train_loss"] for h in a] == [h["train_loss"] for h in b]


def test_resume_says_where_it_continues_and_records_it(zero2: dict) -> None:
    assert "Resuming run 001 from epoch 2 (checkpoint" in zero2["log"]
    meta = metadata(zero2["run"])
    assert len(meta["resumes"]) == 1 and meta["resumes"][0]["from_epoch"] == 2
    assert meta["status"] == "completed" and meta["epochs_completed"] == 4


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings (Linux)")
def test_merging_an_earlier_versions_shards_lets_go_of_every_shard() -> None:
    """Checkpoints of earlier versions hold DeepSpeed's shards, merged when they resume elsewhere or are
    exported. DeepSpeed saves the master weights with ``requires_grad``: the merged tensors must be plain data,
    not the ends of an autograd graph that keeps every rank's memory-mapped shard alive (twice the memory)."""
    from trainer.checkpoint.sharding.zero_merge import merge_zero_optimizer_state, merge_zero_shards

    folder = OLD_RUNS[0] / "base_training" / "run_001" / "checkpoints" / "state" / "epoch_001"
    weights = merge_zero_shards(folder)
    moments, _ = merge_zero_optimizer_state(folder)
    tensors = [*weights.values(), *(t for by_name in moments.values() for t in by_name.values())]
    assert tensors and not any(t.requires_grad or t.grad_fn is not None for t in tensors)
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]
    assert not mapped, f"shards still mapped after the merge: {mapped[:2]}"


def test_list_runs_prints_table_and_json(zero2: dict) -> None:
    root = str(zero2["root"])
    table = run_cli("base", ["--list-runs", "--checkpoint-root", root]).stdout
    for column in ("Run #", "Experiment", "Dataset", "Epochs", "Checkpoints", "Best", "Status"):
        assert column in table
    assert "001" in table and "<- best" in table and "Digits (10)" in table and "4/4" in table
    rows = json.loads(run_cli("base", ["--list-runs", "--json", "--checkpoint-root", root]).stdout)
    assert [r["number"] for r in rows] == [1]
    assert all(r["status"] == "completed" and r["epochs_completed"] == 4 for r in rows)
    assert sum(r["is_best"] for r in rows) == 1


# --------------------------------------------------------------------------------------------------
# The single-process fallback (ZeRO-3: tests/test_deepspeed_equivalence.py)
# --------------------------------------------------------------------------------------------------


def test_single_process_run_writes_the_same_files(zero2: dict, tiny_runs: Path) -> None:
    run = tiny_runs / "base_training" / "run_001"  # one epoch, one process without DeepSpeed
    names = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    assert names == {"epoch_001.ckpt", "best.ckpt", "last.ckpt"}
    single = load_ckpt(run / "checkpoints" / "last.ckpt")
    sharded = load_ckpt(zero2["run"] / "checkpoints" / "last.ckpt")
    assert single.keys() == sharded.keys()
    assert single["state_dict"].keys() == sharded["state_dict"].keys()
    meta = metadata(run)
    assert meta["distributed"] == "single" and meta["world_size"] == 1
