"""Process launch: the Accelerator and its backend, where this process sits, and the trainer's collectives.

Imports nothing from ``trainer``: the training code depends on this package, never the reverse. Names are
imported on first use, so that light commands (``--list-runs``, ``--help``) never import torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names as mypy sees them
    from launch.accelerator import (
        build_accelerator as build_accelerator,
    )
    from launch.accelerator import (
        configure_deepspeed as configure_deepspeed,
    )
    from launch.accelerator import (
        deepspeed_requested as deepspeed_requested,
    )
    from launch.accelerator import (
        release_shm_segment as release_shm_segment,
    )
    from launch.collectives import (
        DEFAULT_TIMEOUT as DEFAULT_TIMEOUT,
    )
    from launch.collectives import (
        Collectives as Collectives,
    )
    from launch.collectives import (
        PeerLost as PeerLost,
    )
    from launch.collectives import (
        ProcessGroupCollectives as ProcessGroupCollectives,
    )
    from launch.collectives import (
        SingleProcess as SingleProcess,
    )
    from launch.collectives import (
        agree_on_signal as agree_on_signal,
    )
    from launch.collectives import (
        decide_on_rank0 as decide_on_rank0,
    )
    from launch.collectives import (
        peer_failure as peer_failure,
    )
    from launch.errors import LaunchError as LaunchError
    from launch.errors import launched_rank as launched_rank
    from launch.world import Topology as Topology
    from launch.world import topology as topology

_WHERE = {
    "LaunchError": "launch.errors",
    "launched_rank": "launch.errors",
    "build_accelerator": "launch.accelerator",
    "configure_deepspeed": "launch.accelerator",
    "deepspeed_requested": "launch.accelerator",
    "release_shm_segment": "launch.accelerator",
    "DEFAULT_TIMEOUT": "launch.collectives",
    "Collectives": "launch.collectives",
    "PeerLost": "launch.collectives",
    "ProcessGroupCollectives": "launch.collectives",
    "SingleProcess": "launch.collectives",
    "agree_on_signal": "launch.collectives",
    "decide_on_rank0": "launch.collectives",
    "peer_failure": "launch.collectives",
    "Topology": "launch.world",
    "topology": "launch.world",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'launch' has no attribute {name!r}")
