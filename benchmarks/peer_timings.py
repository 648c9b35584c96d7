"""The peers figure's launched side: the trainer's checkpoint manager and its peers (``benchmarks/peers.py``)
saving and loading the same state in the same processes, taking turns, in a new order each repetition.

    accelerate launch --config_file configs/accelerate/cpu_zero2.yaml benchmarks/peer_timings.py \\
        save DATA_ROOT WORK
    accelerate launch --config_file configs/accelerate/cpu_zero2.yaml --num_processes 1 \\
        benchmarks/peer_timings.py resume DATA_ROOT WORK

``save``: after one training step, each repetition times a durable save by each side (``save``), a
background save's blocking of training (``blocked``: the trainer's ``async_save`` and DCP's
``async_save``), and a load of what was just saved (``load``). ``resume``, on another number of processes
than ``save`` was: a load of the newest saves (``reshard``): the trainer's, DeepSpeed's universal
checkpoint (conversion, then load) and DCP's (it reshards as it reads). Rank 0 writes the seconds to
WORK/<phase>.json, the first repetition being a warm-up.

The trainer's side is the trainer's own ``CheckpointManager``, ``BaseFormat`` and states, built as
``trainer/loop.py`` builds them, on the model and optimizer Accelerate and DeepSpeed prepared; DCP saves an
FSDP2 twin of the same model (``peers.fsdp2``), trained the same step. Every timed operation starts and
ends with every process at a barrier; rank 0's clock counts. Before each load the weights are shifted, and
after it they must equal the saved ones exactly: a path that stops working fails the launch, it cannot
time nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script: import from the checkout, and this folder's modules as benchmarks.*
    sys.path[0] = str(REPO)

from benchmarks import peers  # noqa: E402
from benchmarks.hand_loop import batch_loss  # noqa: E402
from benchmarks.settings import BATCH, MODEL, PEER_REPS  # noqa: E402
from benchmarks.trainer_side import EPOCH_END, TrainerSide  # noqa: E402


class Sides(TrainerSide):
    """One launch's state, registered with every side: the trainer's engine and managers (``TrainerSide``),
    with the EMA registered for Accelerate, and the FSDP2 twin DCP saves."""

    def __init__(self, args: argparse.Namespace, phase: str) -> None:
        import torch

        from trainer.factory import build_model

        universal = {"checkpoint": {"load_universal": True}} if phase == "resume" else None
        super().__init__(
            args.data_root, args.work, batch=args.batch_size, model=args.model, deepspeed=universal
        )
        config = self.config
        self.accelerator.register_for_checkpointing(self.ema)
        torch.manual_seed(config.seed)
        twin = build_model(config).to(self.accelerator.device)
        self.twin = peers.fsdp2(twin, reshard_after_forward=self.topo.deepspeed_stage == 3)
        betas = (config.betas[0], config.betas[1])
        self.twin_optimizer = torch.optim.AdamW(self.twin.parameters(), lr=config.learning_rate, betas=betas,
                                                weight_decay=config.weight_decay)  # fmt: skip
        self.twin_ema = {k: v.detach().clone() for k, v in self.twin.state_dict().items()}
        gloo = torch.distributed.get_backend() == "gloo"
        self.cpu_group = None if gloo else torch.distributed.new_group(backend="gloo")  # for DCP's async_save
        self.train_step()

    def train_step(self, step: int = 0) -> None:
        """One step of each model on the same batch, so that AdamW's moments exist."""
        import torch

        super().train_step(step)
        images, labels = self.batch_of(step)
        generator = torch.Generator(self.accelerator.device).manual_seed(step)
        batch_loss(self.config, self.twin, images, labels, generator, (self.rank, self.world)).backward()
        self.twin_optimizer.step()
        self.twin_optimizer.zero_grad(set_to_none=True)

    def durably(self, save: Callable[[], Any], folder: Path) -> Callable[[], None]:
        """``save``, then rank 0 fsyncs what every process wrote to ``folder``."""

        def action() -> None:
            save()
            self.accelerator.wait_for_everyone()
            if self.is_main:
                peers.durable(folder)

        return action

    def shift_weights(self, which: str) -> None:
        """Move every weight of the ``engine`` or the ``twin`` this process holds, so that a load must
        restore them."""
        import torch

        with torch.no_grad():
            for tensor in local_tensors(self.engine if which == "engine" else self.twin):
                tensor.add_(1.0)

    def fingerprints(self) -> dict[str, float]:
        """Sums of the full weights of the trainer's model and of the twin (collective)."""
        return {"engine": full_sum(self.engine, self.topo.deepspeed_stage), "twin": full_sum(self.twin, None)}

    def check(self, name: str, expected: dict[str, float], which: str) -> None:
        got = self.fingerprints()[which]
        if got != expected[which]:
            raise SystemExit(
                f"error: {name}'s load did not restore the saved weights ({got!r} != {expected[which]!r})"
            )


