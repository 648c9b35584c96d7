"""Read DeepSpeed ZeRO checkpoint shards safely and merge them into one full fp32 state dict.

DeepSpeed writes, per rank, ``*_optim_states.pt`` with that rank's slice of the fp32 master weights (ZeRO-1/2:
one contiguous slice of each flattened parameter group; ZeRO-3: a slice of every parameter) and
``*model_states.pt`` with parameter names, shapes and buffers. ``merge_zero_shards`` rebuilds the full
weights exactly as DeepSpeed's ``zero_to_fp32`` does (tests compare them), with two differences:
  * shards are memory-mapped and read one rank at a time, so the merge holds one full copy of the weights
    plus one rank's slice, where ``zero_to_fp32`` concatenates every rank's slice first;
  * every file is read with ``weights_only=True`` and an explicit allow-list of DeepSpeed's plain-data
    classes, so a shard cannot run code when loaded.
The shard files' keys are DeepSpeed's (``deepspeed_compat.SHARD_KEYS``, checked against its constants).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint.deepspeed_compat import SHARD_KEYS as KEY
from trainer.checkpoint.deepspeed_compat import load_shard

_RANK = re.compile(r"zero_pp_rank_(\d+)_")


def _optim_files(folder: Path) -> list[Path]:
    files = list(folder.glob("*_optim_states.pt"))
    ranks = []
    for f in files:
        m = _RANK.search(f.name)
        if m is None:
            raise ValueError(f"unexpected DeepSpeed shard name {f.name}")
        ranks.append(int(m.group(1)))
    ordered = [f for _, f in sorted(zip(ranks, files))]
    if sorted(ranks) != list(range(len(files))):
        raise ValueError(f"{folder}: optimizer shards of ranks {sorted(ranks)} are not 0..{len(files) - 1}")
    return ordered


def _model_file(folder: Path) -> Path:
    for pattern in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (folder / pattern).is_file():
            return folder / pattern
    raise ValueError(f"{folder} holds no DeepSpeed model states file")


def merge_zero_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (parameters in module order, then buffers) from one ZeRO checkpoint folder."""
    merged, model_states, stage, world_size = _merge_flat(folder, "fp32")
    state = dict(merged)
    _add_frozen_and_buffers(state, folder, model_states, stage, world_size)
    for alias, target in model_states.get(KEY["shared_params"], {}).items():
        if target in state:
            state[alias] = state[target]
    return state


def merge_zero_optimizer_state(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """Adam's moments by parameter name ({"exp_avg": {name: full tensor}, "exp_avg_sq": ...}) and its step.

    The moments are laid out in each rank's flat partition exactly like the fp32 master weights, so the
    same merge rebuilds them; this is what lets a run resume on a different number of processes.
    """
    moments = {key: _merge_flat(folder, key)[0] for key in ADAM_STATES}
    first = load_shard(_optim_files(folder)[0])[KEY["optimizer"]]
    states = first[KEY["base_optimizer"] if int(first[KEY["stage"]]) <= 2 else KEY["zero3_optimizer"]][
        "state"
    ]
    return moments, float(states[0]["step"])


ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _flat_groups(opt: dict[str, Any], field: str) -> list[torch.Tensor]:
    """One rank's flat partitions of ``field`` (``fp32`` master weights or an Adam state), per group,
    detached: DeepSpeed saves the master weights with ``requires_grad``, and a copy out of them would
    record an autograd graph that keeps every rank's memory-mapped shard alive in the merged tensors."""
    stage = int(opt[KEY["stage"]])
    if field == "fp32":
        parts = list(opt[KEY["fp32_zero12"] if stage <= 2 else KEY["fp32_zero3"]])
    else:
        states = opt[KEY["base_optimizer"] if stage <= 2 else KEY["zero3_optimizer"]]["state"]
        parts = [states[g][field] for g in sorted(states)]
    return [part.detach() for part in parts]


def _merge_flat(folder: Path, field: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], int, int]:
    """(name → full tensor of ``field`` for every trained parameter, model states, ZeRO stage, world size)."""
    optim_files = _optim_files(folder)
    world_size = len(optim_files)
    if world_size == 0:
        raise ValueError(f"{folder} holds no DeepSpeed optimizer shards")
    model_states = load_shard(_model_file(folder))
    shapes: list[dict[str, torch.Size]] = model_states[KEY["param_shapes"]]
    flat_shapes = {name: torch.Size(shape) for group in shapes for name, shape in group.items()}
    merged = {name: torch.empty(math.prod(shape), dtype=torch.float32) for name, shape in flat_shapes.items()}

    first = load_shard(optim_files[0])[KEY["optimizer"]]
    stage = int(first[KEY["stage"]])
    paddings = first.get(KEY["paddings"])
    del first
    starts = [0] * len(shapes)  # ZeRO-1/2: where this rank's slice begins in each flattened group
    for rank, path in enumerate(optim_files):
        opt = load_shard(path)[KEY["optimizer"]]
        parts = _flat_groups(opt, field)
        if stage <= 2:
            _copy_zero2_slice(merged, shapes, parts, starts, paddings)
            starts = [start + part.numel() for start, part in zip(starts, parts)]
        else:
            _copy_zero3_slice(merged, flat_shapes, parts, rank, world_size)
        del opt, parts
    return (
        {name: merged[name].view(shape) for name, shape in flat_shapes.items()},
        model_states,
        stage,
        world_size,
    )


