"""Every example in README.md and docs/*.md runs and gives what it shows.

- Each ```python block runs against real runs laid out as the docs say, then a check of the names it
  defines (`CHECKS`: a new example needs one here).
- Each command of a ```bash block, and each ``$ `` line of a ```console block, is run as `COMMANDS` says:
  the command itself, or with tiny settings appended where it trains; a command the table lacks fails
  `test_every_documented_command_has_an_entry`. The commands of one file run in order, on a copy of the
  session's tiny runs, so that a file reads as one session.
- Each output line a ```console block shows appears in what its command printed, numbers masked; ``...``
  stands for any text.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import REPO, copy_runs, run_cli, run_in_process, run_script

pytestmark = pytest.mark.distributed

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(language: str) -> list[tuple[Path, str]]:
    """(file, text) of every ```language block of the docs, in order."""
    return [(doc, text) for doc in DOCS for lang, text in BLOCK.findall(doc.read_text()) if lang == language]


LINK = re.compile(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)")


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors of the headings of ``doc``."""
    headings = re.findall(r"^#+ (.+)$", BLOCK.sub("", doc.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_links_in_the_docs_lead_somewhere(doc: Path) -> None:
    for target, anchor in LINK.findall(doc.read_text()):
        if target.startswith("http"):
            continue
        path = (doc.parent / target).resolve()
        assert path.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(path), (
                f"{doc.name} links to {target}#{anchor}, which has no such heading"
            )


# ---------------------------------------------------------------------------------------------------------
# Python examples
# ---------------------------------------------------------------------------------------------------------


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
    """A folder with ./checkpoints holding base run 001 and LoRA run 001 (digits 0-4), as the docs say."""
    return tiny_runs.parent


def check_for(code: str) -> Callable[[dict[str, Any]], None]:
    found = [check for marker, check in CHECKS.items() if marker in code]
    assert len(found) == 1, f"example without exactly one check in tests/test_readme.py:\n{code}"
    return found[0]


def test_every_python_example_has_a_check() -> None:
    examples = blocks("python")
    assert len(examples) >= 4
    for _, code in examples:
        check_for(code)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_example_runs_and_gives_what_it_shows(index: int, workdir: Path) -> None:
    doc, code = blocks("python")[index]
    names: dict[str, Any] = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        exec(compile(code, f"{doc.name} python example {index + 1}", "exec"), names)
        check_for(code)(names)
    finally:
        os.chdir(cwd)


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Run the command with ``extra`` appended; it must exit with ``exit``."""

    extra: tuple[str, ...] = ()
    exit: int = 0


@dataclass(frozen=True)
class Skip:
    """Not run here, for ``reason``."""

    reason: str


FAST = ("--set", "edm.num_steps=4", "--set", "logging.samples_per_class=1", "--max-steps-per-epoch", "2")
"""Appended to a LoRA run that starts: a 4-step sampler for its grids, 2 steps per epoch."""
TINY = ("--model", "diffit_tiny", *FAST)
"""Appended to a base run that starts: the tiny model too (the model of the runs the commands find)."""
NO_GPU = "needs GPUs (the CPU twin, configs/accelerate/cpu_zero2.yaml, is run)"

COMMANDS: dict[str, Run | Skip] = {
    # README.md
    "make install && source .venv/bin/activate": Skip("installs into .venv, which the tests run from"),
    "make demo": Skip("~10 min of 2-process training; no test runs it, `make bench-quality` runs its base training"),
    "python scripts/train_base.py --epochs 2 --max-steps-per-epoch 3": Run(TINY),
    "python scripts/runs.py hand-off 1": Run(),
    "python scripts/train_lora.py --data digits_0_4 --epochs 2 --max-steps-per-epoch 3": Run(FAST),
    "python scripts/train_base.py --list-runs": Run(),
    "python scripts/train_lora.py --list-runs": Run(),
    # docs/runs-and-checkpoints.md
    "python scripts/train_base.py --resume 1 --epochs 3 --max-steps-per-epoch 3": Run(),
    "python scripts/train_base.py --fork 1 --from 2 --learning-rate 0.001": Run(),
    "python scripts/train_base.py --resume 1 --from 2 --learning-rate 0.001": Run(),
    "python scripts/runs.py show 1": Run(),
    "python scripts/runs.py diff 1 2": Run(),
    "python scripts/train_base.py --list-runs --sort best --filter status=completed --plot runs.png": Run(),
    "python scripts/train_base.py --init-from checkpoints/base_training/run_001 --epochs 1 "
    "--max-steps-per-epoch 3": Run(TINY),
    # docs/lora.md
    "python scripts/train_lora.py --base-checkpoint checkpoints/base_training/run_001 --data digits_0_4 "
    "--epochs 2 --max-steps-per-epoch 3": Run(FAST),
    "python scripts/train_lora.py --resume 1 --epochs 3": Run(),
    "python scripts/export.py checkpoints/lora_finetuning/run_001 --out digits_merged.ckpt": Run(),
    "python scripts/export.py checkpoints/lora_finetuning/run_001 --adapter --out digits_adapter.safetensors":
    Run(),
    # docs/api.md
    "python scripts/sample.py checkpoints/base_training/run_001 --classes 0,3 --n 8 --steps 8 --out grid.png":
    Run(),
    "python scripts/export.py checkpoints/base_training/run_001 --which 1 --out model.safetensors": Run(),
    "python scripts/export.py checkpoints/base_training/run_001 --which last --dtype bf16 --out model_bf16.ckpt":
    Run(),
    # docs/clusters.md
    "accelerate launch --config_file configs/accelerate/cpu_zero2.yaml scripts/train_base.py --epochs 1 "
    "--max-steps-per-epoch 3": Run(TINY),
    "accelerate launch --config_file configs/accelerate/multi_gpu_zero3.yaml scripts/train_base.py "
    "--model diffit_cifar --data cifar10 --epochs 200 --batch-size 512": Skip(NO_GPU),
    "python scripts/train_base.py --auto-resume --run-key sweep-a --epochs 1 --max-steps-per-epoch 3": Run(TINY),
    "accelerate launch --config_file configs/accelerate/multi_gpu_zero2.yaml scripts/train_base.py "
    "--model diffit_cifar --data cifar10 --epochs 200 --auto-resume": Skip(NO_GPU),
    "sbatch --nodes=4 --gpus-per-node=8 --time=24:00:00 launch/slurm_train.sh --model diffit_cifar "
    "--data cifar10 --epochs 200 --batch-size 512": Skip(
        "needs a SLURM cluster with GPUs; tests/test_slurm.py runs launch/slurm_train.sh under a private SLURM"
    ),
    # docs/evaluation.md
    "accelerate launch --config_file configs/accelerate/multi_gpu_zero2.yaml --num_processes 8 "
    "scripts/train_base.py --config configs/training/diffit_cifar10_paper.yaml": Skip(
        "needs 8 GPUs and CIFAR-10; make gpu-check trains the preset for one short epoch, test_gpu_check its dry run"
    ),
    "python scripts/evaluate.py checkpoints/base_training/run_001 --num-samples 200 --features standin": Run(),
    # docs/troubleshooting.md
    "python scripts/train_base.py --resume 9": Run(exit=2),
    "python scripts/train_base.py --data cifar10": Run(exit=2),
}  # fmt: skip
"""Every command the docs show (whitespace collapsed) → how this test runs it."""


@dataclass
class Command:
    doc: Path
    line: str
    shown: list[str]  # the output lines a ```console block shows under it


