"""Checkpointing: the trainer registers its states once, the manager decides, saves, waits and commits.

    manager.py           CheckpointManager: when to save (policy), the save in flight, timing, the rank rule,
                         reporting and events; ``load`` for resume; the one object the loop talks to
    states.py            what a checkpoint holds: TrainingStates (model, optimizer, EMA, TrainState, RNG, extra)
    formats/             the files of a checkpoint: base.py (ZeRO shards + merged file), lora.py (adapter file
                         + peft export); load_checkpoint_file for any .ckpt of this trainer
    protocol.py          the commit order on rank 0: commit, publish (links, retention), discard, clean start,
                         resume point with fallback (damaged/)
    manifest.py          manifests/<tag>.json: sizes and checksums of a checkpoint's files, the commit record
    retention.py         which committed checkpoints are kept, and why
    io/                  atomic writes, fsync (atomic.py); the manifest's checksums (checksums.py); safetensors
                         (serialization.py); host staging of a background save's snapshot (staging.py)
    sharding/            ZeRO shards merged to full tensors (zero_merge.py); the trained state by name,
                         gathered and scattered on any number of processes (full_state.py)
    deepspeed_compat.py  every touch of DeepSpeed internals, each version-checked

A save goes one way: loop → manager → format → io, and the manager → protocol → manifest for the commit.
Importing this package imports nothing heavy: ``--list-runs`` uses ``io`` and ``manifest`` without torch.
"""
