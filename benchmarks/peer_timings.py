"""The peers figure's launched side: the trainer's checkpoint manager and its peers (``benchmarks/peers.py``)
saving and loading the same state in the same processes, taking turns, in a new order each repetition.

    accelerate launch --config_file configs/accelerate/cpu_zero2.yaml benchmarks/peer_timings.py \\
        save DATA_ROOT WORK
    accelerate launch --config_file configs/accelerate/cpu_zero2.yaml --num_processes 1 \\
        benchmarks/peer_timings.py resume DATA_ROOT WORK

``--sides engine`` runs only the sides on the DeepSpeed engine (ours, Accelerate, DeepSpeed and its fast
writer), ``trainer`` only ours, ``engine_peers`` only the peers there, ``twin`` only DCP's on its twin: a
size too large for all of them in the same processes takes launches of its own. ``resume`` reads the
records of every save launch in WORK.
``--width`` widens the model as the scale figure does (``settings.widened``).

``save``: after one training step, each repetition times a durable save by each side (``save``), a
background save's blocking of training (``blocked``: the trainer's ``async_save`` and DCP's
``async_save``), and a load of what was just saved (``load``). ``resume``, on another number of processes
than ``save`` was: a load of the newest saves (``reshard``): the trainer's, DeepSpeed's universal
checkpoint (conversion, then load) and DCP's (it reshards as it reads). Rank 0 writes the seconds to
WORK/<phase>.json (WORK/<phase>_<sides>.json with ``--sides``), the first repetition being a warm-up.

The trainer's side is the trainer's own ``CheckpointManager``, ``BaseFormat`` and states, built as
``trainer/training/loop.py`` builds them, on the model and optimizer Accelerate and DeepSpeed prepared; DCP saves an
FSDP2 twin of the same model (``peers.fsdp2``), trained the same step. Every timed operation starts and
ends with every process at a barrier; rank 0's clock counts. Before each load the weights are shifted, and
after it they must equal the saved ones exactly: a path that stops working fails the launch, it cannot
time nothing.
"""

from __future__ import annotations

import argparse
import functools
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
from benchmarks.settings import BATCH, MODEL, PEER_REPS, widened  # noqa: E402
from benchmarks.trainer_side import EPOCH_END, TrainerSide, full_sum, local, local_tensors, measured_memory  # noqa: E402

ENGINE_PEERS = ("accelerate", "deepspeed", "deepspeed_fast")
ENGINE_SIDES = ("ours", *ENGINE_PEERS)
LAUNCH_SIDES = {
    "all": (*ENGINE_SIDES, "dcp"),
    "engine": ENGINE_SIDES,
    "trainer": ("ours",),
    "engine_peers": ENGINE_PEERS,
    "twin": ("dcp",),
}
"""The sides each ``--sides`` times: those on the DeepSpeed engine (the trainer's, the peers' there, or
both), DCP's on its FSDP2 twin, or all."""


