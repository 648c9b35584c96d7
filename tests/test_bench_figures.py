"""What `make bench`'s figures compute from their launches' records, on made-up timings."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.figures import lora_step, overhead, peers, save_interval, scale, zero_overhead
from benchmarks.harness import BenchError
from benchmarks.measurements import Interleaved
from benchmarks.settings import Setup


def run(stamps: list[float], steps_per_epoch: int = 5, blocked: float = 0.04) -> Any:
    """A trainer run as ``benchmarks/runs.py`` reads it: its epoch lines' times, saves and history."""
    history = [{"global_step": steps_per_epoch * (i + 1)} for i in range(len(stamps))]
    saves = [SimpleNamespace(blocked_seconds=blocked, nbytes=370e6)] * 3
    return SimpleNamespace(epoch_stamps=stamps, saves=saves, history=history)


def test_save_interval_is_the_cost_over_the_hand_loop_after_the_first_epoch() -> None:
    def timed(
        cost: float,
    ) -> Any:  # epoch 1 (the warm-up) takes 50 s; the timed epochs' median is 10 s x (1 + cost)
        return run([0.0, 50.0, 50.0 + 9 * (1 + cost), 50.0 + 20 * (1 + cost)])

    runs = {n: timed(c) for n, c in ((1, 0.10), (2, 0.03), (5, 0.05), (10, 0.01))}
    m = SimpleNamespace(setup=Setup(full=True), save_intervals=([10.0, 9.0, 11.0], runs))
    every_step, every_two = save_interval.measure(m)  # type: ignore[arg-type]
    assert every_step.name == "saving every step (trainer / hand loop - 1)"
    assert every_step.value == pytest.approx(0.10) and every_step.passed is False  # target 7%
    assert every_two.value == pytest.approx(0.03) and every_two.passed  # target 3.5%
    assert "the curve: every 1: +10.0%, every 2: +3.0%, every 5: +5.0%, every 10: +1.0%" in every_two.detail
    assert Setup().save_intervals == (1, 2) and Setup(full=True).save_intervals == (1, 2, 5, 10)


def test_lora_step_times_the_epochs_between_the_first_and_the_last_in_each_configuration() -> None:
    lora = run([0.0, 30.0, 36.0, 43.0, 51.0, 90.0])  # epoch 1 warms up, epoch 6 ends in a save
    base = run([0.0, 30.0, 39.0, 49.0, 60.0, 99.0])
    zero3 = run([0.0, 30.0, 39.0, 48.0, 57.0, 99.0])
    launches = {None: (lora, base), "cpu_zero2": (lora, lora), "cpu_zero3": (zero3, base)}
    m = SimpleNamespace(setup=Setup(), lora_and_base_steps=lambda config=None: launches[config])

    figures = lora_step.measure(m)  # type: ignore[arg-type]

    assert [f.name for f in figures] == [
        "LoRA step / base step (same model, batch)",
        "LoRA step / base step, 2 processes ZeRO-2 (same model, batch)",
        "LoRA step / base step, 2 processes ZeRO-3 (same model, batch)",
    ]
    assert [f.value for f in figures] == pytest.approx([0.7, 1.0, 0.9])
    assert [f.passed for f in figures] == [True, False, False]
    assert "one process (python)" in figures[0].detail and "cpu_zero3, 2 processes" in figures[2].detail
    launches["cpu_zero2"] = (lora, run(base.epoch_stamps, 6))
    with pytest.raises(BenchError, match="differ in steps"):
        lora_step.measure(m)  # type: ignore[arg-type]


def test_zero_overhead_is_the_hand_loops_epoch_over_the_trainers_after_its_first_for_each_config() -> None:
    def sides(config: str, trainer_epochs: tuple[float, ...]) -> Interleaved:
        # the trainer's epoch 1 (with its start-up) ends at 40 s; the epochs after it are timed
        stamps = [40.0 + sum(trainer_epochs[:i]) for i in range(len(trainer_epochs) + 1)]
        setup = replace(
            Setup(steps=10), accelerate_config=config, num_processes=2, rounds=1, epochs=len(stamps)
        )
        return Interleaved([9.0, 10.0, 11.0, 10.0], [run(stamps)], setup)

    launches = {
        "cpu_zero2": sides("cpu_zero2", (10.5, 10.0, 10.2)),
        "cpu_zero3": sides("cpu_zero3", (12.5, 11.0, 13.0)),
    }
    m = SimpleNamespace(setup=Setup(), zero_overhead=launches.__getitem__)
    zero2, zero3 = zero_overhead.measure(m)  # type: ignore[arg-type]
    assert Setup().zero_configs() == {"ZeRO-2": "cpu_zero2", "ZeRO-3": "cpu_zero3"}
    assert zero2.name == "trainer overhead, 2 processes ZeRO-2 (img/s trainer / hand loop)"
    assert zero2.value == pytest.approx(10.0 / 10.2) and zero2.passed
    assert zero3.value == pytest.approx(10.0 / 12.5) and zero3.passed is False
    assert (
        "hand loop 10 s (9-11, n=4) (4.00 img/s) vs train_base.py 10.2 s (10-10.5, n=3) (3.92 img/s)"
        in zero2.detail
    )
    assert zero3.detail.endswith("accelerate launch cpu_zero3, 2 processes")
    # the one-process figure computes the same from its own launches
    (one,) = overhead.measure(SimpleNamespace(interleaved=launches["cpu_zero2"]))  # type: ignore[arg-type]
    assert one.value == zero2.value and one.detail == zero2.detail