def _copy_zero2_slice(
    merged: dict[str, torch.Tensor],
    shapes: list[dict[str, torch.Size]],
    partitions: list[torch.Tensor],
    starts: list[int],
    paddings: list[list[int]] | None,
) -> None:
    """ZeRO-1/2: a rank holds one contiguous slice of each flattened group, starting at ``starts[group]``.

    Slices are not all the same length (the group is padded for alignment and split unevenly), so their
    positions are the running sum of the lengths of the lower ranks' slices, as ``zero_to_fp32`` has it.
    """
    for group, (group_shapes, part) in enumerate(zip(shapes, partitions)):
        lo, hi = starts[group], starts[group] + part.numel()
        offset = 0
        for i, name in enumerate(group_shapes):
            numel = merged[name].numel()
            start, end = max(offset, lo), min(offset + numel, hi)
            if start < end:
                merged[name][start - offset : end - offset].copy_(part[start - lo : end - lo])
            offset += numel + (paddings[group][i] if paddings else 0)


def _copy_zero3_slice(
    merged: dict[str, torch.Tensor],
    flat_shapes: dict[str, torch.Size],
    groups: list[torch.Tensor],
    rank: int,
    world_size: int,
) -> None:
    """ZeRO-3: each parameter is padded to a multiple of the world size and split evenly across ranks."""
    flat = groups[0] if len(groups) == 1 else torch.cat(list(groups))
    offset = 0
    for name in flat_shapes:
        numel = merged[name].numel()
        per_rank = math.ceil(numel / world_size)
        start = rank * per_rank
        count = max(0, min(per_rank, numel - start))
        if count:
            merged[name][start : start + count].copy_(flat[offset : offset + count])
        offset += per_rank


def _add_frozen_and_buffers(
    state: dict[str, torch.Tensor], folder: Path, model_states: dict[str, Any], stage: int, world_size: int
) -> None:
    frozen_shapes = model_states.get(KEY["frozen_shapes"]) or {}
    if frozen_shapes and stage <= 2:
        for name in frozen_shapes:
            state[name] = model_states[KEY["frozen_fragments"]][name].float()
    elif frozen_shapes:
        per_rank = [
            load_shard(folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")[KEY["frozen_fragments"]]
            for r in range(world_size)
        ]
        for name, shape in frozen_shapes.items():
            full = torch.cat([frags[name].flatten().float() for frags in per_rank])
            state[name] = full[: math.prod(shape)].view(shape).clone()
    for name in model_states.get(KEY["buffer_names"], []):
        tensor = model_states[KEY["module"]][name]
        state[name] = tensor.float() if tensor.is_floating_point() else tensor.clone()