class Sides(TrainerSide):
    """One launch's state, registered with every side it times (``names``): the trainer's engine and
    managers (``TrainerSide``), with the EMA registered for Accelerate, and the FSDP2 twin DCP saves."""

    def __init__(self, args: argparse.Namespace, phase: str) -> None:
        self.names, self.launch = LAUNCH_SIDES[args.sides], args.sides
        universal = {"checkpoint": {"load_universal": True}} if phase == "resume" else None
        super().__init__(args.data_root, args.work, batch=args.batch_size, model=args.model,
                         overrides=widened(args.width), deepspeed=universal,
                         with_engine=any(name in ENGINE_SIDES for name in self.names))  # fmt: skip
        self.whole_ema: Any = None
        if self.ema is not None:
            self.whole_ema = peers.WholeEMA(self.ema)
            self.accelerator.register_for_checkpointing(self.whole_ema)
        self.fast: Any = None
        """DeepSpeed's fast checkpoint writer, where it runs (``fast_unavailable`` says why not)."""
        self.fast_unavailable = (
            "left out (--no-fast-writer)" if args.no_fast_writer else peers.async_io_unavailable()
        )
        if "deepspeed_fast" in self.names and self.fast_unavailable is None:
            try:
                self.fast = peers.fast_writer(self.engine)
            except Exception as e:
                first = str(e).splitlines()[0] if str(e) else ""
                self.fast_unavailable = (
                    f"DeepSpeed's fast writer cannot run here: {type(e).__name__}: {first}"
                )
        if self.fast is None:
            self.names = tuple(name for name in self.names if name != "deepspeed_fast")
        self.twin: Any = None
        if "dcp" in self.names:
            self.build_twin()
        self.train_step()

    def build_twin(self) -> None:
        """The FSDP2 twin of the model (the same initial weights), its AdamW and its EMA."""
        import torch

        from trainer.training.factory import build_model

        config = self.config
        torch.manual_seed(config.seed)
        twin = build_model(config).to(self.accelerator.device)
        self.twin = peers.fsdp2(twin, reshard_after_forward=self.topo.deepspeed_stage == 3)
        betas = (config.betas[0], config.betas[1])
        self.twin_optimizer = torch.optim.AdamW(self.twin.parameters(), lr=config.learning_rate, betas=betas,
                                                weight_decay=config.weight_decay)  # fmt: skip
        self.twin_ema = {k: v.detach().clone() for k, v in self.twin.state_dict().items()}
        gloo = torch.distributed.get_backend() == "gloo"
        self.cpu_group = None if gloo else torch.distributed.new_group(backend="gloo")  # for DCP's async_save

    def train_step(self, step: int = 0) -> None:
        """One step of each model on the same batch, so that AdamW's moments exist."""
        import torch

        if self.engine is not None:
            super().train_step(step)
        if self.twin is None:
            return
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
        """Move every weight and EMA tensor of the ``engine`` or the ``twin`` this process holds, so that a
        load must restore them."""
        import torch

        model, ema = (self.engine, self.ema.state_dict()) if which == "engine" else (self.twin, self.twin_ema)
        with torch.no_grad():
            for tensor in local_tensors(model) + [local(t) for t in ema.values()]:
                tensor.add_(1.0)

    def fingerprints(self) -> dict[str, float]:
        """Sums of the full weights and EMA of the trainer's model and of the twin, those this launch has
        (collective)."""
        sums = {}
        if self.engine is not None:
            sums["engine"] = full_sum(self.engine, self.topo.deepspeed_stage)
            sums["engine_ema"] = float(sum(t.double().sum().item() for t in self.ema.full_state().values()))
        if self.twin is not None:
            sums["twin"] = full_sum(self.twin, None)
            whole = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in self.twin_ema.values()]
            sums["twin_ema"] = float(sum(t.double().sum().item() for t in whole))
        return sums

    def parameters(self) -> int:
        """The model's parameters (whole tensors: ZeRO-3's and FSDP2's shards count at their full size)."""
        model = self.engine if self.engine is not None else self.twin
        return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    def mine(self, sides: dict[str, Any]) -> dict[str, Any]:
        """The entries of ``sides`` this launch times."""
        return {name: side for name, side in sides.items() if name in self.names}

    def record_name(self, phase: str) -> str:
        return phase if self.launch == "all" else f"{phase}_{self.launch}"

    def check(self, name: str, expected: dict[str, float], which: str, *, ema: bool) -> None:
        """``name``'s load restored the weights of ``which`` (and with ``ema``, its EMA) exactly."""
        got = self.fingerprints()
        for key, what in ((which, "weights"), (f"{which}_ema", "EMA")):
            if (what == "weights" or ema) and got[key] != expected[key]:
                raise SystemExit(
                    f"error: {name}'s load did not restore the saved {what} ({got[key]!r} != {expected[key]!r})"
                )


