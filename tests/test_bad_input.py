"""Bad input ends in one clear message and exit code 2, with no stack trace and nothing on disk changed.

Each test gives `scripts/train_base.py` (one process) one mistake and checks the promise of the contract:
`error: <what is wrong, how to fix it>` on stderr, exit code 2, no `Traceback`, and the checkpoint root
exactly as it was (no run folder created, no run touched or deleted). The resume cases share one real tiny
run (the session's `tiny_runs`), copied per test so a misbehaving test cannot spoil the others.

Real launches (`launch_tiny`: `python scripts/train_base.py` in a fresh interpreter) prove the contract end to
end: the good run, every case refused before torch is imported (a launch of those costs ~0.2 s, so they
stay real), and one resume refused after the Accelerator and the Trainer were built
(`resume_with_set_channels`). The other cases get past the torch import, which costs a
launch 10-20 s, so they call the same `trainer.cli.main` in this process (`train_tiny`, through
`tests.helpers.run_cli`): same arguments, environment, working directory and `sys.argv` as the launch, with
stdout and stderr captured. That checks the same things: the script is only `sys.exit(main(kind="base"))`,
so `main`'s return value is the exit code; an exception escaping `main` (which a launch would print as a
`Traceback`, exit code 1) fails the test with its traceback; and text that prints a traceback anyway is
still caught by `assert_refused`. The DeepSpeed-not-installed case calls `prepare_environment` directly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TinyRuns
from tests.helpers import (
    base_argv,
    child_env,
    launch_command,
    run_cli,
    train_base,
    without_permission_override,
)

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

Tree = dict[str, tuple[int, int] | None]
"""Relative path → (size, mtime_ns) for a file, None for a folder."""


def snapshot(root: Path) -> Tree:
    """Every path under ``root``: files with (size, mtime_ns), folders with None.

    Folder mtimes are left out on purpose: the run allocator's write probe (a file created and removed at
    once) changes the kind folder's mtime without leaving anything behind.
    """
    if not root.exists():
        return {}
    tree: Tree = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            tree[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
        else:
            tree[str(path.relative_to(root))] = None
    return tree


def assert_refused(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit code 2, one `error:` line naming every phrase, no Python stack trace."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, f"stack trace instead of a message:\n{output[-4000:]}"
    assert result.returncode == 2, f"exit code {result.returncode}, expected 2:\n{output[-4000:]}"
    assert "error:" in result.stderr, f"no 'error:' on stderr:\n{result.stderr[-4000:]}"
    assert result.stderr.count("error:") == 1, f"more than one message:\n{result.stderr[-4000:]}"
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in the message:\n{result.stderr[-4000:]}"


def assert_unchanged(root: Path, before: Tree) -> None:
    after = snapshot(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    modified = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert not (added or removed or modified), (
        f"disk changed under {root}: added {added}, removed {removed}, modified {modified}"
    )


def launch_tiny(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python scripts/train_base.py` with the tiny-run flags, never raising on a non-zero exit."""
    return train_base(root, *args, accelerate_config=None, check=False)


def train_tiny(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """What `launch_tiny` would return, from `trainer.cli.main` called in this process."""
    return run_cli("base", base_argv(root, *args))


# --------------------------------------------------------------------------------------------------
# The one real run the resume cases start from
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_runs_launched: TinyRuns) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """(checkpoint root holding completed base run 001, the launch's result): the session's `tiny_runs`.

    Its LoRA run 001 is under another kind folder; the base cases below never look at it.
    """
    root, results = tiny_runs_launched
    return root, results["base"]


