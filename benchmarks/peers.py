"""The peers' checkpoint code, written as each library's documentation shows it, so that a reader can check
that the peers figure (``benchmarks/figures/peers.py``) is fair. Nothing here is used by the trainer.

    Accelerate   ``accelerator.save_state(folder)`` / ``load_state(folder)``, the EMA registered with
                 ``accelerator.register_for_checkpointing`` (Accelerate's "Checkpointing" guide), gathered
                 whole first where ZeRO-3 partitions it (Accelerate saves registered objects from the
                 main process alone: ``WholeEMA``)
    DeepSpeed    ``engine.save_checkpoint(root, tag, client_state={"ema": ...})`` / ``load_checkpoint(root,
                 tag)``; a universal checkpoint for another number of processes: ``ds_to_universal`` on the
                 saved tag, then ``load_checkpoint`` with ``"checkpoint": {"load_universal": true}`` in the
                 DeepSpeed config (DeepSpeed's "Universal Checkpointing" tutorial)
    torch DCP    a model sharded with FSDP2 (``fully_shard``: DeepSpeed ZeRO's counterpart in torch) and
                 AdamW; ``get_state_dict``, ``dcp.save`` / ``dcp.async_save`` / ``dcp.load``,
                 ``set_state_dict`` (torch's "Getting Started with Distributed Checkpoint" and "Asynchronous
                 Saving with DCP" recipes). Without CUDA there is no pinned memory: ``async_save`` stages the
                 state in plain host memory (its default stager), then writes it in a thread.

Every peer saves the same state as the trainer: the weights, AdamW's moments and an EMA of the weights, and
every load is checked to restore the weights and the EMA exactly (``peer_timings.py``).
A save counts as done when its bytes are on disk: ``durable`` fsyncs every file and folder it wrote (DCP
and the trainer fsync as they write; ``torch.save``, which Accelerate and DeepSpeed use, does not).
DeepSpeed's fast checkpoint writer (``"checkpoint": {"writer": {"type": "fast"}}``: O_DIRECT writes through
its ``async_io`` op) is a peer of its own where it runs: its op needs libaio (``libaio-dev``, which ``.ci/run``
installs) and builds on the CPU, but on a machine without a GPU DeepSpeed 0.19's writer pins its I/O buffer
through CUDA and fails (``fast_writer``); the record says why it is left out.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch


def durable(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (one process does it for all: one page cache)."""
    from trainer.storage.atomic import fsync_dir

    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


# -- Accelerate -------------------------------------------------------------------------------------------


class WholeEMA:
    """What an Accelerate user registers for an EMA (``register_for_checkpointing``): Accelerate saves custom
    objects from the main process alone, so an EMA that ZeRO-3 partitions (each rank its slice) is gathered
    whole on every rank before ``save_state`` and cut back to each rank's slice after ``load_state``;
    unpartitioned, it is the EMA itself."""

    def __init__(self, ema: Any) -> None:
        self.ema, self.value = ema, {}

    def state_dict(self) -> dict[str, Any]:
        return self.value

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state


def accelerate_save(accelerator: Any, folder: Path, ema: WholeEMA) -> None:
    """Model, optimizer, RNG and every object registered with ``register_for_checkpointing``."""
    ema.value = ema.ema.full_state()  # collective under ZeRO-3
    try:
        accelerator.save_state(str(folder))
    finally:
        ema.value = {}  # the whole EMA lives only for the save, as a user's would


def accelerate_load(accelerator: Any, folder: Path, ema: WholeEMA) -> None:
    accelerator.load_state(str(folder))
    try:
        ema.ema.from_full(ema.value)
    finally:
        ema.value = {}


# -- DeepSpeed --------------------------------------------------------------------------------------------


def deepspeed_save(engine: Any, root: Path, tag: str, ema: Any) -> None:
    engine.save_checkpoint(str(root), tag=tag, client_state={"ema": ema.state_dict()})