def durable_saves(sides: Sides, ours: Any, folders: dict[str, Path]) -> dict[str, Callable[[], Any]]:
    """Each side's save of the state into a new place (the peers': ``folders``), until its bytes are on disk."""
    acc, engine, ema, twin = sides.accelerator, sides.engine, sides.ema, sides.twin
    into: dict[str, Callable[[Path], Any]] = {
        "accelerate": lambda folder: peers.accelerate_save(acc, folder, sides.whole_ema),
        "deepspeed": lambda folder: peers.deepspeed_save(engine, folder.parent, folder.name, ema),
        "deepspeed_fast": lambda folder: peers.deepspeed_fast_save(
            engine, sides.fast, folder.parent, folder.name, ema
        ),
        "dcp": lambda folder: peers.dcp_save(twin, sides.twin_optimizer, sides.twin_ema, folder),
    }
    saves: dict[str, Callable[[], Any]] = {"ours": lambda: ours.maybe_save("epoch", **EPOCH_END)}
    for name, folder in folders.items():
        saves[name] = sides.durably(functools.partial(into[name], folder), folder)
    return saves


def background_saves(sides: Sides, ours_async: Any, folder: Path) -> dict[str, Callable[[], Any]]:
    """Each side's background save, returning when training could go on (the caller then waits for the
    rest: ``close`` for ours, the returned future for DCP's)."""
    return {
        "ours": lambda: ours_async.maybe_save("epoch", **EPOCH_END),
        "dcp": lambda: peers.dcp_async_save(
            sides.twin, sides.twin_optimizer, sides.twin_ema, folder, sides.cpu_group
        ),
    }


Restore = tuple[Callable[[], Any], str, bool]
"""A side's load, the model it restores (``engine`` or ``twin``), and whether it restores the EMA too."""


def loads(sides: Sides, ours: Any, folders: dict[str, Path]) -> dict[str, Restore]:
    """Each side's load of what it saved last."""
    ds, fast = folders.get("deepspeed", Path()), folders.get("deepspeed_fast", Path())
    acc = folders.get("accelerate", Path())
    return {
        "ours": (lambda: ours.load(), "engine", True),
        "accelerate": (
            lambda: peers.accelerate_load(sides.accelerator, acc, sides.whole_ema),
            "engine",
            True,
        ),
        "deepspeed": (
            lambda: peers.deepspeed_load(sides.engine, ds.parent, ds.name, sides.ema),
            "engine",
            True,
        ),
        "deepspeed_fast": (
            lambda: peers.deepspeed_load(sides.engine, fast.parent, fast.name, sides.ema),
            "engine",
            True,
        ),
        "dcp": (
            lambda: peers.dcp_load(sides.twin, sides.twin_optimizer, sides.twin_ema, folders["dcp"]),
            "twin",
            True,
        ),
    }