@pytest.fixture
def run_copy(finished_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> Path:
    """A private copy of the checkpoint root holding run 001."""
    root = tmp_path / "ckpt"
    shutil.copytree(finished_run[0], root)
    return root


RUN_001 = Path("base_training") / "run_001"


def test_a_good_run_prints_no_error(finished_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, result = finished_run
    assert result.returncode == 0
    assert "error:" not in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert (root / RUN_001 / "checkpoints" / "last.ckpt").is_file()


# --------------------------------------------------------------------------------------------------
# New runs: data, model and config mistakes
# --------------------------------------------------------------------------------------------------


def test_missing_cifar_names_the_folder_and_suggests_digits_and_creates_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "no_datasets_here"
    empty.mkdir()
    before = snapshot(tmp_path)
    result = train_tiny(tmp_path / "ckpt", "--data", "cifar10", "--set", f"data.root={empty}")
    assert_refused(result, str(empty / "cifar-10-batches-py"), "--data digits")
    assert_unchanged(tmp_path, before)


@pytest.mark.parametrize(
    ("flag", "value", "choices"),
    [
        ("--data", "imagenet", ["cifar10", "cifar100", "digits"]),
        ("--model", "huge", ["diffit_cifar", "diffit_demo", "diffit_tiny"]),
    ],
)
@pytest.mark.distributed  # launches the script
def test_unknown_preset_name_lists_the_choices_and_creates_nothing(
    tmp_path: Path, flag: str, value: str, choices: list[str]
) -> None:
    result = launch_tiny(tmp_path / "ckpt", flag, value)
    assert_refused(result, f"'{value}'", "choose one of", *choices)
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("epochs: [3\nseed: 1\n", ["broken.yaml", "not valid YAML"]),
        ("epochz: 3\n", ["unknown config key 'epochz'", "did you mean 'epochs'"]),
    ],
    ids=["invalid-yaml", "unknown-key"],
)
@pytest.mark.distributed  # launches the script
def test_bad_config_file_names_the_file_or_key_and_creates_nothing(
    tmp_path: Path, text: str, phrases: list[str]
) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    before = snapshot(tmp_path)
    result = launch_tiny(tmp_path / "ckpt", "--config", str(config))
    assert_refused(result, *phrases)
    assert_unchanged(tmp_path, before)


@pytest.mark.parametrize(
    ("override", "phrases"),
    [
        ("checkpoint.keep_last=2", ["checkpoint.keep_last'", "checkpoint.keep_last_n"]),
        ("epochs=three", ["'epochs'", "must be an integer", "'three'"]),
    ],
    ids=["unknown-key", "wrong-type"],
)
@pytest.mark.distributed  # launches the script
def test_bad_override_names_the_key_and_creates_nothing(
    tmp_path: Path, override: str, phrases: list[str]
) -> None:
    result = launch_tiny(tmp_path / "ckpt", "--set", override)
    assert_refused(result, *phrases)
    assert snapshot(tmp_path) == {}


def test_batch_larger_than_the_dataset_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    result = train_tiny(tmp_path / "ckpt", "--batch-size", "100000")
    assert_refused(result, "batch size 100000 is larger than", "--batch-size")
    assert snapshot(tmp_path) == {}


def test_unwritable_checkpoint_root_names_the_folder_and_the_flag(tmp_path: Path) -> None:
    # Tests run as root, so chmod does not block writes; a regular file in the path does.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    before = snapshot(tmp_path)
    result = train_tiny(blocker / "ckpt")
    assert_refused(result, str(blocker / "ckpt" / "base_training"), "--checkpoint-root")
    assert_unchanged(tmp_path, before)


@pytest.mark.skipif(sys.platform != "linux", reason="reads permissions the Linux way (capabilities as root)")
def test_resuming_a_run_you_may_not_write_is_refused_in_one_line(run_copy: Path) -> None:
    """A run folder of someone else's, read-only to this user: one line saying so, nothing changed."""
    for path in (run_copy, *run_copy.rglob("*")):
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = snapshot(run_copy)
    try:
        result = subprocess.run(launch_command("train_base.py", base_argv(run_copy, "--resume", "1", "--epochs", "2")),
                                capture_output=True, text=True, timeout=300, env=child_env(), cwd=run_copy.parent,
                                preexec_fn=without_permission_override)  # fmt: skip
        assert_refused(result, "you may not write to", str(run_copy / RUN_001))
        assert_unchanged(run_copy, before)
    finally:
        for path in (run_copy, *run_copy.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)


# --------------------------------------------------------------------------------------------------
# Runs that exist (or not): --resume and --run-number
# --------------------------------------------------------------------------------------------------


