"""What a launch that cannot start says, and which of its processes says it (no torch import here)."""

import os


class LaunchError(Exception):
    """A launch that cannot work as configured; the message says how to fix it."""


def launched_rank() -> int:
    """The global rank the launcher gave this process (0 without a launcher), known before any process
    group exists: which process of a failed start should print the error."""
    return int(os.environ.get("RANK", "0"))
