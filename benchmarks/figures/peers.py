"""peers: the trainer's checkpoints against the libraries a user would save with instead (ours / the best peer).

For the same model and state (diffit_cifar: weights, AdamW's moments and an EMA), on 2 processes under each
of ZeRO-2 and ZeRO-3, ``benchmarks/peer_timings.py`` times in the same processes, taking turns, a new order
each repetition (``PEER_REPS`` after a warm-up):

- durable save: the trainer's synchronous save (each rank's pieces of the model file and of Adam's moments, the
  RNG states, the checksum of every byte, the manifest, ``last`` and retention) ÷ the fastest of
  ``accelerator.save_state``, DeepSpeed's ``engine.save_checkpoint`` (with its default writer, and with its fast
  writer where its async_io op builds: O_DIRECT through libaio) and ``torch.distributed.checkpoint.save`` (of
  an FSDP2 twin of the model), each followed by an fsync of what it wrote;
- bytes per durable save: the trainer's ÷ the fewest any peer writes (every peer saves the whole resumable
  state: Accelerate's EMA is gathered whole where ZeRO-3 partitions it, as its registered objects are saved
  from the main process alone);
- training blocked per save: the trainer's background save (``async_save``) ÷ DCP's ``async_save`` (DeepSpeed's
  background saves are its fast writer's, decoupled: not timed here), target <= 0.25;
- load for resume, until the first step can run: the trainer's resume (it verifies every byte against the
  manifest first) ÷ the fastest peer's load;
- memory of a load for resume: each process's peak resident memory during the trainer's resume ÷ (its resident
  memory before + one process's share of the checkpoint's bytes), target <= 1.1 (the worst process);
- resume on 1 process from the 2-process save: the trainer's ÷ DeepSpeed's universal checkpoint
  (``ds_to_universal``, then its load), target <= 0.2; DCP's resharding load is shown beside it.

At each size of ``Setup.peer_widths`` (diffit_cifar widened: 15.3 M and 61 M parameters in `make bench`, and
244 M in `make bench-full`, where a save writes ~4 GB): at the largest, the sides do not fit in memory
together, so the trainer's, the peers' on the DeepSpeed engine and DCP's run in launches of their own, and
the resume on 1 process times the engine's sides alone. With several sizes, the cost per byte of the
trainer's save and load at the largest size ÷ at the smallest (target <= 1: it grows no faster than the
bytes).

The peers' code is ``benchmarks/peers.py``, written as each library's documentation shows it. Every load is
checked to restore the saved weights and EMA exactly.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import Figure, figure, median
from benchmarks.measurements import Measurements

TARGET = ("<=", 1.0)
BYTES = ("<=", 1.02)
BLOCKED = ("<=", 0.25)
MEMORY = ("<=", 1.1)
RESHARD = ("<=", 0.2)
GROWTH = ("<=", 1.0)
PEER_NAMES = {"accelerate": "accelerate save_state", "deepspeed": "DeepSpeed save_checkpoint",
              "deepspeed_fast": "DeepSpeed fast writer", "dcp": "DCP"}  # fmt: skip


def sides(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each side's seconds without its warm-up repetition (a side timed once has none)."""
    return {name: seconds[1:] if len(seconds) > 1 else seconds for name, seconds in times.items()}


def short(seconds: list[float]) -> str:
    return f"{median(seconds):.3g} s ({min(seconds):.3g}-{max(seconds):.3g})"


def against_best(
    title: str, times: dict[str, list[float]], names: dict[str, str], note: str = "", target: Any = TARGET
) -> Figure:  # fmt: skip
    """Ours over the fastest of the others (by median), every side shown."""
    timed = sides(times)
    ours = timed.pop("ours")
    best = min(timed, key=lambda name: median(timed[name]))
    detail = f"ours {short(ours)} vs " + ", ".join(f"{names.get(n, n)} {short(s)}" for n, s in timed.items())
    detail += f"; n={len(ours)}{note}"
    return figure(
        target, f"{title} (ours / {names.get(best, best)})", median(ours) / median(timed[best]), detail
    )


