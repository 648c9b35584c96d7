"""Every ```python example in README.md runs, against real runs laid out as the README says."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.distributed

BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def readme_examples() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text())


@pytest.fixture(scope="module")
def workdir(tiny_runs: Path) -> Path:
    """A folder with ./checkpoints holding base run 001 and LoRA run 001 (digits 0-4), as in the README."""
    return tiny_runs.parent


def test_readme_has_python_examples() -> None:
    assert len(readme_examples()) >= 3


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_python_example_runs(index: int, workdir: Path) -> None:
    code = readme_examples()[index]
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        exec(compile(code, f"README.md example {index + 1}", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
