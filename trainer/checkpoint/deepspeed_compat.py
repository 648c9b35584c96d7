"""Every place the checkpoint code relies on DeepSpeed internals, in one module, each one checked.

DeepSpeed's public API (``save_checkpoint``/``load_checkpoint``, ``deepspeed.utils.safe_get_full_*``) does
not cover what crash-safe background saves and world-size changes need, so a few internals are used. Each is
a ``Touch`` below: what it relies on and a ``check`` that fails when a DeepSpeed release changes it. The
checks run before the first checkpoint of a DeepSpeed run (``verify_touches``: a RuntimeError naming the
touch, instead of a wrong checkpoint) and in the unit tests (``tests/test_deepspeed_compat.py``).
pyproject pins the DeepSpeed releases this was tested with (``TESTED``); outside them a warning says so.

The touches:
  engine-file-hooks      ``engine.checkpoint_engine.save``/``.load`` are replaced for one call of
                         ``save_checkpoint``/``load_checkpoint``: every file DeepSpeed would write is handed
                         to the save's own writer (snapshot now, write in the background, hash, commit), and
                         every file it reads is read with ``weights_only=True``.
  shard-safe-globals     the plain-data classes DeepSpeed pickles into its shards (loss scalers, the ZeRO
                         stage enum, fragment addresses), allowed for weights-only loads.
  zero12-link-fragments  ``_hp_optimizer_states_linked``/``_lazy_init_hp_params_optimizer_state`` of the
                         ZeRO-1/2 optimizer: after a resume creates Adam's state early, its fragments are
                         linked to the parameters so ``safe_set_full_optimizer_state`` can write into it.
  zero-flat-partitions   ``engine.optimizer.optimizer`` (the torch optimizer inside ZeRO) and ZeRO-3's
                         ``fp32_partitioned_groups_flat``: the flat fp32 partitions whose Adam state a
                         resume creates, and whose per-group ``step`` it sets.
  zero3-param-slices     ZeRO-3 parameters' ``ds_tensor`` (this rank's slice) and ``ds_shape`` (the full
                         shape): where the EMA's slice and a scattered state go.
  zero12-fragments       ZeRO-1/2 (and DeepSpeed's bf16 optimizer) parameters' ``_hp_mapping``: where this
                         rank's fragment of a parameter starts in it (``lp_fragment_address``), its fp32
                         values (``hp_fragment``) and Adam state (``get_hp_fragment(key)``), all views of the
                         rank's flat partitions: what a checkpoint writes and reads of each parameter.
  zero3-checkpoint-events  ZeRO-3's ``checkpoint_event_prologue``/``epilogue``, which ``load_checkpoint`` calls
                         around a load: parameters partitioned before, the persistent ones gathered again after.
  zero3-swap             ZeRO-3's ``swap_optimizer`` (NVMe offload): only without it are the tensors that
                         ``safe_get_local_*`` return views that stay valid (else copies are taken).
  engine-counters        the engine's ``global_steps``, ``global_samples``, ``skipped_steps`` and its
                         optimizer's loss scaler, which ``load_checkpoint`` restores from its own files.
  zero-shard-keys        the keys of DeepSpeed's shard files read by ``sharding/zero_merge.py`` (the same
                         ones its own ``zero_to_fp32.py`` reads).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

TESTED = ((0, 19), (0, 20))
"""DeepSpeed releases this module was tested with: from the first (inclusive) to the second (exclusive)."""


@dataclass(frozen=True)
class Touch:
    name: str
    relies_on: str
    check: Callable[[], None]
    """Raises AssertionError when the installed DeepSpeed no longer has what the touch relies on."""


def _source(obj: Any) -> str:
    return inspect.getsource(obj)


def _check_engine_file_hooks() -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert list(inspect.signature(TorchCheckpointEngine.save).parameters)[1:3] == ["state_dict", "path"]
    assert list(inspect.signature(TorchCheckpointEngine.load).parameters)[1:3] == ["path", "map_location"]
    for method in (DeepSpeedEngine._save_checkpoint, DeepSpeedEngine._save_zero_checkpoint):
        assert "self.checkpoint_engine.save(" in _source(method), f"{method.__name__} writes another way"
    for method in (DeepSpeedEngine._load_checkpoint, DeepSpeedEngine._load_zero_checkpoint):
        assert "torch.load(" not in _source(method), f"{method.__name__} reads another way"


def _check_safe_globals() -> None:
    shard_safe_globals()  # every class still importable where it was


def _check_zero12_link_fragments() -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert hasattr(DeepSpeedZeroOptimizer, "_lazy_init_hp_params_optimizer_state")
    assert "self._hp_optimizer_states_linked" in _source(
        DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state
    )


def _check_zero_flat_partitions() -> None:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert "self.optimizer = init_optimizer" in _source(DeepSpeedZeroOptimizer.__init__)
    assert "self.optimizer = init_optimizer" in _source(DeepSpeedZeroOptimizer_Stage3.__init__)
    assert "self.fp32_partitioned_groups_flat" in _source(DeepSpeedZeroOptimizer_Stage3)


def _check_zero3_param_slices() -> None:
    from deepspeed.runtime.zero import partition_parameters

    text = _source(partition_parameters)
    assert "param.ds_tensor = " in text and "param.ds_shape = " in text


def _check_zero12_fragments() -> None:
    from deepspeed.utils import fragment_address, mixed_precision_linkage, tensor_fragment

    assert {"lp_fragment_address", "hp_fragment"} <= set(tensor_fragment.__dataclass_fields__)
    assert set(fragment_address.__dataclass_fields__) == {"numel", "start"}
    assert "def get_hp_fragment(self, optim_state_key=None)" in _source(tensor_fragment)
    assert "lp_param._hp_mapping = " in _source(mixed_precision_linkage)


def _check_zero3_checkpoint_events() -> None:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert callable(DeepSpeedZeroOptimizer_Stage3.checkpoint_event_prologue)
    assert "persistent_parameters" in _source(DeepSpeedZeroOptimizer_Stage3.checkpoint_event_epilogue)


def _check_zero3_swap() -> None:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert "self.swap_optimizer = " in _source(DeepSpeedZeroOptimizer_Stage3.__init__)
    assert "if not self.swap_optimizer:" in _source(
        DeepSpeedZeroOptimizer_Stage3._swappable_optimizer_subgroup
    )


def _check_engine_counters() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    text = _source(DeepSpeedEngine._load_checkpoint)
    for counter in ENGINE_COUNTERS:
        assert f"self.{counter} = " in text, f"load_checkpoint no longer restores {counter}"


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


TOUCHES = [
    Touch("engine-file-hooks", "checkpoint_engine.save(state_dict, path) / .load(path, map_location) carry "
          "every file of save_checkpoint / load_checkpoint", _check_engine_file_hooks),
    Touch("shard-safe-globals", "the classes DeepSpeed pickles into shards keep their module paths",
          _check_safe_globals),
    Touch("zero12-link-fragments", "DeepSpeedZeroOptimizer._hp_optimizer_states_linked and "
          "_lazy_init_hp_params_optimizer_state()", _check_zero12_link_fragments),
    Touch("zero-flat-partitions", "ZeRO optimizers keep the torch optimizer as .optimizer, ZeRO-3 its flat "
          "fp32 partitions as .fp32_partitioned_groups_flat", _check_zero_flat_partitions),
    Touch("zero3-param-slices", "ZeRO-3 parameters carry .ds_tensor and .ds_shape", _check_zero3_param_slices),
    Touch("zero-shard-keys", "the shard files' keys (deepspeed.checkpoint.constants)", _check_zero_shard_keys),
    Touch("zero12-fragments", "ZeRO-1/2 parameters' _hp_mapping (lp_fragment_address, hp_fragment, "
          "get_hp_fragment(key))", _check_zero12_fragments),
    Touch("zero3-checkpoint-events", "DeepSpeedZeroOptimizer_Stage3.checkpoint_event_prologue/epilogue",
          _check_zero3_checkpoint_events),
    Touch("zero3-swap", "DeepSpeedZeroOptimizer_Stage3.swap_optimizer", _check_zero3_swap),
    Touch("engine-counters", "the engine's global_steps, global_samples, skipped_steps", _check_engine_counters),
]  # fmt: skip


def installed_version() -> tuple[int, ...]:
    import deepspeed

    return tuple(int(part) for part in deepspeed.__version__.split("+")[0].split(".")[:2] if part.isdigit())


@cache
def verify_touches() -> None:
    """Check every touch against the installed DeepSpeed (once per process: a success is cached). Raises
    RuntimeError naming the touches that no longer hold; warns when the release is outside the tested
    range."""
    version = installed_version()
    if not TESTED[0] <= version < TESTED[1]:
        warnings.warn(
            f"DeepSpeed {'.'.join(map(str, version))} is outside the releases the checkpoint code was tested "
            f"with ({'.'.join(map(str, TESTED[0]))} to before {'.'.join(map(str, TESTED[1]))})",
            stacklevel=2,
        )
    broken = []
    for touch in TOUCHES:
        try:
            touch.check()
        except (AssertionError, ImportError, AttributeError, TypeError, OSError) as e:
            broken.append(f"{touch.name} ({touch.relies_on}): {e or type(e).__name__}")
    if broken:
        raise RuntimeError(
            "the installed DeepSpeed changed what the checkpoint code relies on: "
            + "; ".join(broken)
            + ". Install a DeepSpeed release within the tested range (pyproject.toml)"
        )


# --------------------------------------------------------------------------------------------------
# engine-file-hooks, shard-safe-globals
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
def engine_file_hooks(engine: Any, *, save: Callable[[Any, str], None] | None = None) -> Iterator[None]:
    """For one ``save_checkpoint`` or ``load_checkpoint`` of ``engine``: each file DeepSpeed writes goes to
    ``save(state_dict, path)`` instead of the disk (its collective sequence is untouched), and each file it
    reads is loaded weights-only, with its plain-data classes allowed."""
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.save, checkpoint_engine.load

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(shard_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    if save is not None:
        checkpoint_engine.save = save
    checkpoint_engine.load = load
    try:
        yield
    finally:
        checkpoint_engine.save, checkpoint_engine.load = original


# --------------------------------------------------------------------------------------------------
# zero12-link-fragments, zero-flat-partitions, zero3-param-slices
# --------------------------------------------------------------------------------------------------


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO optimizer (holds Adam's per-group step counters)."""
    return engine.optimizer.optimizer


