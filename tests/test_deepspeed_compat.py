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
