"""write: checkpoint write rate over a plain fsynced file's (checkpoint MB/s / plain file MB/s).

Checkpoint bytes (every file of the save, as the run's ``logs/events.jsonl`` records them) ÷ the duration of
a synchronous save (``write_seconds``: snapshot, writes and checksums, fsyncs, manifest, last/best links,
retention), over the bytes/s of writing as many bytes to one plain file in the same folder and fsyncing it
(``dd conv=fsync``-like, 16 MiB blocks from memory). Taken in turns, a save then a plain file, ``WRITE_REPS``
times after a warm-up of each, in one process (``benchmarks/scale_timings.py --write-only``): a shared disk's
speed varies by ±20% from one write to the next. Medians.
"""

from __future__ import annotations

from benchmarks.harness import Figure, figure, median
from benchmarks.measurements import Measurements

TARGET = (">=", 0.90)


def measure(m: Measurements) -> list[Figure]:
    ckpt, plain, nbytes = m.write_rates
    detail = (
        f"{nbytes / 1e6:.0f} MB per checkpoint: synchronous save {median(ckpt) / 1e6:.0f} MB/s "
        f"(n={len(ckpt)}) vs one plain fsynced file {median(plain) / 1e6:.0f} MB/s "
        f"({min(plain) / 1e6:.0f}-{max(plain) / 1e6:.0f}, n={len(plain)})"
    )
    ratio = median(ckpt) / median(plain)
    return [figure(TARGET, "write efficiency (checkpoint MB/s / plain file MB/s)", ratio, detail)]