def create_adam_state(engine: Any) -> None:
    """Create Adam's state before the first step, so that a resume can write into it.

    torch's AdamW creates its state lazily at the first step, and DeepSpeed links the parameters'
    optimizer-state fragments only to state that exists; a fresh engine has neither. The zeros made here
    are overwritten by the checkpoint's values right after.
    """
    zero_optimizer = engine.optimizer
    base = zero_optimizer.optimizer
    # ZeRO-3 hands its flat fp32 partitions to the torch optimizer only during a step.
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or [
        flat for group in base.param_groups for flat in group["params"]
    ]
    for flat in flats:
        if not base.state.get(flat):
            base.state[flat] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the fragments
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def set_optimizer_step(engine: Any, step: float) -> None:
    """Adam's step count of every group, and the engine's own counter, as ``load_checkpoint`` sets them."""
    for state in base_optimizer(engine).state.values():
        state["step"] = torch.tensor(step, dtype=torch.float32)
    engine.global_steps = int(step)


def optimizer_step(engine: Any) -> float:
    """Adam's step count (one value per group under DeepSpeed; the largest)."""
    return max((float(s["step"]) for s in base_optimizer(engine).state.values() if "step" in s), default=0.0)


def zero12_fragment(param: Any) -> tuple[int, torch.Tensor] | None:
    """ZeRO-1/2: (first element, fp32 values) of the fragment of ``param`` in this rank's flat partition (a
    view of it), or None when the partition holds none of ``param``."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return int(mapping.lp_fragment_address.start), mapping.hp_fragment


def zero12_moment(param: Any, key: str) -> torch.Tensor | None:
    """ZeRO-1/2: this rank's fragment of Adam's ``key`` for ``param`` (a view of the flat state), or None
    before the optimizer has state (``create_adam_state`` makes it)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None or not mapping.optim_fragment or key not in mapping.optim_fragment:
        return None
    return mapping.get_hp_fragment(key)