def test_peers_compare_ours_with_the_fastest_peer_after_the_warm_up() -> None:
    save = {"ours": [9.0, 2.0, 2.2, 1.8], "accelerate": [9.0, 1.0, 1.1, 0.9], "dcp": [9.0, 4.0, 4.0, 4.0]}
    memory = [[{"rss_before": 9e9, "peak": 9e9}, {"rss_before": 1e9, "peak": 1.1e9}],
              [{"rss_before": 9e9, "peak": 9e9}, {"rss_before": 1e9, "peak": 1.3e9}]]  # fmt: skip
    records = {
        "save": {"times": {"save": save, "blocked": {"ours": [1.0, 0.1, 0.1], "dcp": [1.0, 0.4, 0.5]},
                           "load": {"ours": [5.0, 1.0, 1.0], "deepspeed": [5.0, 2.0, 2.0]}},
                 "bytes": {"ours": 2.4e8, "accelerate": 3e8, "dcp": 2.5e8}, "deepspeed_fast": "no async_io op",
                 "parameters": 15.3e6, "world_size": 2, "load_memory": memory},
        "resume": {"times": {"reshard": {"ours": [3.0, 1.0], "deepspeed": [9.0, 6.0], "dcp": [3.0, 2.0]}}},
    }  # fmt: skip
    m = SimpleNamespace(peer_timings=lambda config, width: records)
    durable, written, blocked, load, loaded, reshard = peers.measure_config(m, "ZeRO-2", "cpu_zero2")  # type: ignore[arg-type]
    assert durable.name == "durable save, 2 proc ZeRO-2, 15M (ours / accelerate save_state)"
    assert (
        durable.value == pytest.approx(2.0) and durable.passed is False
    )  # medians 2.0 vs 1.0, warm-up dropped
    assert written.name == "bytes per durable save, 2 proc ZeRO-2, 15M (ours / DCP)"
    assert written.value == pytest.approx(2.4 / 2.5) and written.passed
    assert "ours 240.0 MB, accelerate save_state 300.0 MB" in written.detail
    assert (
        blocked.value == pytest.approx(0.1 / 0.45) and blocked.passed and "no async_io op" in durable.detail
    )
    assert load.value == pytest.approx(0.5) and load.passed
    # the worst rank's peak over (its memory before + half the bytes), its warm-up load dropped
    assert loaded.value == pytest.approx(1.3e9 / 1.12e9) and loaded.passed is False
    assert reshard.value == pytest.approx(1 / 6) and "DCP's resharding load 2 s" in reshard.detail


def test_peers_at_the_largest_size_merge_the_split_launches_and_keep_a_single_resume() -> None:
    from benchmarks.measurements import merge_records

    engine = {"parameters": 244e6, "world_size": 2, "bytes": {"ours": 4e9, "deepspeed": 5e9},
              "times": {"save": {"ours": [9.0, 6.0], "deepspeed": [9.0, 4.0]}, "blocked": {"ours": [2.0, 1.0]},
                        "load": {"ours": [9.0, 6.0], "deepspeed": [9.0, 8.0]}},
              "load_memory": [[{"rss_before": 5e9, "peak": 6e9}], [{"rss_before": 5e9, "peak": 6e9}]]}  # fmt: skip
    twin = {"parameters": 244e6, "bytes": {"dcp": 4e9},
            "times": {"save": {"dcp": [9.0, 5.0]}, "blocked": {"dcp": [3.0, 2.0]}, "load": {"dcp": [3.0, 3.0]}}}  # fmt: skip
    save: dict[str, Any] = {}
    merge_records(save, engine)
    merge_records(save, twin)
    assert save["times"]["save"] == {"ours": [9.0, 6.0], "deepspeed": [9.0, 4.0], "dcp": [9.0, 5.0]}
    assert save["bytes"] == {"ours": 4e9, "deepspeed": 5e9, "dcp": 4e9}
    records = {"save": save, "resume": {"times": {"reshard": {"ours": [5.0], "deepspeed": [40.0]}}}}
    m = SimpleNamespace(peer_timings=lambda config, width: records)
    durable, written, blocked, load, loaded, reshard = peers.measure_config(m, "ZeRO-3", "cpu_zero3", 4)  # type: ignore[arg-type]
    assert durable.name == "durable save, 2 proc ZeRO-3, 244M (ours / DeepSpeed save_checkpoint)"
    assert durable.value == pytest.approx(1.5) and blocked.value == pytest.approx(0.5)
    assert written.value == pytest.approx(1.0) and load.value == pytest.approx(2.0)
    assert loaded.value == pytest.approx(6 / 7) and loaded.passed
    assert reshard.name == "resume 2 -> 1 proc ZeRO-3, 244M (ours / DeepSpeed universal)"
    assert reshard.value == pytest.approx(5 / 40) and "DCP" not in reshard.detail  # one timing: no warm-up


