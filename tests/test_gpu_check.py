"""`make gpu-check` (scripts/gpu_check.py): its dry run on the CPU passes every check, and its table and exit
code say when a promise fails."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO, child_env

pytestmark = pytest.mark.distributed

SCRIPT = REPO / "scripts" / "gpu_check.py"


@functools.cache
def gpu_check() -> ModuleType:
    """The script as a module (scripts/ is no package), registered so that its dataclasses resolve."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of the markdown table's rows (after its header and rule)."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines and lines[0] == "| check | value | target | result |", stdout[-3000:]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]


def test_the_dry_run_on_the_cpu_passes_every_check(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--workdir", str(work)], env=child_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)  # fmt: skip
    output = f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
    assert result.returncode == 0, output
    assert f"Work folder: {work}" in result.stdout
    rows = table_rows(result.stdout)
    assert [r[0] for r in rows] == list(gpu_check().CHECKS), output
    assert all(r[3] == "PASS" for r in rows), output
    values = {r[0]: r[1] for r in rows}
    assert values[gpu_check().MFU].startswith("n/a (CPU")
    assert "bit-identical (" in values[gpu_check().RESUME]


def test_a_failed_row_fails_the_table_and_the_exit_code() -> None:
    m = gpu_check()
    rows = [
        m.Row(m.THROUGHPUT, "1 img/s", m.NO_TARGET, True),
        m.Row(m.RESUME, "3 tensors differ", "bit", False),
    ]
    assert m.exit_code(rows[:1]) == 0
    assert m.exit_code(rows) == 1
    assert m.exit_code([]) == 1
    assert table_rows(m.table(rows))[1] == [m.RESUME, "3 tensors differ", "bit", "FAIL"]


def test_the_peak_of_known_gpus_and_the_override() -> None:
    m = gpu_check()
    assert m.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert m.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert m.peak_flops("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert m.peak_flops("NVIDIA A10", None) == 125e12
    assert m.peak_flops("NVIDIA A10G", None) is None
    assert m.peak_flops("NVIDIA H100 NVL", None) is None
    assert m.peak_flops("NVIDIA H100 NVL", 835) == 835e12
