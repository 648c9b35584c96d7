"""``scripts/evaluate.py``: the FID of a run's checkpoint, computed on every process of the launch and
recorded in the run's ``metadata.json`` (``evaluations``), where ``--list-runs`` shows it."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import Any

from launch import Topology, build_accelerator, decide_on_rank0, topology
from model.lora import base_diffit
from trainer.api import checkpoint_path, load_model
from trainer.checkpoint.folder import epoch_tag
from trainer.checkpoint.formats import load_checkpoint_file
from trainer.config.schema import TrainConfig, from_dict
from trainer.errors import UserError
from trainer.faults import Faults
from trainer.runs.layout import RunLayout
from trainer.runs.lock import RunLock
from trainer.runs.metadata import RunHandle, now
from trainer.training.factory import load_data
from trainer.training.fid import evaluate_fid, load_feature_net


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate ``args.run``'s checkpoint ``args.which`` on every rank; rank 0, holding the run's lock so
    that no launch trains it meanwhile, prints the FID and records it."""
    if args.num_samples < 2 or args.batch_size < 1:
        raise UserError("--num-samples must be at least 2 and --batch-size at least 1")
    layout = RunLayout.detect(Path(args.run))
    if layout is None or not Path(args.run).is_dir():
        raise UserError(
            f"{args.run} is not a run folder: evaluate.py records the FID in a run's metadata.json"
        )
    timeout = timedelta(minutes=args.timeout_minutes)
    accelerator = build_accelerator(timeout, accept_shape=True)
    locks: list[RunLock] = []
    try:
        topo = topology(accelerator, timeout)

        def hold() -> str:
            file = checkpoint_path(layout.path, args.which)
            locks.append(RunLock(layout))
            note = locks[0].acquire("evaluate one of its checkpoints")
            if note:
                print(f"warning: {note}", flush=True)
            locks[0].start_heartbeat()
            return str(file)

        file = Path(decide_on_rank0(topo.comm, topo.is_main, hold, errors=(UserError,),
                                    what="finding the checkpoint to evaluate"))  # fmt: skip
        record = _measure(args, layout, file, topo)
        if topo.is_main:
            run = RunHandle(layout, is_main=True)
            earlier = run.metadata.get("evaluations")
            run.update(evaluations=[*(earlier if isinstance(earlier, list) else []), record])
            print(f"FID {record['value']:.4f}  ({layout.path.name} {record['tag']}, {args.num_samples} samples, "
                  f"{args.features})")  # fmt: skip
        return 0
    finally:
        for lock in locks:
            lock.release()
        accelerator.end_training()


def _measure(args: argparse.Namespace, layout: RunLayout, file: Path, topo: Topology) -> dict[str, Any]:
    """The FID of checkpoint ``file`` of the run, as the record ``metadata.json`` keeps of it."""
    ckpt = load_checkpoint_file(file, key=("state_dict", "lora_state_dict"), verified=not topo.is_main)
    config = from_dict(TrainConfig, ckpt["config"])
    epoch = ckpt.get("epoch")
    tag = file.stem if file.stem not in ("best", "last") else epoch_tag(int(epoch or 0))
    model = load_model(file, ema=True, device=topo.device)
    splits = load_data(config)
    net = load_feature_net(args.features, topo)
    config.seed = config.seed if args.seed is None else args.seed
    faults = Faults.from_environment(topo.rank)

    def fault_point(round_: int) -> None:  # a stop is Ctrl-C here: the finished batches stay for a rerun
        faults.point("fid", round=round_)

    say = (lambda line: print(line, flush=True)) if topo.is_main else None
    if say is not None:
        say(f"FID of {layout.path.name} {tag} ({args.which}): {args.num_samples} samples on {topo.world_size} "
            f"process(es), {args.features} features, {config.edm.num_steps}-step Heun sampler")  # fmt: skip
    value = evaluate_fid(model, config, splits, net, topo, num_samples=args.num_samples, batch_size=args.batch_size,
                         folder=layout.fid_scratch(tag, args.num_samples, args.features), run=layout.path,
                         weights=dict(model.state_dict()), should_stop=fault_point, say=say)  # fmt: skip
    return {
        "at": now(), "tag": tag, "epoch": epoch, "metric": "fid", "value": value, "num_samples": args.num_samples,
        "features": args.features, "seed": config.seed, "batch_size": args.batch_size,
        "sampler_steps": config.edm.num_steps, "conditional": bool(base_diffit(model).num_classes),
    }  # fmt: skip
