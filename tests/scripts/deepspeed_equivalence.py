"""Launched by tests/test_deepspeed_equivalence.py: the trainer's checkpoint beside DeepSpeed's own of the same
state, and a resume from it, in one launch (``accelerate launch --config_file ... this DATA_ROOT WORK``).

After two training steps of the tiny model on a fake CIFAR-10 folder, every rank saves the trainer's epoch
checkpoint and DeepSpeed's ``save_checkpoint`` of the same engine; the full state (fp32 master weights, Adam's
moments and step, the EMA) is gathered; then every tensor is disturbed and the trainer's checkpoint is loaded
back. Rank 0 writes WORK/equivalence.json: which tensors differ between the trainer's model file and
DeepSpeed's ``zero_to_fp32`` of its shards, between the trainer's moments and the moments merged from
DeepSpeed's shards, between the state before and after the resume, and between the module's (bf16 or fp32)
weights after the resume and the cast of the restored masters; and how many parameters ZeRO sharded. It also
keeps the gathered state (WORK/full_state.pt).

``... this DATA_ROOT WORK --restore``, on other processes or another stage: load that checkpoint into a fresh
engine and write WORK/restored.json: which tensors differ from the kept state, and the module's weights from
the cast of the restored masters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[0] = str(REPO)

import torch  # noqa: E402

from benchmarks.trainer_side import EPOCH_END, TrainerSide  # noqa: E402
from trainer.checkpoint.sharding.full_state import gather_full_state  # noqa: E402
from trainer.checkpoint.states import unwrap_model  # noqa: E402


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names missing on either side or with other values (bit for bit)."""
    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b or not torch.equal(a[n].float(), b[n].float())]


def full_state(side: TrainerSide) -> dict[str, Any]:
    """Master weights, moments, steps and EMA, whole, on every rank (collective)."""
    module = unwrap_model(side.engine)
    full = gather_full_state(side.engine, side.states.optimizer, module, side.topo)
    return {"params": full.params, "moments": full.moments, "steps": full.steps, "ema": side.ema.full_state()}


def module_weights(side: TrainerSide) -> dict[str, torch.Tensor]:
    """The module's own weights (bf16 or fp32), whole (collective under ZeRO-3)."""
    import contextlib

    module = unwrap_model(side.engine)
    params = list(module.parameters())
    gather: Any = contextlib.nullcontext()
    if side.topo.deepspeed_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def disturb(side: TrainerSide) -> None:
    """Change every tensor a resume must restore, as this rank holds it."""
    from trainer.checkpoint.sharding.owned import OwnedState

    owned = OwnedState(side.states, side.topo)
    with torch.no_grad():
        for piece in [*owned.model_pieces(), *owned.optimizer_pieces()]:
            piece.data.add_(1.0)
        for p in unwrap_model(side.engine).parameters():
            part = getattr(p, "ds_tensor", None)
            (part if part is not None else p.data).add_(1.0)


def restore(side: TrainerSide, work: Path) -> None:
    """Load the checkpoint another launch saved under ``work`` and compare with what it kept."""
    side.manager("ours", async_save=False).load()
    after, weights = full_state(side), module_weights(side)
    if side.is_main:
        kept = torch.load(work / "full_state.pt", weights_only=True)
        result = {
            "distributed": side.topo.distributed,
            "dtypes": sorted({str(w.dtype) for w in weights.values()}),
            "restored_params": differ(after["params"], kept["params"]),
            "restored_moments": [
                name
                for key in ("exp_avg", "exp_avg_sq")
                for name in differ(after["moments"][key], kept["moments"][key])
            ],
            "restored_steps": sorted(set(after["steps"].values())) == sorted(set(kept["steps"].values())),
            "restored_ema": differ(after["ema"], kept["ema"]),
            "module_vs_masters": [
                n
                for n, w in weights.items()
                if not torch.equal(w, after["params"][n].to(w.dtype).view(w.shape))
            ],
        }
        (work / "restored.json").write_text(json.dumps(result, indent=1))


def main() -> int:
    data_root, work = Path(sys.argv[1]), Path(sys.argv[2])
    side = TrainerSide(data_root, work, batch=2, model="diffit_tiny")
    if sys.argv[3:] == ["--restore"]:
        restore(side, work)
        side.accelerator.end_training()
        return 0
    for step in range(2):
        side.train_step(step)
    ours = side.manager("ours", async_save=False)
    side.next_epoch()
    ours.maybe_save("epoch", **EPOCH_END)
    ours.close()
    side.engine.save_checkpoint(str(work / "deepspeed"), tag="same")
    before = full_state(side)
    if side.is_main:
        torch.save(before, work / "full_state.pt")
    disturb(side)
    ours.load()
    after, weights = full_state(side), module_weights(side)
    module = unwrap_model(side.engine)
    sharded = sum(1 for p in module.parameters() if 0 < getattr(p, "ds_tensor", p).numel() < p.ds_numel) if (
        side.topo.deepspeed_stage == 3
    ) else 0  # fmt: skip
    if side.is_main:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from safetensors.torch import load_file

        from trainer.checkpoint.sharding.zero_merge import merge_zero_optimizer_state

        layout = side.layout("ours")
        ckpt = torch.load(layout.ckpt("epoch_001"), weights_only=True)
        reference = get_fp32_state_dict_from_zero_checkpoint(str(work / "deepspeed"), tag="same")
        ds_moments, ds_step = merge_zero_optimizer_state(work / "deepspeed" / "same")
        moments = load_file(str(layout.checkpoint_folder.state_root / "epoch_001" / "optimizer.safetensors"))
        result = {
            "distributed": side.topo.distributed,
            "dtypes": sorted({str(p.dtype) for p in module.parameters()}),
            "model_file_dtypes": sorted({str(t.dtype) for t in ckpt["state_dict"].values()}),
            "model_file_vs_zero_to_fp32": differ(
                ckpt["state_dict"], {k: v.contiguous() for k, v in reference.items()}
            ),
            "model_file_vs_gathered": differ(ckpt["state_dict"], before["params"]),
            "ema_vs_gathered": differ(ckpt["ema_state_dict"], before["ema"]),
            "moments_vs_deepspeed": [
                key
                for key in ("exp_avg", "exp_avg_sq")
                for name in differ({n: moments[f"{key}/{n}"] for n in ds_moments[key]}, ds_moments[key])
            ],
            "steps": sorted({*before["steps"].values(), ds_step}),
            "restored_params": differ(after["params"], before["params"]),
            "restored_moments": [
                name
                for key in ("exp_avg", "exp_avg_sq")
                for name in differ(after["moments"][key], before["moments"][key])
            ],
            "restored_steps": after["steps"] == before["steps"],
            "restored_ema": differ(after["ema"], before["ema"]),
            "module_vs_masters": [
                n
                for n, w in weights.items()
                if not torch.equal(w, after["params"][n].to(w.dtype).view(w.shape))
            ],
            "grad_tensors": [n for n, t in ckpt["state_dict"].items() if t.requires_grad],
            "sharded_parameters": sharded,
            "parameters": len(before["params"]),
        }
        (work / "equivalence.json").write_text(json.dumps(result, indent=1))
    side.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