def fast_writer(engine: Any) -> Any:
    """DeepSpeed's fast checkpoint writer for ``engine``: ``"checkpoint": {"writer": {"type": "fast",
    "data_parallel": "replica"}}`` in its config (O_DIRECT writes through the async_io op, libaio; without
    ``data_parallel`` DeepSpeed 0.19 fails on an engine with no model parallelism: it reads a ``dp_rank`` its
    parallel info lacks). Raises what DeepSpeed raises where it cannot run: without a GPU, 0.19 pins its I/O
    buffer through CUDA ("Found no NVIDIA driver")."""
    from trainer.checkpoint.deepspeed_compat import writer_for

    # Its writer factory reads the machine layout from the variables DeepSpeed's own launcher sets; torch
    # elastic (under accelerate launch) names them otherwise.
    os.environ.setdefault("CROSS_RANK", os.environ.get("GROUP_RANK", "0"))
    machines = int(os.environ.get("WORLD_SIZE", "1")) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    os.environ.setdefault("CROSS_SIZE", str(max(1, machines)))
    return writer_for(engine, {"writer": {"type": "fast", "data_parallel": "replica"}})


def deepspeed_fast_save(engine: Any, fast: Any, root: Path, tag: str, ema: Any) -> None:
    """``deepspeed_save`` through DeepSpeed's fast checkpoint writer ``fast`` (``fast_writer``); its files load as the default
    writer's do."""
    from trainer.checkpoint.deepspeed_compat import saving_through

    with saving_through(engine, fast):
        deepspeed_save(engine, root, tag, ema)


def deepspeed_load(engine: Any, root: Path, tag: str, ema: Any | None) -> None:
    """``ema``: None for a universal checkpoint, which converts the weights and optimizer only (an EMA in
    ``client_state`` is one process's: under ZeRO-3, its slice, which fits no other number of processes)."""
    _, client_state = engine.load_checkpoint(str(root), tag=tag)
    if ema is not None:
        ema.load_state_dict(client_state["ema"])


def to_universal(root: Path, tag: str, universal_tag: str) -> None:
    """DeepSpeed's conversion of a saved tag to a universal checkpoint (``ds_to_universal.py``), with the
    flag its tutorial gives for models that are not Megatron's (``--inject_missing_state``)."""
    import contextlib
    import io
    import sys

    from deepspeed.checkpoint import ds_to_universal

    argv = ["ds_to_universal", "--input_folder", str(root / tag), "--output_folder", str(root / universal_tag),
            "--inject_missing_state"]  # fmt: skip
    saved, sys.argv = sys.argv, argv
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # one line per parameter
            ds_to_universal.main(ds_to_universal.parse_arguments())
    finally:
        sys.argv = saved


def async_io_unavailable() -> str | None:
    """Why DeepSpeed's async_io op (of its fast and decoupled checkpoint writers) cannot build here, or None."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return "DeepSpeed's fast and decoupled checkpoint writers need its async_io op (libaio-dev), not installed here"


# -- torch.distributed.checkpoint, with FSDP2 --------------------------------------------------------------


def fsdp2(module: torch.nn.Module, *, reshard_after_forward: bool) -> torch.nn.Module:
    """``module`` sharded as FSDP2's documentation shows: each block (every item of a ``ModuleList``), then
    the root. Resharding after the
    forward pass is ZeRO-3's way; keeping the parameters gathered until the backward pass, ZeRO-2's."""
    from torch.distributed.fsdp import fully_shard

    blocks = [
        block for child in module.modules() if isinstance(child, torch.nn.ModuleList) for block in child
    ]
    for block in reversed(blocks):  # inner blocks before the blocks that hold them
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(module, reshard_after_forward=reshard_after_forward)
    return module


def dcp_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, Any]
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state, "ema": ema}


def dcp_save(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, Any], folder: Path
) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(dcp_state(model, optimizer, ema), checkpoint_id=str(folder))


def dcp_async_save(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, Any], folder: Path,
    cpu_group: Any = None,
) -> Future[Any]:  # fmt: skip
    """Returns once the state is staged in host memory; the future completes when it is written.
    ``cpu_group``: a gloo process group, which ``async_save`` needs when the default one is NCCL's."""
    import torch.distributed.checkpoint as dcp

    return dcp.async_save(
        dcp_state(model, optimizer, ema), checkpoint_id=str(folder), process_group=cpu_group
    )


def dcp_load(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, Any], folder: Path
) -> None:
    """In place, on any number of processes (DCP reshards as it reads)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = dcp_state(model, optimizer, ema)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
