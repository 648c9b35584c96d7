"""The shape the code keeps: modules of at most 400 lines and functions of at most 60, the rooms' import
contracts (pyproject.toml, ``lint-imports``) kept and able to fail, each folder layout spelled in one module,
and no ``**kwargs`` unpacked by string."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("trainer", "launch", "data", "model", "scripts", "benchmarks")
LAYOUT_NAMES = {
    Path("trainer/runs/layout.py"): ('"lora_weights"', '"base_model"', '"base_model.ckpt"'),
    Path("trainer/checkpoint/folder.py"): ('"manifests"',),
}
"""The names of a folder layout, each spelled only in the module that owns it: a run's, a checkpoint folder's."""


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


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages under ``root`` with the contracts in its pyproject.toml."""
    command = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_rooms_keep_their_import_contracts() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:]


def test_an_import_against_the_rooms_breaks_the_contracts(tmp_path: Path) -> None:
    """The checkpoint engine importing the run folders (the dependency the rooms exist to keep out) fails."""
    for package in ("trainer", "launch", "model", "data", "benchmarks"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    engine = tmp_path / "trainer" / "checkpoint" / "manifest.py"
    engine.write_text(
        engine.read_text() + "\nfrom trainer.runs.layout import RunLayout  # noqa: E402, F401\n"
    )
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout[-4000:]
    assert "trainer.checkpoint is not allowed to import trainer.runs" in result.stdout
    assert "trainer.checkpoint.manifest -> trainer.runs.layout" in result.stdout


def test_each_folder_layout_is_spelled_in_one_module() -> None:
    offenders = []
    for path in sources():
        text = path.read_text()
        for owner, names in LAYOUT_NAMES.items():
            if path != REPO / owner:
                offenders += [f"{path.relative_to(REPO)}: {name}" for name in names if name in text]
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


REPO_PATH = re.compile(
    r"(?<![\w/.<-])((?:launch|scripts|configs|trainer|benchmarks|docs|tests|model|data)/[\w./-]*\w\.(?:py|sh|yaml|json|md|png))"
)


def test_every_file_the_docs_and_configs_name_exists() -> None:
    """A path of this repository named in README, docs/ or a config's comments (``launch/accelerator.py``)
    leads to a file: a renamed module must not leave advice pointing at nothing."""
    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "configs").rglob("*.yaml")]
    missing = [
        f"{text.relative_to(REPO)} names {name}"
        for text in texts
        for name in REPO_PATH.findall(text.read_text())
        if not (REPO / name).exists()
        and not Path(name).stem.isupper()  # configs/model/NAME.yaml: a placeholder
    ]
    assert not missing, missing
