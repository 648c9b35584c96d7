"""DiffiT trainer. The faces (``cli``, ``api``, ``export``) over the rooms, each importing only those below it:
``training`` (the launch and the loop), ``runs`` (run folders), ``config`` (typed configuration),
``checkpoint`` (the engine: a folder, a policy, states), ``storage`` (atomic files, checksums); the leaves
``errors`` and ``faults``.

``load_model`` and ``list_runs`` are imported lazily so that light commands (``--list-runs``, ``--help``)
don't pay for importing torch.
"""

from typing import Any

__all__ = ["list_runs", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from trainer import api

        return getattr(api, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
