"""peers: the trainer's checkpoints against the libraries a user would save with instead (ours / the best peer).

For the same model and state (diffit_cifar: weights, AdamW's moments and an EMA), on 2 processes under each
of ZeRO-2 and ZeRO-3, ``benchmarks/peer_timings.py`` times in the same processes, taking turns, a new order
each repetition (``PEER_REPS`` after a warm-up):

- durable save: the trainer's synchronous save (snapshot, shards, EMA, RNG, the merged fp32 ``.ckpt``, the
  checksum of every byte, the manifest, ``last`` and retention) ÷ the fastest of ``accelerator.save_state``,
  DeepSpeed's ``engine.save_checkpoint`` and ``torch.distributed.checkpoint.save`` (of an FSDP2 twin of the
  model), each followed by an fsync of what it wrote;
- training blocked per save: the trainer's background save (``async_save``) ÷ DCP's ``async_save`` (DeepSpeed
  has no background save without its async_io op; the detail says why);
- load for resume, until the first step can run: the trainer's resume (it verifies every byte against the
  manifest first) ÷ the fastest peer's load;
- resume on 1 process from the 2-process save: the trainer's ÷ DeepSpeed's universal checkpoint
  (``ds_to_universal``, then its load); DCP's resharding load is shown beside it.

The same again at the largest scale size (diffit_cifar widened ``max(SCALE_WIDTHS)`` times: 244 M parameters,
4-7 GB per save), with ``PEER_LARGEST_REPS`` repetitions after the warm-up: there the trainer's engine and
DCP's twin do not fit in memory together, so DCP's sides run in a launch of their own, and the resume on 1
process is timed once (DeepSpeed's conversion alone takes 30-40 s), without DCP's.

The peers' code is ``benchmarks/peers.py``, written as each library's documentation shows it. Every load is
checked to restore the saved weights exactly.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import Figure, figure, median
from benchmarks.measurements import Measurements
from benchmarks.settings import SCALE_WIDTHS

TARGET = ("<=", 1.0)
PEER_NAMES = {"accelerate": "accelerate save_state", "deepspeed": "DeepSpeed save_checkpoint", "dcp": "DCP"}


def sides(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each side's seconds without its warm-up repetition (a side timed once has none)."""
    return {name: seconds[1:] if len(seconds) > 1 else seconds for name, seconds in times.items()}


def short(seconds: list[float]) -> str:
    return f"{median(seconds):.3g} s ({min(seconds):.3g}-{max(seconds):.3g})"


def against_best(title: str, times: dict[str, list[float]], names: dict[str, str], note: str = "") -> Figure:
    """Ours over the fastest of the others (by median), every side shown."""
    timed = sides(times)
    ours = timed.pop("ours")
    best = min(timed, key=lambda name: median(timed[name]))
    detail = f"ours {short(ours)} vs " + ", ".join(f"{names.get(n, n)} {short(s)}" for n, s in timed.items())
    detail += f"; n={len(ours)}{note}"
    return figure(
        TARGET, f"{title} (ours / {names.get(best, best)})", median(ours) / median(timed[best]), detail
    )


def measure_config(m: Measurements, stage: str, config: str, width: int = 1) -> list[Figure]:
    records = m.peer_timings(config, width)
    save, resume = records["save"], records["resume"]
    times = save["times"]
    size = f", {save['parameters'] / 1e6:.0f}M" if width > 1 else ""
    where = f"2 proc {stage}{size}"
    sizes = ", ".join(f"{PEER_NAMES.get(k, k)} {v / 1e6:.0f} MB" for k, v in save["bytes"].items())
    async_note = f"; {save['deepspeed_async']}" if save.get("deepspeed_async") else ""
    reshard: dict[str, Any] = sides(resume["times"]["reshard"])
    universal, ours = reshard["deepspeed"], reshard["ours"]
    dcp = f"; DCP's resharding load {short(reshard['dcp'])}" if "dcp" in reshard else ""
    return [
        against_best(f"durable save, {where}", times["save"], PEER_NAMES, f"; bytes: {sizes}"),
        against_best(f"blocked per save, {where}", times["blocked"], {"dcp": "DCP async_save"}, async_note),
        against_best(f"load for resume, {where}", times["load"], PEER_NAMES),
        figure(TARGET, f"resume 2 -> 1 proc {stage}{size} (ours / DeepSpeed universal)", median(ours) / median(universal),
               f"ours {short(ours)} vs ds_to_universal + load {short(universal)}{dcp}; n={len(ours)}"),
    ]  # fmt: skip


def measure(m: Measurements) -> list[Figure]:
    """diffit_cifar under each ZeRO config, then the largest scale size under each."""
    configs = m.setup.zero_configs().items()
    return [f for width in (1, max(SCALE_WIDTHS)) for stage, config in configs
            for f in measure_config(m, stage, config, width)]  # fmt: skip
