"""The benchmarks' launched sides, on a tiny model: every peer's save and load (``benchmarks/peers.py``,
driven by ``benchmarks/peer_timings.py``) under ZeRO-2 and ZeRO-3 on 2 processes and resharded to 1, and
the scaling script's saves, so that no path of `make bench` rots unseen. A peer whose load does not restore
the saved weights and EMA exactly fails its launch."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.fake_data import write_fake_cifar
from benchmarks.figures import peers, scale
from benchmarks.launching import PEER_TIMINGS, SCALE_TIMINGS, command, launch
from benchmarks.settings import Setup

pytestmark = pytest.mark.distributed
TINY = ["--model", "diffit_tiny", "--reps", "1"]
PEERS = [*TINY, "--no-fast-writer"]  # its async_io op builds for minutes (the benchmark's first launch pays)


@pytest.mark.parametrize(("stage", "config"), Setup().zero_configs().items())
def test_every_peer_saves_and_restores_the_state_and_reshards_to_one_process(
    tmp_path: Path, stage: str, config: str
) -> None:
    data, work = write_fake_cifar(tmp_path / "data", train_images=8), tmp_path / "work"
    args = [str(data), str(work), *PEERS, "--batch-size", "2"]
    launch(command(PEER_TIMINGS, ["save", *args], config, 2), tmp_path / "save.log")
    launch(command(PEER_TIMINGS, ["resume", *args], config, 1), tmp_path / "resume.log")
    records = {phase: json.loads((work / f"{phase}.json").read_text()) for phase in ("save", "resume")}

    times = records["save"]["times"]
    sides = {"ours", "accelerate", "deepspeed", "dcp"}
    assert set(times["save"]) == set(times["load"]) == sides and set(times["blocked"]) == {"ours", "dcp"}
    assert set(records["resume"]["times"]["reshard"]) == {"ours", "deepspeed", "dcp"}
    every = [s for kind in (*times.values(), records["resume"]["times"]["reshard"]) for s in kind.values()]
    assert all(len(s) == 2 and min(s) > 0 for s in every)  # the warm-up and one repetition
    written = records["save"]["bytes"]
    assert all(written[name] > 0 for name in sides)
    # Every peer writes the whole state (Accelerate's EMA gathered where ZeRO-3 partitions it): the trainer
    # writes each tensor once, no more than the fewest of them.
    assert written["ours"] <= 1.02 * min(written[name] for name in sides - {"ours"})
    assert [len(loads) for loads in records["save"]["load_memory"]] == [2, 2]  # each rank, each repetition
    assert records["resume"]["from_world_size"] == 2 and records["resume"]["world_size"] == 1

    m = SimpleNamespace(peer_timings=lambda *_: records)
    figures = peers.measure_config(m, stage, config)  # type: ignore[arg-type]
    where = f"2 proc {stage}, {records['save']['parameters'] / 1e6:.0f}M"
    assert [f.name.split(" (")[0] for f in figures] == [
        f"durable save, {where}", f"bytes per durable save, {where}", f"blocked per save, {where}",
        f"load for resume, {where}", f"load peak memory, {where}", f"resume 2 -> 1 proc {stage}, 0M",
    ]  # fmt: skip
    assert all(f.value is not None and f.value > 0 for f in figures)


def test_the_trainer_the_engine_peers_and_dcp_time_in_launches_of_their_own_when_the_state_is_large(
    tmp_path: Path,
) -> None:
    from benchmarks.measurements import merge_records

    data, work = write_fake_cifar(tmp_path / "data", train_images=8), tmp_path / "work"
    args = [str(data), str(work), *PEERS, "--batch-size", "2"]
    records: dict[str, dict] = {}
    for phase, sides, processes, reps in (
        ("save", "trainer", 2, 1),
        ("save", "engine_peers", 2, 1),
        ("save", "twin", 2, 1),
        ("resume", "engine", 1, 0),
    ):
        argv = [phase, *args, "--sides", sides, "--reps", str(reps)]
        launch(command(PEER_TIMINGS, argv, "cpu_zero3", processes), tmp_path / f"{phase}_{sides}.log")
        merge_records(records.setdefault(phase, {}), json.loads((work / f"{phase}_{sides}.json").read_text()))

    times = records["save"]["times"]
    assert set(times["save"]) == set(times["load"]) == {"ours", "accelerate", "deepspeed", "dcp"}
    assert set(times["blocked"]) == {"ours", "dcp"}
    assert {k: len(v) for k, v in records["resume"]["times"]["reshard"].items()} == {
        "ours": 1,
        "deepspeed": 1,
    }
    assert records["save"]["parameters"] > 0
    m = SimpleNamespace(peer_timings=lambda *_: records)
    figures = peers.measure_config(m, "ZeRO-3", "cpu_zero3", 4)  # type: ignore[arg-type]
    assert len(figures) == 6 and all(f.value is not None and f.value > 0 for f in figures)


def test_the_scaling_script_measures_saves_and_memory_on_two_processes_and_writes_in_turns_in_one(
    tmp_path: Path,
) -> None:
    data, work = write_fake_cifar(tmp_path / "data", train_images=8), tmp_path / "work"
    launch(command(SCALE_TIMINGS, [str(data), str(work), *TINY], "cpu_zero2", 2), tmp_path / "scale.log")
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob("scale_rank*.json"))]
    record = {"ranks": ranks}

    assert len(ranks) == 2 and all(
        r["staged_bytes"] > 0 and r["rss_saving"] >= r["rss_training"] for r in ranks
    )
    assert len(ranks[0]["times"]["write"]["seconds"]) == len(ranks[0]["times"]["plain"]["seconds"]) == 1
    rows = scale.per_size(SimpleNamespace(scale_run=lambda *_: record), "cpu_zero2")  # type: ignore[arg-type]
    names = [f.name for f in scale.figures_of("2 proc ZeRO-2", rows)]
    assert len(names) == 3 and all(r["snapshot"] > 0 and r["efficiency"] > 0 for r in rows)
    assert "| parameters |" in scale.table("2 proc ZeRO-2", rows)

    turns = tmp_path / "turns"  # the write figure's launch: saves and plain files in turns, nothing else
    launch(
        command(SCALE_TIMINGS, [str(data), str(turns), *TINY, "--write-only"], None, None), tmp_path / "w.log"
    )
    times = json.loads((turns / "scale_rank0.json").read_text())["times"]
    assert (
        set(times) == {"write", "plain"}
        and len(times["write"]["seconds"]) == len(times["plain"]["seconds"]) == 2
    )
