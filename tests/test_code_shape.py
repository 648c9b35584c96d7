"""The shape the code keeps: modules of at most 400 lines and functions of at most 60, ``launch/`` importing
nothing from ``trainer``, the run layout spelled in one module, and no ``**kwargs`` unpacked by string."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("trainer", "launch", "data", "model", "scripts", "benchmarks")
LAYOUT_NAMES = ('"lora_weights"', '"base_model"', '"base_model.ckpt"', '"manifests"')


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_no_module_over_400_lines_and_no_function_over_60() -> None:
    too_long = []
    for path in sources():
        text = path.read_text()
        if text.count("\n") > 400:
            too_long.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    too_long.append(f"{path.relative_to(REPO)}: {node.name}() has {length} lines")
    assert not too_long, too_long


def test_launch_imports_nothing_from_trainer() -> None:
    offenders = []
    for path in (REPO / "launch").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            offenders += [f"{path.name}: {m}" for m in modules if m.split(".")[0] == "trainer"]
    assert not offenders, offenders


def test_the_run_layout_is_spelled_in_one_module() -> None:
    offenders = []
    for path in sources():
        if path == REPO / "trainer" / "runs" / "layout.py":
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(REPO)}: {name}" for name in LAYOUT_NAMES if name in text]
    assert not offenders, offenders


def test_no_keyword_arguments_are_unpacked_by_string() -> None:
    """``def f(**kwargs)`` whose body reads ``kwargs["name"]``: the state threaded that way is invisible to mypy."""
    offenders = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.args.kwarg is None:
                continue
            name = node.args.kwarg.arg
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.Subscript)
                    and isinstance(sub.value, ast.Name)
                    and sub.value.id == name
                ):
                    offenders.append(f"{path.relative_to(REPO)}: {node.name}() reads {name}[...]")
    assert not offenders, offenders