def test_the_cost_per_byte_at_the_largest_size_is_compared_with_the_smallest() -> None:
    def record(parameters: float, nbytes: float, save: float, load: float) -> dict[str, Any]:
        times = {"save": {"ours": [9.0, save]}, "load": {"ours": [9.0, load]}}
        return {"save": {"parameters": parameters, "bytes": {"ours": nbytes}, "times": times}}

    records = {1: record(15e6, 2.5e8, 0.3, 0.2), 4: record(244e6, 4e9, 4.0, 4.0)}
    m = SimpleNamespace(setup=Setup(full=True), peer_timings=lambda config, width: records[width])
    save, load = peers.growth(m, "ZeRO-2", "cpu_zero2")  # type: ignore[arg-type]
    assert save.name == "durable save per byte, 2 proc ZeRO-2: 244M / 15M"
    assert save.value == pytest.approx((4.0 / 4e9) / (0.3 / 2.5e8)) and save.passed
    assert load.value == pytest.approx((4.0 / 4e9) / (0.2 / 2.5e8)) and load.passed is False
    assert "1.2 s/GB at 15M vs 1 s/GB at 244M" in save.detail


def test_scale_rows_divide_each_cost_by_its_floor_and_figures_show_the_worst_size() -> None:
    def rank(rss_training: float, staged: float, rss_saving: float, memcpy: float) -> dict[str, Any]:
        times = {"blocked": {"ours": [9.0, 0.3, 0.3]}, "memcpy": {"seconds": [9.0, memcpy, memcpy]},
                 "write": {"seconds": [2.0, 2.0], "bytes": [1e9, 1e9]}, "plain": {"seconds": [1.5, 1.5]}}  # fmt: skip
        return {"times": times, "parameters": 61e6, "rss_training": rss_training, "staged_bytes": staged,
                "rss_saving": rss_saving}  # fmt: skip

    record = {"ranks": [rank(4e9, 1e9, 5e9, 0.2), rank(4e9, 1e9, 5.5e9, 0.25)]}
    (row, *_) = scale.per_size(SimpleNamespace(scale_run=lambda *_: record), "cpu_zero2")  # type: ignore[arg-type]
    assert row["snapshot"] == pytest.approx(0.3 / 0.25)  # the slower rank's memcpy
    assert row["efficiency"] == pytest.approx(1.5 / 2.0)
    assert row["memory"] == pytest.approx(5.5 / 5.0)  # the worst rank
    small = {**row, "parameters": 15e6, "efficiency": 0.95, "memory": 1.0}
    snapshot, write, memory = scale.figures_of("2 proc ZeRO-2", [small, row])
    assert snapshot.value == pytest.approx(1.2) and snapshot.passed
    assert write.value == pytest.approx(0.75) and write.passed is False  # the worst size
    assert memory.value == pytest.approx(1.1) and memory.passed
    assert write.detail.startswith("15M: ") and "; 61M: 500 vs 667 MB/s (1000 MB)" in write.detail


def test_a_failed_measurement_keeps_its_scratch_folder_and_says_where(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error names a launch's log: the folder holding it must outlive the failure (a run that passes
    leaves nothing behind)."""
    from benchmarks import perf

    def fails(m: Any) -> list[Any]:
        (m.logs / "launch.log").write_text("what the launch printed\n")
        raise BenchError(f"a launch exited 1; see {m.logs / 'launch.log'}")

    monkeypatch.setattr(perf, "REPO", tmp_path)
    monkeypatch.setitem(perf.FIGURES, "fails", fails)
    monkeypatch.setitem(perf.FIGURES, "passes", lambda m: [])
    setup = Setup(batch=2, steps=1)
    assert perf.measure(["passes"], setup, keep=False, record=False, start=0.0) == ([], [])
    assert list((tmp_path / "demo_output").iterdir()) == []
    with pytest.raises(BenchError, match=r"see .*launch\.log"):
        perf.measure(["fails"], setup, keep=False, record=False, start=0.0)
    [kept] = (tmp_path / "demo_output").iterdir()
    assert (kept / "logs" / "launch.log").read_text() == "what the launch printed\n"
    assert f"The scratch folder is kept for its logs: {kept}" in capsys.readouterr().err
