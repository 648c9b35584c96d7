"""Every touch of DeepSpeed internals still holds on the installed DeepSpeed, each checked by name: an
upgrade that changes one fails here, naming it, instead of writing a wrong checkpoint."""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="DeepSpeed is installed on Linux only")


def touches() -> list:  # type: ignore[type-arg]
    from trainer.checkpoint.deepspeed_compat import TOUCHES

    return TOUCHES


@pytest.mark.parametrize("name", [t.name for t in touches()])
def test_each_deepspeed_touch_holds(name: str) -> None:
    touch = next(t for t in touches() if t.name == name)
    touch.check()  # AssertionError/ImportError naming what changed


def test_the_installed_deepspeed_is_within_the_tested_releases() -> None:
    from trainer.checkpoint.deepspeed_compat import TESTED, installed_version

    assert TESTED[0] <= installed_version() < TESTED[1]


def test_a_touch_that_no_longer_holds_is_named_when_training_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.checkpoint import deepspeed_compat

    def changed() -> None:
        raise AssertionError("DeepSpeedZeroOptimizer has no _lazy_init_hp_params_optimizer_state")

    broken = deepspeed_compat.Touch("zero12-link-fragments", "what it relies on", changed)
    monkeypatch.setattr(deepspeed_compat, "TOUCHES", [*deepspeed_compat.TOUCHES[:2], broken])
    deepspeed_compat.verify_touches.cache_clear()
    try:
        with pytest.raises(
            RuntimeError, match=r"zero12-link-fragments .*_lazy_init_hp_params_optimizer_state"
        ):
            deepspeed_compat.verify_touches()
    finally:
        deepspeed_compat.verify_touches.cache_clear()


def test_deepspeed_private_names_appear_in_the_compat_package_only() -> None:
    from tests.helpers import REPO

    private = ("checkpoint_engine", "_hp_optimizer_states_linked", "_lazy_init_hp_params_optimizer_state",
               "fp32_partitioned_groups_flat", "ds_tensor", "ds_shape", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")  # fmt: skip
    offenders = []
    for path in [*REPO.glob("trainer/**/*.py"), *REPO.glob("launch/*.py"), *REPO.glob("benchmarks/**/*.py")]:
        if path.parent.name == "deepspeed_compat":
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(REPO)}: {name}" for name in private if name in text]
    assert not offenders, offenders


def test_fp16_dynamic_loss_scale_survives_a_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 needs a GPU, so no launch here trains in it; DeepSpeed's own loss scalers stand in for its
    optimizer's: the state saved with a checkpoint (through JSON, as ``trainer_state.json`` holds it) and
    restored into fresh scalers continues the same scale schedule, overflows and hysteresis included."""
    import json
    from types import SimpleNamespace

    from deepspeed.runtime.fp16 import loss_scaler

    from trainer.checkpoint import deepspeed_compat as compat

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # its overflow messages ask for the rank

    def dynamic() -> loss_scaler.DynamicLossScaler:
        return loss_scaler.DynamicLossScaler(init_scale=2.0**16, scale_window=3, min_scale=1.0, delayed_shift=2,
                                             consecutive_hysteresis=False)  # fmt: skip

    overflows = [False, True, False, False, False, False, True, True, False, False, False, False, False]
    for make in (dynamic, lambda: loss_scaler.LossScaler(scale=128.0)):
        trained = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=make()), global_steps=7)
        for overflow in overflows[:8]:
            trained.optimizer.loss_scaler.update_scale(overflow)
        saved = json.loads(json.dumps(compat.engine_counters(trained)))
        resumed = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=make()), global_steps=0)
        compat.restore_engine_counters(resumed, saved)
        assert compat.engine_counters(resumed) == compat.engine_counters(trained)
        for overflow in overflows[8:]:
            for engine in (trained, resumed):
                engine.optimizer.loss_scaler.update_scale(overflow)
            assert resumed.optimizer.loss_scaler.cur_scale == trained.optimizer.loss_scaler.cur_scale
    assert saved["loss_scaler.cur_scale"] == 128.0  # the static scaler's
