"""merge: our ZeRO shard merge over DeepSpeed's (ours / DeepSpeed zero_to_fp32).

``trainer.checkpoint.sharding.zero_merge.merge_zero_shards`` on the ZeRO-2 shards of a real 2-process
DeepSpeed run ÷ DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` on the same shards (same process,
alternated, files in the page cache; the results are checked to be equal).
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchError, Figure, figure, median, spread
from benchmarks.launching import bench_env
from benchmarks.measurements import Measurements
from benchmarks.settings import REPO, REPS, SCALE_REPS

TARGET = ("<=", 1.0)


def merges(folder: Path) -> dict[str, Callable[[], dict[str, Any]]]:
    """The two merges of the ZeRO checkpoint ``folder`` (``.../state/<tag>``), by name."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.checkpoint.sharding.zero_merge import merge_zero_shards

    def deepspeed_merge() -> dict[str, Any]:
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # progress and notes
            return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)

    return {"ours": lambda: merge_zero_shards(folder), "deepspeed": deepspeed_merge}


def check_equal(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    import torch

    differ = [k for k in theirs if k not in ours or not torch.equal(ours[k].float(), theirs[k].float())]
    if differ:
        raise BenchError(
            f"merge_zero_shards differs from zero_to_fp32 on {len(differ)} tensors, e.g. {differ[:3]}"
        )


def alternated(merge: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Seconds of ``reps`` runs of each merge, alternated, starting with each in turn, so that drift hits
    both alike."""
    times: dict[str, list[float]] = {name: [] for name in merge}
    for rep in range(reps):
        for name in list(merge) if rep % 2 == 0 else list(merge)[::-1]:
            start = time.perf_counter()
            merge[name]()
            times[name].append(time.perf_counter() - start)
    return times


def measure(m: Measurements) -> list[Figure]:
    folder = m.zero_run
    merge = merges(folder)
    check_equal(merge["ours"](), merge["deepspeed"]())  # also the warm-up
    times = alternated(merge, REPS)
    shards = sum(p.stat().st_size for p in folder.glob("*.pt"))
    detail = (
        f"{shards / 1e6:.0f} MB of ZeRO-2 shards from 2 processes: merge_zero_shards {spread(times['ours'])} "
        f"vs zero_to_fp32 {spread(times['deepspeed'])}; equal results"
    )
    ratio = median(times["ours"]) / median(times["deepspeed"])
    return [figure(TARGET, "merge cost (ours / DeepSpeed zero_to_fp32)", ratio, detail)]


MERGE_PEAK = """
import re, sys
from pathlib import Path
from benchmarks.figures.merge import merges
def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
merge = merges(Path(sys.argv[1]))[sys.argv[2]]
before = kib("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
state = merge()
print((kib("VmHWM") - before) * 1024, sum(t.numel() * t.element_size() for t in state.values()))
"""
"""A merge alone in a process (Linux): (peak resident memory it added, bytes of the merged state)."""


def merge_costs(folder: Path, log: Path) -> dict[str, Any]:
    """Seconds of each merge of the ZeRO state ``folder`` (``merges``: ours, DeepSpeed's; equal results),
    alternated, ``SCALE_REPS`` each after a warm-up; and the peak memory each adds, in a process of its own."""
    merge = merges(folder)
    check_equal(merge["ours"](), merge["deepspeed"]())  # also the warm-up
    seconds = alternated(merge, SCALE_REPS)
    peaks, merged = {}, 0
    for name in merge:
        with open(log, "a") as err:
            out = subprocess.run([sys.executable, "-c", MERGE_PEAK, str(folder), name], cwd=REPO, text=True,
                                 env=bench_env(), stdout=subprocess.PIPE, stderr=err, check=True).stdout  # fmt: skip
        peak, merged = (int(x) for x in out.split()[-2:])
        peaks[name] = peak
    return {
        "merge_seconds": seconds,
        "merge_peak": peaks,
        "merged_bytes": merged,
    }