def _joined(lines: list[str]) -> list[str]:
    """Lines with their ``\\`` continuations joined."""
    out: list[str] = []
    for line in lines:
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1].rstrip() + " " + line.strip()
        else:
            out.append(line)
    return out


def commands_of(doc: Path) -> list[Command]:
    """The commands ```bash and ```console blocks of ``doc`` show, in order."""
    found: list[Command] = []
    for lang, text in BLOCK.findall(doc.read_text()):
        if lang == "bash":
            for line in _joined(text.splitlines()):
                line = re.sub(r"(^|\s+)#\s.*$", "", line).strip()
                if line:
                    found.append(Command(doc, " ".join(line.split()), []))
        elif lang == "console":
            for line in _joined(text.splitlines()):
                if line.startswith("$ "):
                    found.append(Command(doc, " ".join(line[2:].split()), []))
                else:
                    assert found and found[-1].doc == doc, f"{doc.name}: output before any command:\n{line}"
                    found[-1].shown.append(line)
    return found


def all_commands() -> list[Command]:
    return [command for doc in DOCS for command in commands_of(doc)]


def test_every_documented_command_has_an_entry() -> None:
    commands = {c.line for c in all_commands()}
    missing = sorted(commands - set(COMMANDS))
    assert not missing, (
        "commands in the docs without an entry in COMMANDS (tests/test_readme.py):\n" + "\n".join(missing)
    )
    stale = sorted(set(COMMANDS) - commands)
    assert not stale, "entries in COMMANDS that no doc shows any more:\n" + "\n".join(stale)
    skipped = [line for line, entry in COMMANDS.items() if isinstance(entry, Skip)]
    assert len(skipped) <= 6, f"keep the commands that are not run few: {skipped}"


