"""The checkpoint engine: given a folder, a policy and the trainer's registered states, it saves, commits,
verifies and loads; it knows no run (what it has to say goes to the journal and metrics log it is handed).

    folder.py            CheckpointFolder: where a checkpoint's files lie (tags, manifests/, state/)
    policy.py            CheckpointPolicy: when to save and what retention keeps
    manager.py           CheckpointManager: when to save, the save in flight, timing, the rank rule,
                         reporting; ``load`` for resume; the one object the loop talks to
    states.py            what a checkpoint holds: TrainingStates (model, optimizer, EMA, TrainState, RNG, extra)
    job.py               a save in flight: this rank's files and parts, the meeting of ranks, the commit
    formats/             the files of a checkpoint: base.py (model file, moments, RNG), legacy.py (earlier
                         versions), lora.py (adapter file + peft export); load_checkpoint_file for any .ckpt
    protocol.py          the commit order on rank 0: commit, publish (links, retention), discard, clean start,
                         resume point with fallback (damaged/)
    manifest.py          manifests/<tag>.json: sizes and checksums of a checkpoint's files, the commit record
    retention.py         which committed checkpoints are kept, and why
    sharding/            what each rank owns of the state (owned.py), the trained state by name, gathered and
                         scattered on any number of processes (full_state.py), earlier versions' ZeRO shards
                         merged (zero_merge.py)
    deepspeed_compat/    every touch of DeepSpeed internals, each version-checked

A save goes one way: loop → manager → format → ``trainer/storage``, and manager → protocol → manifest for the
commit. It imports only ``trainer.storage``, ``trainer.errors``, ``trainer.faults`` and ``launch``. Importing
this package imports nothing heavy: ``--list-runs`` uses ``manifest`` without torch.
"""
