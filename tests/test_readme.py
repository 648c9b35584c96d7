"""Every ```python example in README.md runs against real runs laid out as the README says, and gives what
it shows: each example has a check of the names it defines (a new example needs one here)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.distributed

BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def readme_examples() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text())


def _denoises(model: torch.nn.Module, classes: int) -> None:
    x, sigma, labels = torch.randn(2, 1, 16, 16), torch.full((2,), 0.5), torch.tensor([0, classes - 1])
    with torch.no_grad():
        out = model(x, sigma, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()


def _base_api(names: dict[str, Any]) -> None:
    from model import DiffiT

    assert isinstance(names["model"], DiffiT) and not names["model"].training
    _denoises(names["model"], 10)
    assert [r.number for r in names["runs"]] == [1] and names["runs"][0].status == "completed"


def _plain_torch(names: dict[str, Any]) -> None:
    model, ckpt = names["model"], names["ckpt"]
    assert ckpt["kind"] == "base" and set(model.state_dict()) == set(ckpt["state_dict"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["state_dict"].items())
    _denoises(model.eval(), 10)


def _lora(names: dict[str, Any]) -> None:
    from peft import PeftModel

    from trainer import load_model

    model = names["model"]
    assert isinstance(model, PeftModel)
    ours = load_model("checkpoints/lora_finetuning/run_001")
    x, sigma, labels = torch.randn(2, 1, 16, 16), torch.full((2,), 0.5), torch.tensor([0, 4])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, sigma, labels), ours(x, sigma, labels))


def _lora_by_hand(names: dict[str, Any]) -> None:
    _lora(names)  # the same model as load_model's, which holds the run's best EMA adapters
    from trainer.training.factory import load_trainable

    broken = {**names["lora_ckpt"]["ema_state_dict"], "not.a.parameter": torch.zeros(1)}
    with pytest.raises(Exception, match="no parameter"):
        load_trainable(names["model"], broken)


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    'runs = list_runs("checkpoints")': _base_api,
    'model.load_state_dict(ckpt["state_dict"], strict=True)': _plain_torch,
    "PeftModel.from_pretrained": _lora,
    'load_trainable(model, lora_ckpt["ema_state_dict"])': _lora_by_hand,
}
"""A line that tells the example apart → what its names must hold afterwards."""


@pytest.fixture(scope="module")
def workdir(tiny_runs: Path) -> Path:
    """A folder with ./checkpoints holding base run 001 and LoRA run 001 (digits 0-4), as in the README."""
    return tiny_runs.parent


def check_for(code: str) -> Callable[[dict[str, Any]], None]:
    found = [check for marker, check in CHECKS.items() if marker in code]
    assert len(found) == 1, f"README example without exactly one check in tests/test_readme.py:\n{code}"
    return found[0]


def test_every_readme_example_has_a_check() -> None:
    examples = readme_examples()
    assert len(examples) >= 3
    for code in examples:
        check_for(code)


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_python_example_runs_and_gives_what_it_shows(index: int, workdir: Path) -> None:
    code = readme_examples()[index]
    names: dict[str, Any] = {"__name__": "__readme__"}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        exec(compile(code, f"README.md example {index + 1}", "exec"), names)
        check_for(code)(names)
    finally:
        os.chdir(cwd)
