"""Process launch: Accelerator construction, backend choice, the trainer's collectives."""

from launch.distributed import (
    Topology,
    all_reduce_sum,
    barrier,
    broadcast_object,
    build_accelerator,
    configure_deepspeed,
    decide_on_rank0,
    deepspeed_requested,
    release_shm_segment,
    topology,
)

__all__ = [
    "Topology",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "build_accelerator",
    "configure_deepspeed",
    "decide_on_rank0",
    "deepspeed_requested",
    "release_shm_segment",
    "topology",
]
