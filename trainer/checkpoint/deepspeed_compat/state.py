"""DeepSpeed's optimizer state and partitions: where each rank's fragment or slice of a parameter is, its fp32
values and Adam state, how a resume creates that state and sets the counters ``load_checkpoint`` would. Each
reliance is a touch (``TOUCHES``), checked by ``verify_touches`` in the package's ``__init__``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _source(obj: Any) -> str:
    return inspect.getsource(obj)


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


TOUCHES: list[tuple[str, str, Callable[[], None]]] = [
    ("zero12-link-fragments", "DeepSpeedZeroOptimizer._hp_optimizer_states_linked and "
     "_lazy_init_hp_params_optimizer_state()", _check_zero12_link_fragments),
    ("zero-flat-partitions", "ZeRO optimizers keep the torch optimizer as .optimizer, ZeRO-3 its flat fp32 "
     "partitions as .fp32_partitioned_groups_flat", _check_zero_flat_partitions),
    ("zero3-param-slices", "ZeRO-3 parameters carry .ds_tensor and .ds_shape", _check_zero3_param_slices),
    ("zero12-fragments", "ZeRO-1/2 parameters' _hp_mapping (lp_fragment_address, hp_fragment, get_hp_fragment(key))",
     _check_zero12_fragments),
    ("zero3-checkpoint-events", "DeepSpeedZeroOptimizer_Stage3.checkpoint_event_prologue/epilogue",
     _check_zero3_checkpoint_events),
    ("zero3-swap", "DeepSpeedZeroOptimizer_Stage3.swap_optimizer", _check_zero3_swap),
    ("engine-counters", "the engine's global_steps, global_samples, skipped_steps", _check_engine_counters),
]  # fmt: skip


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
