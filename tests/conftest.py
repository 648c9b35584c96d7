"""Shared test set-up: CPU DeepSpeed and one thread per process (2-core CI machines)."""

import os

# Must be set before anything imports DeepSpeed (the merge tests compare against its zero_to_fp32).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
