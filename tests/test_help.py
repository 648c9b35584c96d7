"""``--help`` of every script says what it does and what each flag is; nothing offered is then refused."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from tests.helpers import REPO
from trainer.cli import build_parser
from trainer.training.kinds import run_kind


def script_parser(name: str) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"scripts.{name}", REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()  # type: ignore[no-any-return]


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Flags and arguments with no help text, in ``parser`` and its subcommands."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                missing += undocumented(sub)
        elif action.help is None and not isinstance(action, argparse._HelpAction):
            missing.append(action.option_strings[0] if action.option_strings else action.dest)
    return missing


@pytest.mark.parametrize("kind", ["base", "lora"])
def test_training_scripts_describe_themselves_and_every_flag(kind: str) -> None:
    parser = build_parser(run_kind(kind))
    text = parser.format_help()
    assert (
        "Fine-tune a trained DiffiT base with LoRA" if kind == "lora" else "Train a DiffiT base model"
    ) in text
    assert "default: checkpoints" in text
    offered = {
        option
        for action in parser._actions
        for option in action.option_strings
        if action.help != argparse.SUPPRESS
    }
    assert ("--model" in offered) == (kind == "base")  # a LoRA run's model is its base's: not offered
    if kind == "lora":
        assert "must be on disk" in text and "digits_0_4 is bundled" in text
    assert undocumented(parser) == []


@pytest.mark.parametrize("script", ["runs", "sample", "export"])
def test_every_argument_of_the_helper_scripts_has_help(script: str) -> None:
    assert undocumented(script_parser(script)) == []