def has_zero12_fragments(param: Any) -> bool:
    """Whether ``param`` is a ZeRO-1/2 (or bf16 optimizer) parameter, whatever this rank holds of it."""
    return hasattr(param, "_hp_mapping")


@contextmanager
def zero3_checkpoint_events(engine: Any) -> Iterator[None]:
    """Around a load of ZeRO-3 partitions (collective): every parameter partitioned before, the persistent
    ones (gathered whole on every rank) gathered again from their new partitions after, as
    ``load_checkpoint`` does."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "checkpoint_event_prologue"):
        optimizer.checkpoint_event_prologue()
    yield
    if hasattr(optimizer, "checkpoint_event_epilogue"):
        optimizer.checkpoint_event_epilogue()


def zero3_views_stay(engine: Any) -> bool:
    """Whether the tensors ZeRO-3's ``safe_get_local_*`` return are views of its partitions that stay valid
    (not with the optimizer swapped to NVMe, whose buffers are given back after each call)."""
    return not getattr(engine.optimizer, "swap_optimizer", False)


ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
_LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def engine_counters(engine: Any) -> dict[str, float]:
    """The engine's step counters and its loss scaler's state (fp16's dynamic scale), plain numbers."""
    counters = {name: float(getattr(engine, name)) for name in ENGINE_COUNTERS if hasattr(engine, name)}
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for name in _LOSS_SCALER_FIELDS:
        if scaler is not None and isinstance(getattr(scaler, name, None), int | float):
            counters[f"loss_scaler.{name}"] = float(getattr(scaler, name))
    return counters


def restore_engine_counters(engine: Any, counters: dict[str, float]) -> None:
    for name, value in counters.items():
        if name in ENGINE_COUNTERS:
            setattr(engine, name, int(value))
        elif name.startswith("loss_scaler."):
            scaler = getattr(engine.optimizer, "loss_scaler", None)
            field = name.removeprefix("loss_scaler.")
            if scaler is not None and field in _LOSS_SCALER_FIELDS and hasattr(scaler, field):
                current = getattr(scaler, field)
                setattr(scaler, field, type(current)(value) if isinstance(current, int | float) else value)


def zero3_slice(param: Any) -> torch.Tensor | None:
    """This rank's slice of a ZeRO-3 parameter, or None when ``param`` is not partitioned."""
    return getattr(param, "ds_tensor", None)


def full_shape(param: Any) -> torch.Size:
    """The shape of a parameter, also when ZeRO-3 has replaced it by a placeholder of shape [0]."""
    return getattr(param, "ds_shape", param.shape)


# --------------------------------------------------------------------------------------------------
# zero-shard-keys
# --------------------------------------------------------------------------------------------------

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
