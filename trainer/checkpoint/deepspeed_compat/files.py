"""DeepSpeed's files and checkpoint engines: what an earlier version's checkpoint needs to load (its shard
files' classes and keys, ``load_checkpoint`` reading weights-only), and the checkpoint writers the benchmarks
time. Each reliance is a touch (``TOUCHES``), checked by ``verify_touches`` in the package's ``__init__``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def _source(obj: Any) -> str:
    return inspect.getsource(obj)


def _check_engine_file_hooks() -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert list(inspect.signature(TorchCheckpointEngine.load).parameters)[1:3] == ["path", "map_location"]
    for method in (DeepSpeedEngine._load_checkpoint, DeepSpeedEngine._load_zero_checkpoint):
        assert "torch.load(" not in _source(method), f"{method.__name__} reads another way"


def _check_safe_globals() -> None:
    shard_safe_globals()  # every class still importable where it was


def _check_checkpoint_writers() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    text = _source(DeepSpeedEngine._configure_checkpointing)
    assert "self.checkpoint_engine = create_checkpoint_engine(" in text
    assert "self.checkpoint_engine.is_data_parallel_writer(rank)" in text
    assert "self.save_non_zero_checkpoint = True" in text


def _check_zero_shard_keys() -> None:
    from deepspeed.checkpoint import constants

    for name in ("OPTIMIZER_STATE_DICT", "SINGLE_PARTITION_OF_FP32_GROUPS", "FP32_FLAT_GROUPS", "ZERO_STAGE",
                 "BASE_OPTIMIZER_STATE", "PARAM_SHAPES", "FROZEN_PARAM_SHAPES", "FROZEN_PARAM_FRAGMENTS",
                 "BUFFER_NAMES", "PARTITION_COUNT"):  # fmt: skip
        assert hasattr(constants, name), name
    assert SHARD_KEYS["optimizer"] == constants.OPTIMIZER_STATE_DICT
    assert SHARD_KEYS["fp32_zero12"] == constants.SINGLE_PARTITION_OF_FP32_GROUPS
    assert SHARD_KEYS["fp32_zero3"] == constants.FP32_FLAT_GROUPS
    assert SHARD_KEYS["base_optimizer"] == constants.BASE_OPTIMIZER_STATE
    assert SHARD_KEYS["param_shapes"] == constants.PARAM_SHAPES


TOUCHES: list[tuple[str, str, Callable[[], None]]] = [
    ("engine-file-hooks", "checkpoint_engine.load(path, map_location) reads every file of load_checkpoint",
     _check_engine_file_hooks),
    ("shard-safe-globals", "the classes DeepSpeed pickles into shards keep their module paths", _check_safe_globals),
    ("zero-shard-keys", "the shard files' keys (deepspeed.checkpoint.constants)", _check_zero_shard_keys),
    ("checkpoint-writers", "DeepSpeedEngine._configure_checkpointing sets checkpoint_engine and "
     "save_non_zero_checkpoint", _check_checkpoint_writers),
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# engine-file-hooks, shard-safe-globals, zero-shard-keys
# --------------------------------------------------------------------------------------------------


def shard_safe_globals() -> list[Any]:
    """DeepSpeed's plain-data classes found in its checkpoints (enum, loss scaler, fragment address)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_shard(path: Path) -> dict[str, Any]:
    """One DeepSpeed shard, memory-mapped and weights-only."""
    with torch.serialization.safe_globals(shard_safe_globals()):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


@contextmanager
def engine_file_hooks(engine: Any) -> Iterator[None]:
    """For one ``load_checkpoint`` of ``engine`` (a checkpoint of an earlier version): each file DeepSpeed
    reads is loaded weights-only, with its plain-data classes allowed."""
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.load

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(shard_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load
    try:
        yield
    finally:
        checkpoint_engine.load = original


SHARD_KEYS = {
    "optimizer": "optimizer_state_dict",
    "stage": "zero_stage",
    "fp32_zero12": "single_partition_of_fp32_groups",
    "fp32_zero3": "fp32_flat_groups",
    "base_optimizer": "base_optimizer_state",
    "zero3_optimizer": "optimizer_state_dict",
    "paddings": "param_alignment_paddings",
    "param_shapes": "param_shapes",
    "frozen_shapes": "frozen_param_shapes",
    "frozen_fragments": "frozen_param_fragments",
    "buffer_names": "buffer_names",
    "shared_params": "shared_params",
    "module": "module",
}
"""The keys of DeepSpeed's shard files that ``sharding/zero_merge.py`` reads."""


# --------------------------------------------------------------------------------------------------
# checkpoint-writers
# --------------------------------------------------------------------------------------------------


def writer_for(engine: Any, checkpoint: dict[str, Any]) -> Any:
    """The checkpoint engine ``engine`` would have with ``checkpoint`` as its config's ``"checkpoint"``
    section, built as ``_configure_checkpointing`` builds it."""
    import copy

    from deepspeed.runtime.checkpoint_engine.utils import create_checkpoint_engine
    from deepspeed.runtime.model_checkpointing.config import get_checkpoint_config
    from deepspeed.utils import groups

    config = copy.copy(engine._config)
    config.checkpoint_config = get_checkpoint_config({"checkpoint": checkpoint})
    return create_checkpoint_engine(config_params=config, groups=groups, zero_stage=engine.zero_optimization_stage(),
                                    has_moe_layers=engine.has_moe_layers,
                                    optimize_dp_state=not engine.zero_optimization_partition_weights())  # fmt: skip


@contextmanager
def saving_through(engine: Any, checkpoint_engine: Any) -> Iterator[None]:
    """``engine`` saving through ``checkpoint_engine`` (``writer_for``) within the block, the ranks
    that write replicated state chosen as ``_configure_checkpointing`` chooses them; its own after."""
    from deepspeed.utils import groups

    saved = engine.checkpoint_engine, engine.save_non_zero_checkpoint
    rank = groups._get_sequence_data_parallel_rank()
    engine.checkpoint_engine = checkpoint_engine
    engine.save_non_zero_checkpoint = checkpoint_engine.is_data_parallel_writer(rank) or saved[1]
    try:
        yield
    finally:
        engine.checkpoint_engine, engine.save_non_zero_checkpoint = saved
