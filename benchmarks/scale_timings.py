"""The scaling figure's launched side: the trainer's saves of one model size, beside what bounds each.

    python benchmarks/scale_timings.py DATA_ROOT WORK --width 4
    accelerate launch --config_file configs/accelerate/cpu_zero2.yaml benchmarks/scale_timings.py DATA_ROOT WORK

The model is diffit_cifar widened ``--width`` times (``settings.widened``: 15.3 M, 61 M and 244 M parameters
for widths 1, 2 and 4), trained one image per process per step, on the trainer's own states and checkpoint
manager (``TrainerSide``). After a training step, every process records:

- ``rss_training``: its peak resident memory so far (training, no save yet);
- ``blocked``: per background save (``async_save``), seconds until training could go on; each save is then
  waited for; ``staged_bytes``: its snapshot's host memory; ``rss_saving``: its peak resident memory after
  them and a training step beside the snapshot's buffers (kept for the next save);
- ``memcpy``: seconds to copy ``staged_bytes`` to host memory, in 256 MB blocks into a buffer written before
  (the floor of a host snapshot; from the GPU into page-locked memory on a GPU);
- ``write`` and ``plain`` (rank 0): per synchronous save, its seconds (the save's record in
  ``logs/events.jsonl``) and bytes, each followed by one plain fsynced file of as many bytes in the same
  folder (``measurements.plain_write_seconds``).

The first background save and memcpy are a warm-up. Each process writes WORK/scale_rank<R>.json.
``--write-only`` records ``write`` and ``plain`` alone, a warm-up save first (the write figure).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script: import from the checkout, and this folder's modules as benchmarks.*
    sys.path[0] = str(REPO)

from benchmarks.settings import MODEL, SCALE_REPS, widened  # noqa: E402
from benchmarks.trainer_side import EPOCH_END, TrainerSide  # noqa: E402

BLOCK = 256 << 20


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memcpy_seconds(nbytes: int, device: Any) -> float:
    """Seconds to copy ``nbytes`` from ``device`` memory to host memory, both written before, ``BLOCK`` at a
    time: into page-locked memory from a GPU, as the trainer's staging does."""
    import torch

    source = torch.ones(BLOCK, dtype=torch.uint8, device=device)
    target = torch.zeros(BLOCK, dtype=torch.uint8, pin_memory=source.device.type == "cuda")
    start = time.perf_counter()
    left = nbytes
    while left > 0:
        n = min(left, BLOCK)
        target[:n].copy_(source[:n])
        left -= n
    return time.perf_counter() - start


def background_saves(side: TrainerSide, reps: int) -> dict[str, int]:
    """``reps`` + 1 background saves, each waited for, then a training step beside the snapshot's buffers."""
    manager = side.manager("async", async_save=True)
    for _ in range(reps + 1):
        side.next_epoch()
        side.timed("blocked", "ours", lambda: manager.maybe_save("epoch", **EPOCH_END))
        manager.close()
    side.train_step(1)
    return {"staged_bytes": manager.staged_bytes, "rss_saving": peak_rss()}


def synchronous_saves(side: TrainerSide, reps: int) -> None:
    """``reps`` synchronous saves (the background saves warmed the process up), each followed (rank 0) by a
    plain fsynced file of as many bytes."""
    from benchmarks.measurements import plain_write_seconds
    from benchmarks.runs import read_saves

    manager, layout = side.manager("sync", async_save=False), side.layout("sync")
    for _ in range(reps):
        side.next_epoch()
        manager.maybe_save("epoch", **EPOCH_END)
        manager.protocol.join()  # retention's deletion of the save before runs in the background: not beside
        if side.is_main:
            save = read_saves(layout)[-1]
            side.times["write"]["seconds"].append(save.write_seconds)
            side.times["write"]["bytes"].append(save.nbytes)
            side.times["plain"]["seconds"].append(plain_write_seconds(layout.checkpoints, save.nbytes))
        side.accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_root", type=Path, metavar="DATA_ROOT")
    parser.add_argument("work", type=Path, metavar="WORK")
    parser.add_argument(
        "--width", type=int, default=1, help="channels and time embedding x WIDTH (default 1)"
    )
    parser.add_argument("--reps", type=int, default=SCALE_REPS, help="repetitions after the warm-up")
    parser.add_argument("--model", default=MODEL, help=f"the model to widen (default {MODEL})")
    parser.add_argument("--write-only", action="store_true", help="only synchronous saves and plain files")
    args = parser.parse_args(argv)
    from trainer.storage.staging import retain_freed_heap

    retain_freed_heap()  # as the trainer does, before training's allocations
    batch = int(os.environ.get("WORLD_SIZE", "1"))  # one image per process
    side = TrainerSide(
        args.data_root, args.work, batch=batch, model=args.model, overrides=widened(args.width)
    )
    side.train_step(0)  # allocates the gradients and AdamW's moments: training's steady state
    if args.write_only:
        synchronous_saves(side, args.reps + 1)
        side.record("scale", every_rank=True, width=args.width)
        side.accelerator.end_training()
        return 0
    rss_training = peak_rss()
    memory = background_saves(side, args.reps)
    device, staged = side.accelerator.device, memory["staged_bytes"]
    side.times["memcpy"]["seconds"] = [memcpy_seconds(staged, device) for _ in range(args.reps + 1)]
    synchronous_saves(side, args.reps)
    parameters = sum(p.numel() for p in side.ema.params.values())
    side.record("scale", every_rank=True, width=args.width, parameters=parameters, rss_training=rss_training,
                **memory)  # fmt: skip
    side.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
