"""launch/: the distributed set-up that needs no launch to test."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from launch.accelerator import SHM_PREFIX, remove_stale_shm_segments


def test_stale_deepspeed_shm_segments_are_removed_and_those_in_use_kept(tmp_path: Path) -> None:
    """A SIGKILLed run leaves its all-reduce segment; a later launch on the same port would map it."""
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    uid = os.getuid()
    stale = shm / f"{SHM_PREFIX}{uid}_127.0.0.1_29500_1"
    open_fd = shm / f"{SHM_PREFIX}{uid}_127.0.0.1_29500_0"
    mapped = shm / f"{SHM_PREFIX}{uid}_127.0.0.1_29600_0"
    other_user = shm / f"{SHM_PREFIX}{uid + 1}_127.0.0.1_29500_1"
    unrelated = shm / "something_else"
    for f in (stale, open_fd, mapped, other_user, unrelated):
        f.write_bytes(b"x")
    (proc / "100" / "fd").mkdir(parents=True)
    (proc / "100" / "fd" / "3").symlink_to(open_fd)
    (proc / "100" / "maps").write_text("")
    (proc / "200" / "fd").mkdir(parents=True)
    (proc / "200" / "maps").write_text(f"7f00-7f01 rw-s 00000000 00:1a 42  {mapped}\n")
    (proc / "self").mkdir()  # not a pid

    assert remove_stale_shm_segments(shm, proc) == [stale]
    assert sorted(p.name for p in shm.iterdir()) == sorted(
        p.name for p in (open_fd, mapped, other_user, unrelated)
    )


def test_the_launch_says_what_it_is_in_one_line() -> None:
    import torch

    from launch.world import Topology

    cpu = Topology(0, 2, 0, 2, torch.device("cpu"), precision="bf16", backend="gloo")
    assert cpu.describe(16) == (
        "Launch: 2 processes on 1 machine, cpu (gloo), DeepSpeed ZeRO-2, bf16; "
        "batch 16 per process x 1 micro-batch per step x 2 processes = 32"
    )
    cluster = Topology(
        3, 16, 3, 3, torch.device("cuda"), precision="bf16", machines=2, backend="nccl", offload="cpu"
    )
    assert cluster.describe(8, 4).startswith(
        "Launch: 16 processes on 2 machines, cuda (nccl), DeepSpeed ZeRO-3 offloading to cpu, bf16; "
        "batch 8 per process x 4 micro-batches per step x 16 processes = 512"
    )
    assert cluster.record(8, 4)["global_batch"] == 512 and cluster.record(8, 4)["offload"] == "cpu"
    laptop = Topology(0, 1, 0, None, torch.device("cpu"))
    assert laptop.describe(32).startswith("Launch: 1 process on 1 machine, cpu, no DeepSpeed, fp32;")


# --------------------------------------------------------------------------------------------------
# Gradient accumulation and clipping: the run's settings against the launch config's
# --------------------------------------------------------------------------------------------------


def _asks(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    from launch.accelerator import launch_asks

    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                 "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return launch_asks()


def test_the_launch_configs_accumulation_and_clipping_are_read_where_accelerate_puts_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from launch.accelerator import LaunchAsks

    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true"}
    assert _asks(monkeypatch, {}) == LaunchAsks()
    # the accelerate config's deepspeed_config section (or `accelerate launch --gradient_accumulation_steps`)
    yaml_asks = _asks(monkeypatch, {**deepspeed, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
                                    "ACCELERATE_GRADIENT_CLIPPING": "0.5"})  # fmt: skip
    assert (yaml_asks.accumulation, yaml_asks.clipping) == (4, 0.5)
    assert _asks(monkeypatch, {**deepspeed, "ACCELERATE_GRADIENT_CLIPPING": "auto"}).clipping is None
    # a DeepSpeed JSON: its values, "auto" and absent ones as not given
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_accumulation_steps": 8, "gradient_clipping": "auto"}))
    json_asks = _asks(monkeypatch, {**deepspeed, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)})
    assert (json_asks.accumulation, json_asks.clipping, json_asks.source) == (
        8,
        None,
        f"the DeepSpeed config {ds}",
    )
    ds.write_text(json.dumps({"gradient_clipping": 2}))
    assert _asks(monkeypatch, {**deepspeed, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}).accumulation is None
    # without DeepSpeed only the accumulation means anything to Accelerate
    plain = _asks(
        monkeypatch, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2", "ACCELERATE_GRADIENT_CLIPPING": "1"}
    )
    assert (plain.accumulation, plain.clipping) == (2, None)


@pytest.mark.parametrize("value", ["0", "2.5", "four", "-1"])
def test_a_launch_config_accumulation_that_is_no_count_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from launch.errors import LaunchError

    with pytest.raises(LaunchError, match=r'sets gradient_accumulation_steps to .*: give a number or "auto"'):
        _asks(
            monkeypatch, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": value}
        )


def test_the_global_batch_is_cut_into_processes_and_micro_batches() -> None:
    from launch.accelerator import LaunchAsks
    from trainer.config.plan import StepPlan, plan_steps
    from trainer.config.schema import DistributedConfig, TrainConfig
    from trainer.errors import UserError

    config = TrainConfig(batch_size=32)
    assert plan_steps(config, 100, 2) == StepPlan(micro_batch=16, accumulation=1, steps_per_epoch=3)
    assert plan_steps(config, 100, 2, LaunchAsks(accumulation=4)) == StepPlan(4, 4, 3)
    own = TrainConfig(batch_size=32, distributed=DistributedConfig(gradient_accumulation_steps=2))
    assert plan_steps(own, 100, 1) == StepPlan(16, 2, 3)
    assert plan_steps(own, 100, 4, LaunchAsks(accumulation=2)) == StepPlan(4, 2, 3)  # both, the same value
    with pytest.raises(
        UserError, match=r"gradient accumulation is 2 in this run's config .* but 4 in the acc"
    ):
        plan_steps(own, 100, 1, LaunchAsks(accumulation=4))
    with pytest.raises(UserError, match=r"not divisible by the 2 processes of this launch x 3 accumulated "
                                        r"micro-batches; choose a multiple of 6"):  # fmt: skip
        plan_steps(config, 100, 2, LaunchAsks(accumulation=3))


def test_the_launch_configs_clipping_must_be_the_runs() -> None:
    from launch.accelerator import LaunchAsks
    from trainer.config.plan import check_clipping
    from trainer.config.schema import TrainConfig
    from trainer.errors import UserError

    check_clipping(TrainConfig(grad_clip=0.5), LaunchAsks(clipping=0.5))
    check_clipping(TrainConfig(grad_clip=0.5), LaunchAsks())
    with pytest.raises(UserError, match=r"the DeepSpeed config ds.json clips gradients at 2 but this run's "
                                        r"grad_clip is 1: pass --set grad_clip=2, or set gradient_clipping"):  # fmt: skip
        check_clipping(
            TrainConfig(grad_clip=1.0), LaunchAsks(clipping=2.0, source="the DeepSpeed config ds.json")
        )


def test_deepspeed_gets_the_runs_batch_accumulation_and_clipping() -> None:
    from types import SimpleNamespace

    from launch.accelerator import configure_deepspeed

    plugin = SimpleNamespace(
        deepspeed_config={"gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    )
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2,
                                  gradient_accumulation_steps=1)  # fmt: skip
    configure_deepspeed(accelerator, micro_batch=4, accumulation=4, grad_clip=0.5)
    assert (
        accelerator.gradient_accumulation_steps == 4
    )  # Accelerate's own count: it scales the loss without DS
    assert {k: v for k, v in plugin.deepspeed_config.items() if k != "steps_per_print"} == {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4, "train_batch_size": 32,
        "gradient_clipping": 0.5,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------
# A launch not shaped as its config evidently asked
# --------------------------------------------------------------------------------------------------


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_more_processes_than_cores_without_a_gpu_is_refused() -> None:
    from launch.accelerator import refuse_unexpected_shape
    from launch.errors import LaunchError

    many = {"LOCAL_WORLD_SIZE": str(_cores() + 1), "WORLD_SIZE": str(_cores() + 1)}
    with pytest.raises(
        LaunchError, match=rf"starts {_cores() + 1} processes on a machine with {_cores()} CPU cores"
    ):
        refuse_unexpected_shape(_cores() + 1, cuda=False, env=many)
    refuse_unexpected_shape(_cores() + 1, cuda=True, env=many)  # GPUs: one process each
    refuse_unexpected_shape(_cores(), cuda=False, env={"LOCAL_WORLD_SIZE": str(_cores())})
    # several machines: what counts is this machine's share
    refuse_unexpected_shape(2 * _cores(), cuda=False, env={"LOCAL_WORLD_SIZE": str(_cores())})


def _launcher(proc: Path, cwd: Path, *argv: str) -> Path:
    """A fake /proc in which this process's parent is ``argv``, run from ``cwd``."""
    parent = proc / str(os.getppid())
    parent.mkdir(parents=True)
    (parent / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    (parent / "cwd").symlink_to(cwd)
    return proc


def test_one_process_where_accelerate_launch_was_asked_for_several_is_refused(tmp_path: Path) -> None:
    from launch.accelerator import refuse_unexpected_shape
    from launch.errors import LaunchError

    (tmp_path / "multi_cpu.yaml").write_text("use_cpu: true\ndistributed_type: MULTI_CPU\nnum_processes: 2\n")
    (tmp_path / "one.yaml").write_text("use_cpu: true\nnum_processes: 1\n")
    simple = {"ACCELERATE_USE_CPU": "True"}  # what Accelerate's one-process launcher exports; no WORLD_SIZE
    launch = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]
    cases = {
        "flag": (["--config_file", "one.yaml", "--num_processes", "2"], 2),
        "flag=": (["--num_processes=3"], 3),
        "config": (["--config_file", "multi_cpu.yaml"], 2),
        "one": (["--config_file", "one.yaml"], None),
        "default config": ([], None),
    }
    for name, (flags, asked) in cases.items():
        proc = _launcher(tmp_path / name / "proc", tmp_path, *launch, *flags, "scripts/train_base.py")
        if asked is None:
            refuse_unexpected_shape(1, cuda=False, env=simple, proc=proc)
            continue
        with pytest.raises(
            LaunchError, match=rf"asked for {asked} processes but started 1: its config sets use_cpu"
        ):
            refuse_unexpected_shape(1, cuda=False, env=simple, proc=proc)
    # `python scripts/train_base.py`, or a parent that is no accelerate launch: nothing was asked
    refuse_unexpected_shape(1, cuda=False, env={}, proc=proc)
    other = _launcher(tmp_path / "bash" / "proc", tmp_path, "/bin/bash", "run.sh", "--num_processes", "2")
    refuse_unexpected_shape(1, cuda=False, env=simple, proc=other)


