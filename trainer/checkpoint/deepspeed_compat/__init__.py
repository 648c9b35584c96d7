"""Every place the checkpoint code relies on DeepSpeed internals, in this package, each one checked.

DeepSpeed's public API (``save_checkpoint``/``load_checkpoint``, ``deepspeed.utils.safe_get_full_*``) does
not cover what crash-safe background saves and world-size changes need, so a few internals are used. Each is
a ``Touch`` below: what it relies on and a ``check`` that fails when a DeepSpeed release changes it. The
checks run before the first checkpoint of a DeepSpeed run (``verify_touches``: a RuntimeError naming the
touch, instead of a wrong checkpoint) and in the unit tests (``tests/test_deepspeed_compat.py``).
pyproject pins the DeepSpeed releases this was tested with (``TESTED``); outside them a warning says so.

The touches (``files.py``: DeepSpeed's files and checkpoint engines; ``state.py``: its optimizer state and
partitions):
  engine-file-hooks      ``engine.checkpoint_engine.load`` is replaced for one ``load_checkpoint`` (of a
                         checkpoint of an earlier version): every file it reads is read weights-only.
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
  checkpoint-writers     ``engine.checkpoint_engine`` and ``save_non_zero_checkpoint`` as
                         ``_configure_checkpointing`` sets them from the config's ``checkpoint.writer``: the
                         benchmarks time DeepSpeed's fast writer beside its default one on the same engine.
  zero-shard-keys        the keys of DeepSpeed's shard files read by ``sharding/zero_merge.py`` (the same
                         ones its own ``zero_to_fp32.py`` reads).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from trainer.checkpoint.deepspeed_compat import files, state
from trainer.checkpoint.deepspeed_compat.files import (
    SHARD_KEYS,
    engine_file_hooks,
    load_shard,
    saving_through,
    shard_safe_globals,
    writer_for,
)
from trainer.checkpoint.deepspeed_compat.state import (
    ENGINE_COUNTERS,
    base_optimizer,
    create_adam_state,
    engine_counters,
    full_shape,
    has_zero12_fragments,
    optimizer_step,
    restore_engine_counters,
    set_optimizer_step,
    zero3_checkpoint_events,
    zero3_slice,
    zero3_views_stay,
    zero12_fragment,
    zero12_moment,
)

__all__ = [
    "ENGINE_COUNTERS",
    "SHARD_KEYS",
    "TESTED",
    "TOUCHES",
    "Touch",
    "base_optimizer",
    "create_adam_state",
    "engine_counters",
    "engine_file_hooks",
    "full_shape",
    "has_zero12_fragments",
    "installed_version",
    "load_shard",
    "optimizer_step",
    "restore_engine_counters",
    "saving_through",
    "set_optimizer_step",
    "shard_safe_globals",
    "verify_touches",
    "writer_for",
    "zero3_checkpoint_events",
    "zero3_slice",
    "zero3_views_stay",
    "zero12_fragment",
    "zero12_moment",
]  # fmt: skip

TESTED = ((0, 19), (0, 20))
"""DeepSpeed releases this package was tested with: from the first (inclusive) to the second (exclusive)."""


@dataclass(frozen=True)
class Touch:
    name: str
    relies_on: str
    check: Callable[[], None]
    """Raises AssertionError when the installed DeepSpeed no longer has what the touch relies on."""


TOUCHES = [Touch(*touch) for touch in (*files.TOUCHES, *state.TOUCHES)]


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