def local_tensors(model: Any) -> list[Any]:
    """The weights this process holds: ZeRO-3 slices, FSDP2 shards, or whole tensors."""
    from trainer.checkpoint.deepspeed_compat import zero3_slice

    out = []
    for p in model.parameters():
        if zero3_slice(p) is not None:
            out.append(zero3_slice(p))
        elif hasattr(p, "to_local"):
            out.append(p.to_local())
        else:
            out.append(p.data)
    return out


def full_sum(model: Any, stage: int | None) -> float:
    import contextlib

    params = list(model.parameters())
    gather: Any = contextlib.nullcontext()
    if stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p.data for p in params]
        return float(sum(t.double().sum().item() for t in full))


def durable_saves(sides: Sides, ours: Any, folders: dict[str, Path]) -> dict[str, Callable[[], Any]]:
    """Each side's save of the state into a new place, until its bytes are on disk."""
    acc, engine, ema, twin = sides.accelerator, sides.engine, sides.ema, sides.twin
    ds = folders["deepspeed"]
    return {
        "ours": lambda: ours.maybe_save("epoch", **EPOCH_END),
        "accelerate": sides.durably(lambda: peers.accelerate_save(acc, folders["accelerate"]), folders["accelerate"]),
        "deepspeed": sides.durably(lambda: peers.deepspeed_save(engine, ds.parent, ds.name, ema), ds),
        "dcp": sides.durably(lambda: peers.dcp_save(twin, sides.twin_optimizer, sides.twin_ema, folders["dcp"]),
                             folders["dcp"]),
    }  # fmt: skip


def background_saves(sides: Sides, ours_async: Any, folder: Path) -> dict[str, Callable[[], Any]]:
    """Each side's background save, returning when training could go on (the caller then waits for the
    rest: ``close`` for ours, the returned future for DCP's)."""
    return {
        "ours": lambda: ours_async.maybe_save("epoch", **EPOCH_END),
        "dcp": lambda: peers.dcp_async_save(
            sides.twin, sides.twin_optimizer, sides.twin_ema, folder, sides.cpu_group
        ),
    }


def loads(sides: Sides, ours: Any, folders: dict[str, Path]) -> dict[str, tuple[Callable[[], Any], str]]:
    """Each side's load of what it saved last, and the model it restores (``engine`` or ``twin``)."""
    ds = folders["deepspeed"]
    return {
        "ours": (ours.load, "engine"),
        "accelerate": (lambda: peers.accelerate_load(sides.accelerator, folders["accelerate"]), "engine"),
        "deepspeed": (lambda: peers.deepspeed_load(sides.engine, ds.parent, ds.name, sides.ema), "engine"),
        "dcp": (
            lambda: peers.dcp_load(sides.twin, sides.twin_optimizer, sides.twin_ema, folders["dcp"]),
            "twin",
        ),
    }