def bytes_figure(where: str, written: dict[str, int]) -> Figure:
    peers = {name: n for name, n in written.items() if name != "ours"}
    fewest = min(peers, key=lambda name: peers[name])
    detail = ", ".join(f"{PEER_NAMES.get(k, k)} {v / 1e6:.1f} MB" for k, v in written.items())
    name = f"bytes per durable save, {where} (ours / {PEER_NAMES.get(fewest, fewest)})"
    return figure(BYTES, name, written["ours"] / peers[fewest], detail)


def memory_figure(where: str, save: dict[str, Any]) -> Figure:
    """The worst process's peak during the trainer's loads ÷ (its memory before + its share of the bytes)."""
    share = save["bytes"]["ours"] / save["world_size"]
    ratios, details = [], []
    for rank, loads in enumerate(save.get("load_memory") or []):
        warm = loads[1:] or loads
        peak, before = median([m["peak"] for m in warm]), median([m["rss_before"] for m in warm])
        ratios.append(peak / (before + share))
        details.append(f"rank {rank}: {peak / 1e6:.0f} / ({before / 1e6:.0f} + {share / 1e6:.0f}) MB")
    name = f"load peak memory, {where} (peak RSS / (RSS before + one rank's share))"
    if not ratios:
        return figure(MEMORY, name, None, "no memory was recorded")
    return figure(MEMORY, name, max(ratios), "; ".join(details) + f"; n={len(warm)}")


def measure_config(m: Measurements, stage: str, config: str, width: int = 1) -> list[Figure]:
    records = m.peer_timings(config, width)
    save, resume = records["save"], records["resume"]
    times = save["times"]
    size = f", {save['parameters'] / 1e6:.0f}M"
    where = f"2 proc {stage}{size}"
    fast_note = f"; {save['deepspeed_fast']}" if save.get("deepspeed_fast") else ""
    reshard: dict[str, Any] = sides(resume["times"]["reshard"])
    universal, ours = reshard["deepspeed"], reshard["ours"]
    dcp = f"; DCP's resharding load {short(reshard['dcp'])}" if "dcp" in reshard else ""
    return [
        against_best(f"durable save, {where}", times["save"], PEER_NAMES, fast_note),
        bytes_figure(where, save["bytes"]),
        against_best(f"blocked per save, {where}", times["blocked"], {"dcp": "DCP async_save"}, target=BLOCKED),
        against_best(f"load for resume, {where}", times["load"], PEER_NAMES),
        memory_figure(where, save),
        figure(RESHARD, f"resume 2 -> 1 proc {stage}{size} (ours / DeepSpeed universal)", median(ours) / median(universal),
               f"ours {short(ours)} vs ds_to_universal + load {short(universal)}{dcp}; n={len(ours)}"),
    ]  # fmt: skip


def growth(m: Measurements, stage: str, config: str) -> list[Figure]:
    """The trainer's seconds per byte of a save and of a load at the largest size ÷ at the smallest."""
    widths = m.setup.peer_widths
    records = {width: m.peer_timings(config, width)["save"] for width in (min(widths), max(widths))}

    def per_byte(kind: str, width: int) -> float:
        record = records[width]
        return median(sides(record["times"][kind])["ours"]) / record["bytes"]["ours"]

    out = []
    small, large = (records[w]["parameters"] / 1e6 for w in (min(widths), max(widths)))
    for kind, what in (("save", "durable save"), ("load", "load for resume")):
        a, b = per_byte(kind, min(widths)), per_byte(kind, max(widths))
        detail = f"{a * 1e9:.3g} s/GB at {small:.0f}M vs {b * 1e9:.3g} s/GB at {large:.0f}M"
        out.append(
            figure(GROWTH, f"{what} per byte, 2 proc {stage}: {large:.0f}M / {small:.0f}M", b / a, detail)
        )
    return out


def measure(m: Measurements) -> list[Figure]:
    """diffit_cifar at each size of ``Setup.peer_widths`` under each ZeRO config, then how the cost grows."""
    configs = m.setup.zero_configs().items()
    figures = [f for width in m.setup.peer_widths for stage, config in configs
               for f in measure_config(m, stage, config, width)]  # fmt: skip
    if len(m.setup.peer_widths) > 2:
        figures += [f for stage, config in configs for f in growth(m, stage, config)]
    return figures