def save_phase(sides: Sides, reps: int) -> None:
    ours: Any = None
    ours_async: Any = None
    if "ours" in sides.names:
        ours, ours_async = (
            sides.manager("ours", async_save=False),
            sides.manager("ours_async", async_save=True),
        )
    expected = sides.fingerprints()
    peer_root, kept = sides.work / "peers", list[Path]()
    load_memory: list[dict[str, int]] = []
    for rep in range(reps + 1):  # repetition 0 warms up
        if sides.is_main:  # the last repetition's saves were loaded: only the newest stay (for the resume)
            for old in kept:
                shutil.rmtree(old, ignore_errors=True)
        if ours is not None:
            sides.next_epoch()
        folders = {name: peer_root / name / f"rep{rep}" for name in sides.names if name != "ours"}
        saves = sides.mine(durable_saves(sides, ours, folders))
        for name in rotated(saves, rep):
            sides.timed("save", name, saves[name])
            if name == "ours":  # retention deletes the last repetition's save: untimed, as the peers' rmtree
                ours.protocol.join()
        background = peer_root / "dcp_async" / f"rep{rep}"
        started = sides.mine(background_saves(sides, ours_async, background))
        for name in rotated(started, rep):
            future = sides.timed("blocked", name, started[name])
            if name == "ours":  # each background save ends before anything else is timed
                ours_async.close()
            else:
                future.result()
        timed_loads(sides, "load", sides.mine(loads(sides, ours, folders)), expected, rep, memory=load_memory)
        kept = [*folders.values(), background]
        sides.accelerator.wait_for_everyone()
    from benchmarks.runs import read_saves

    sizes = {name: folder_bytes(folder) for name, folder in folders.items()}
    if ours is not None:
        sizes["ours"] = read_saves(sides.layout("ours"))[-1].nbytes if sides.is_main else 0
    newest = {name: str(folder) for name, folder in folders.items()}
    memory = (
        sides.topo.comm.all_gather(load_memory, what="the memory of the loads") if ours is not None else []
    )
    sides.record(sides.record_name("save"), parameters=sides.parameters(), fingerprints=expected, newest=newest,
                 bytes=sizes, deepspeed_fast=sides.fast_unavailable, load_memory=memory)  # fmt: skip


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def resume_phase(sides: Sides, reps: int) -> None:
    saves = [json.loads(path.read_text()) for path in sorted(sides.work.glob("save*.json"))]
    if not saves:
        raise SystemExit(f"error: no save records in {sides.work}: run the save phase first")
    expected = {k: v for saved in saves for k, v in saved["fingerprints"].items()}
    newest = {k: Path(v) for saved in saves for k, v in saved["newest"].items()}
    from_world = saves[0]["world_size"]
    if from_world == sides.world:
        raise SystemExit(f"error: resume must run on another number of processes than save ({sides.world})")
    ours: Any = sides.manager("ours", async_save=False) if "ours" in sides.names else None
    root, tag = newest.get("deepspeed", Path()).parent, newest.get("deepspeed", Path()).name

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
        reshards: dict[str, Restore] = {  # a universal checkpoint converts weights and optimizer, no EMA
            "ours": (lambda: ours.load(), "engine", True),
            "deepspeed": (universal(rep), "engine", False),
            "dcp": (dcp_load, "twin", True),
        }
        timed_loads(sides, "reshard", sides.mine(reshards), expected, rep)
        if sides.is_main and "deepspeed" in sides.names:
            shutil.rmtree(root / f"{tag}_universal{rep}", ignore_errors=True)
    sides.record(sides.record_name("resume"), from_world_size=from_world)


def timed_loads(
    sides: Sides, kind: str, restores: dict[str, Restore], expected: dict[str, float], rep: int,
    memory: list[dict[str, int]] | None = None,
) -> None:  # fmt: skip
    """Time each load as ``kind``, in turn: the weights and EMA it restores are shifted first and must then
    equal the saved ones exactly. With ``memory``, the resident memory of this process before the trainer's
    load and its peak during it are appended there (bytes)."""
    for name in rotated(restores, rep):
        load, which, ema = restores[name]
        sides.shift_weights(which)
        if name == "ours" and memory is not None:
            load = measured_memory(load, memory)
        sides.timed(kind, name, load)
        sides.check(name, expected, which, ema=ema)


def rotated(names: Any, rep: int) -> list[str]:
    """``names`` starting with the ``rep``-th: each side is timed first as often as the others."""
    names = list(names)
    k = rep % len(names) if names else 0
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
    parser.add_argument(
        "--width", type=int, default=1, help="channels and time embedding x WIDTH (default 1)"
    )
    parser.add_argument("--no-fast-writer", action="store_true",
                        help="leave out DeepSpeed's fast writer (its async_io op builds for minutes the first time)")  # fmt: skip
    parser.add_argument("--sides", choices=tuple(LAUNCH_SIDES), default="all",
                        help="time the sides on the DeepSpeed engine, DCP's on its twin, or all (default)")  # fmt: skip
    args = parser.parse_args(argv)
    sides = Sides(args, args.phase)
    (save_phase if args.phase == "save" else resume_phase)(sides, args.reps)
    sides.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