def test_deepspeed_starts_without_its_per_rank_lines_and_says_once_when_it_compiles(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from launch.accelerator import SHM_OP, _deepspeed_quiet

    if torch.cuda.is_available():
        pytest.skip("the op is DeepSpeed's CPU op")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for local_rank, built in (("0", False), ("1", False), ("0", True)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        if built:
            (tmp_path / SHM_OP).mkdir(exist_ok=True)
            (tmp_path / SHM_OP / f"{SHM_OP}.so").touch()
        with _deepspeed_quiet():
            print(f"DeepSpeed deepspeed.ops.comm.{SHM_OP}_op built successfully")
            print("anything else")
        said = capsys.readouterr().out.splitlines()
        compiling = ["Compiling DeepSpeed's shared-memory op for the CPU (once per machine, about a minute)"]
        assert said == (compiling if local_rank == "0" and not built else []) + ["anything else"]


# -- Ctrl-C during a start-up's imports ------------------------------------------------------------------


def test_ctrl_c_inside_held_imports_is_raised_once_they_are_done() -> None:
    import signal

    from trainer.errors import interrupts_held

    done = []
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("the block ran on")
    assert done == ["the block ran on"]
    with pytest.raises(KeyboardInterrupt), interrupts_held():  # the block's own failure: the interrupt wins
        os.kill(os.getpid(), signal.SIGINT)
        raise RecursionError("a module left half-imported")
    with interrupts_held():  # no Ctrl-C: nothing raised, and SIGINT's handler is the one before
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