def _printed(text: str) -> list[str]:
    """What a terminal shows of ``text``: progress-bar redraws dropped, text written after a bar kept."""
    lines = []
    for line in text.split("\n"):
        for part in line.split("\r"):
            bar = re.search(r"\d+%\|.*?\](.*)$", part)
            part = bar.group(1) if bar else part
            if part.strip():
                lines.append(part)
    return lines


def _masked(line: str) -> str:
    return " ".join(re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", line).split())


def _shows(printed: list[str], shown: str) -> bool:
    """Whether a printed line holds ``shown``, numbers masked and ``...`` standing for any text."""
    pattern = ".*".join(re.escape(_masked(piece)) for piece in shown.split("..."))
    return any(re.search(pattern, _masked(line)) for line in printed)


def run_command(line: str, extra: tuple[str, ...], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``line`` + ``extra`` run in ``cwd`` (`python scripts/X.py` in this process, `accelerate launch` as one)."""
    argv = [*shlex.split(line), *extra]
    if argv[0] == "python" and argv[1].startswith("scripts/"):
        script, args = Path(argv[1]).name, argv[2:]
        if script in ("train_base.py", "train_lora.py"):
            return run_cli(script.removeprefix("train_").removesuffix(".py"), args, cwd=cwd)
        return run_in_process(script, args, cwd=cwd)
    if argv[:3] == ["accelerate", "launch", "--config_file"]:
        config = Path(argv[3]).stem
        at = next(i for i, a in enumerate(argv) if a.startswith("scripts/"))
        return run_script(Path(argv[at]).name, argv[at + 1 :], accelerate_config=config, launch_args=argv[4:at],
                          check=False, cwd=cwd)  # fmt: skip
    raise AssertionError(f"no way to run {line!r}: give it a Skip entry with the reason")


DOCS_WITH_COMMANDS = [
    doc for doc in DOCS if any(isinstance(COMMANDS.get(c.line), Run) for c in commands_of(doc))
]


@pytest.mark.parametrize("doc", DOCS_WITH_COMMANDS, ids=lambda doc: doc.name)
def test_commands_run_and_print_what_the_docs_show(doc: Path, tiny_runs: Path, tmp_path: Path) -> None:
    """The file's commands in order on a copy of the tiny runs: each exits as its entry says, and prints
    every line its ```console block shows."""
    copy_runs(tiny_runs, tmp_path / "checkpoints")
    for command in commands_of(doc):
        entry = COMMANDS[command.line]
        if isinstance(entry, Skip):
            continue
        result = run_command(command.line, entry.extra, tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == entry.exit, (
            f"{doc.name}: `{command.line}` exited {result.returncode}, not {entry.exit}:\n{output[-4000:]}"
        )
        printed = _printed(output)
        for shown in command.shown:
            if shown.strip() != "...":
                assert _shows(printed, shown), (
                    f"{doc.name}: `{command.line}` did not print\n{shown}\nIt printed:\n" + "\n".join(printed)
                )