def test_resume_of_a_missing_run_is_refused_and_touches_nothing(run_copy: Path) -> None:
    before = snapshot(run_copy)
    result = train_tiny(run_copy, "--resume", "7")
    assert_refused(result, "run 007 does not exist", "runs there: 001")
    assert_unchanged(run_copy, before)


def test_resume_with_a_different_model_preset_names_the_differing_keys(run_copy: Path) -> None:
    before = snapshot(run_copy)
    result = train_tiny(run_copy, "--resume", "1", "--model", "diffit_demo")
    assert_refused(result, "resuming run 001 would change model keys", "channels", "decide the shapes",
                   "another architecture is a new run")  # fmt: skip
    assert (
        "--set model.KEY=VALUE" not in result.stderr
    )  # it would only be refused again when the weights load
    assert_unchanged(run_copy, before)


def test_resume_with_another_label_dropout_suggests_setting_it_on_purpose(run_copy: Path) -> None:
    config = json.loads((run_copy / "base_training" / "run_001" / "config.json").read_text())
    preset = run_copy / "dropout.yaml"
    preset.write_text(json.dumps({**config["model"], "label_dropout": 0.2}))
    result = train_tiny(run_copy, "--resume", "1", "--model", str(preset))
    assert_refused(result, "would change model keys label_dropout, which its checkpoints were trained with",
                   "--set model.KEY=VALUE")  # fmt: skip


SetResume = tuple[Path, Tree, subprocess.CompletedProcess[str]]
"""(checkpoint root, its snapshot before the launch, the launch's result)."""


@pytest.fixture(scope="module")
def resume_with_set_channels(
    finished_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path_factory: pytest.TempPathFactory
) -> SetResume:
    """Resume run 001 with its channels changed on purpose through --set (one launch, two tests)."""
    root = tmp_path_factory.mktemp("set_channels") / "ckpt"
    shutil.copytree(finished_run[0], root)
    before = snapshot(root)
    # A real launch: refused only when the checkpoint is loaded, after the Accelerator and Trainer exist.
    result = launch_tiny(root, "--resume", "1", "--set", "model.channels=[32,64]")
    return root, before, result


def test_resume_with_a_model_key_set_on_purpose_passes_the_config_check(
    resume_with_set_channels: tuple[Path, Tree, subprocess.CompletedProcess[str]],
) -> None:
    _, _, result = resume_with_set_channels
    assert "would change model keys" not in result.stderr


def test_resume_with_a_model_key_set_on_purpose_fails_cleanly_if_weights_do_not_fit(
    resume_with_set_channels: tuple[Path, Tree, subprocess.CompletedProcess[str]],
) -> None:
    root, before, result = resume_with_set_channels
    if result.returncode == 0:
        return  # loading weights of another shape would need a conversion; succeeding is also acceptable
    assert_refused(result)
    assert_unchanged(root, before)


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (["--resume", "1", "--run-number", "2"], ["--resume 1 and --run-number 2 name different runs"]),
        (["--resume", "abc"], ["--resume takes a run number", "'abc'"]),
    ],
    ids=["conflicting-numbers", "not-a-number"],
)
def test_bad_resume_number_is_refused_and_touches_nothing(
    run_copy: Path, args: list[str], phrases: list[str]
) -> None:
    before = snapshot(run_copy)
    result = launch_tiny(run_copy, *args)
    assert_refused(result, *phrases)
    assert_unchanged(run_copy, before)


def test_new_run_with_the_number_of_an_existing_run_is_refused_and_suggests_resume(run_copy: Path) -> None:
    before = snapshot(run_copy)
    result = train_tiny(run_copy, "--run-number", "1")
    assert_refused(result, "run 001 already exists", "--resume")
    assert_unchanged(run_copy, before)


# --------------------------------------------------------------------------------------------------
# DeepSpeed requested but missing (no subprocess)
# --------------------------------------------------------------------------------------------------


def test_deepspeed_config_without_deepspeed_suggests_the_single_process_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from launch.accelerator import prepare_environment
    from launch.errors import LaunchError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    # prepare_environment setdefaults these; set them here so monkeypatch restores them afterwards.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    with pytest.raises(LaunchError, match=r"DeepSpeed is not installed") as info:
        prepare_environment()
    assert "configs/accelerate/single_process.yaml" in str(info.value)