def save_phase(sides: Sides, reps: int) -> None:
    ours, ours_async = sides.manager("ours", async_save=False), sides.manager("ours_async", async_save=True)
    expected = sides.fingerprints()
    peer_root, kept = sides.work / "peers", list[Path]()
    for rep in range(reps + 1):  # repetition 0 warms up
        sides.next_epoch()
        folders = {name: peer_root / name / f"rep{rep}" for name in ("accelerate", "deepspeed", "dcp")}
        saves = durable_saves(sides, ours, folders)
        for name in rotated(saves, rep):
            sides.timed("save", name, saves[name])
        background = peer_root / "dcp_async" / f"rep{rep}"
        started = background_saves(sides, ours_async, background)
        for name in rotated(started, rep):
            future = sides.timed("blocked", name, started[name])
            if name == "ours":  # each background save ends before anything else is timed
                ours_async.close()
            else:
                future.result()
        timed_loads(sides, "load", loads(sides, ours, folders), expected, rep)
        if sides.is_main:  # keep the newest saves only, for the resume phase
            for old in kept:
                shutil.rmtree(old, ignore_errors=True)
            kept = [*folders.values(), background]
        sides.accelerator.wait_for_everyone()
    from benchmarks.runs import read_saves

    sizes = {name: folder_bytes(folder) for name, folder in folders.items()}
    sizes["ours"] = read_saves(ours.layout)[-1].nbytes if sides.is_main else 0
    sides.record("save", fingerprints=expected, newest={k: str(v) for k, v in folders.items()}, bytes=sizes,
                 deepspeed_async=peers.async_io_unavailable())  # fmt: skip


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def resume_phase(sides: Sides, reps: int) -> None:
    saved = json.loads((sides.work / "save.json").read_text())
    expected, newest = saved["fingerprints"], {k: Path(v) for k, v in saved["newest"].items()}
    if saved["world_size"] == sides.world:
        raise SystemExit(f"error: resume must run on another number of processes than save ({sides.world})")
    ours = sides.manager("ours", async_save=False)
    root, tag = newest["deepspeed"].parent, newest["deepspeed"].name

    def universal(rep: int) -> Callable[[], None]:
        def convert_and_load() -> None:
            if sides.is_main:
                peers.to_universal(root, tag, f"{tag}_universal{rep}")
            sides.accelerator.wait_for_everyone()
            peers.deepspeed_load(sides.engine, root, f"{tag}_universal{rep}", None)

        return convert_and_load

    def dcp_load() -> None:
        peers.dcp_load(sides.twin, sides.twin_optimizer, sides.twin_ema, newest["dcp"])

    for rep in range(reps + 1):
        reshards = {
            "ours": (ours.load, "engine"),
            "deepspeed": (universal(rep), "engine"),
            "dcp": (dcp_load, "twin"),
        }
        timed_loads(sides, "reshard", reshards, expected, rep)
        if sides.is_main:
            shutil.rmtree(root / f"{tag}_universal{rep}", ignore_errors=True)
    sides.record("resume", from_world_size=saved["world_size"])


def timed_loads(
    sides: Sides, kind: str, restores: dict[str, tuple[Callable[[], Any], str]], expected: dict[str, float], rep: int
) -> None:  # fmt: skip
    """Time each load as ``kind``, in turn: the weights it restores are shifted first and must then equal
    the saved ones exactly."""
    for name in rotated(restores, rep):
        load, which = restores[name]
        sides.shift_weights(which)
        sides.timed(kind, name, load)
        sides.check(name, expected, which)


def rotated(names: Any, rep: int) -> list[str]:
    """``names`` starting with the ``rep``-th: each side is timed first as often as the others."""
    names = list(names)
    k = rep % len(names)
    return names[k:] + names[:k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=("save", "resume"))
    parser.add_argument("data_root", type=Path, metavar="DATA_ROOT")
    parser.add_argument("work", type=Path, metavar="WORK")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--batch-size", type=int, default=BATCH, help=f"global batch (default {BATCH})")
    parser.add_argument("--reps", type=int, default=PEER_REPS, help="repetitions after the warm-up")
    args = parser.parse_args(argv)
    sides = Sides(args, args.phase)
    (save_phase if args.phase == "save" else resume_phase)(sides, args.reps)
    sides.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
