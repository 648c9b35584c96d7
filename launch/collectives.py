"""The collectives the trainer itself calls, behind one object that the topology carries.

Everything that crosses ranks outside DeepSpeed goes through a ``Collectives``: the per-step stop check,
rank 0's decisions (run numbers, resume points), and the rendezvous of a background save. Carrying it on
the ``Topology`` makes the rank seam injectable: unit tests run a checkpoint manager on a fake 2-rank world
(``tests/fake_world.py``) instead of launching processes.

``ProcessGroupCollectives`` uses two gloo groups of its own, each with a bounded timeout: one for the main
thread and one for background saves (a save's thread must never share a group with the training thread).
When a peer process dies its sockets close and a collective fails at once; when a peer hangs (a frozen
machine), it fails after the timeout. Either way the failure is a ``PeerLost`` naming what was awaited.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

DEFAULT_TIMEOUT = timedelta(minutes=5)


class PeerLost(RuntimeError):
    """A collective could not complete: another process of the launch died or stopped answering."""

    def __init__(self, what: str, reason: str, timeout: timedelta | None = None) -> None:
        within = f" within {timeout.total_seconds() / 60:g} min" if timeout is not None else ""
        super().__init__(f"{what}: another process of this launch died or did not answer{within} ({reason})")
        self.what = what


_GLOO_LOCATION = re.compile(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*")
_PEER_FAILURE = re.compile(
    r"connection (closed|reset|refused)|timed out|timeout|broken pipe|peer|socket", re.I
)


def peer_failure(error: BaseException, *, what: str, timeout: timedelta | None = None) -> PeerLost | None:
    """``error`` as a ``PeerLost`` when it is a collective's failure (gloo or NCCL: a peer died or hangs),
    raised by DeepSpeed's or torch's own collectives; None for any other error."""
    import torch.distributed as dist

    message = str(error).strip()
    communication = isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and ("gloo" in message.lower() or "nccl" in message.lower())
    )
    if not communication or not _PEER_FAILURE.search(message):
        return None
    return PeerLost(what, _reason(error), timeout)


def _reason(error: BaseException) -> str:
    """The gist of a collective's error: its first line, without gloo's source location and advice."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = _GLOO_LOCATION.sub("", line)
    return line.split(". This is typically")[0][:200]


class Collectives(Protocol):
    """What the trainer needs across ranks. Every method is collective: all ranks call it, in the same
    order; ``what`` names the meeting point in the error raised when a peer never arrives."""

    def broadcast(self, value: Any, *, what: str) -> Any:
        """Rank 0's ``value`` on every rank."""
        ...

    def all_reduce_sum(self, values: list[float], *, what: str) -> list[float]:
        """Elementwise sum over the ranks of a short list of floats (float64)."""
        ...

    def all_gather(self, value: Any, *, what: str) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        ...

    def barrier(self, *, what: str) -> None: ...

    def background_exchange(self, value: Any, *, what: str) -> list[Any] | None:
        """From a background save's thread: every rank sends ``value`` to rank 0, which gets them all in
        rank order (None elsewhere)."""
        ...

    def background_broadcast(self, value: Any, *, what: str) -> Any:
        """From a background save's thread: rank 0's ``value`` on every rank."""
        ...


class SingleProcess:
    """The collectives of a launch with one process: every rank's value is this process's own."""

    def broadcast(self, value: Any, *, what: str) -> Any:
        return value

    def all_reduce_sum(self, values: list[float], *, what: str) -> list[float]:
        return [float(v) for v in values]

    def all_gather(self, value: Any, *, what: str) -> list[Any]:
        return [value]

    def barrier(self, *, what: str) -> None:
        return None

    def background_exchange(self, value: Any, *, what: str) -> list[Any] | None:
        return [value]

    def background_broadcast(self, value: Any, *, what: str) -> Any:
        return value


class ProcessGroupCollectives:
    """``torch.distributed`` over gloo groups of the trainer's own, created on every rank at once."""

    def __init__(self, rank: int, world_size: int, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
        import torch.distributed as dist

        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        # new_group is itself collective: every rank creates both groups, in this order.
        self._main: Any = dist.new_group(backend="gloo", timeout=timeout)
        self._background: Any = dist.new_group(backend="gloo", timeout=timeout)

    def _call(self, what: str, op: Callable[[], Any]) -> Any:
        try:
            return op()
        except RuntimeError as e:  # gloo: connection closed or reset by a dead peer, or timed out
            raise PeerLost(what, _reason(e), self.timeout) from e

    def broadcast(self, value: Any, *, what: str) -> Any:
        return self._call(what, lambda: self._broadcast(value, self._main))

    def all_reduce_sum(self, values: list[float], *, what: str) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        self._call(what, lambda: dist.all_reduce(tensor, group=self._main))
        return [float(v) for v in tensor.tolist()]

    def all_gather(self, value: Any, *, what: str) -> list[Any]:
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.world_size
        self._call(what, lambda: dist.all_gather_object(everyone, value, group=self._main))
        return everyone

    def barrier(self, *, what: str) -> None:
        import torch.distributed as dist

        self._call(what, lambda: dist.barrier(group=self._main))

    def background_exchange(self, value: Any, *, what: str) -> list[Any] | None:
        import torch.distributed as dist

        received: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._call(what, lambda: dist.gather_object(value, received, dst=0, group=self._background))
        return received

    def background_broadcast(self, value: Any, *, what: str) -> Any:
        return self._call(what, lambda: self._broadcast(value, self._background))

    def _broadcast(self, value: Any, group: Any) -> Any:
        import torch.distributed as dist

        payload = [value if self.rank == 0 else None]
        dist.broadcast_object_list(payload, src=0, group=group)
        return payload[0]


def decide_on_rank0(
    comm: Collectives,
    is_main: bool,
    decide: Callable[[], Any],
    *,
    errors: tuple[type[BaseException], ...],
    what: str,
) -> Any:
    """Run ``decide`` on global rank 0 only; every rank gets its result, or raises the same exception when
    it raised one of ``errors`` (a user error on rank 0 alone would leave the others waiting)."""
    outcome: tuple[Any, BaseException | None] = (None, None)
    if is_main:
        try:
            outcome = (decide(), None)
        except errors as e:
            outcome = (None, e)
    value, error = comm.broadcast(outcome, what=what)
    if error is not None:
        raise error
    return value


def agree_on_signal(
    comm: Collectives,
    rank: int,
    world_size: int,
    signal: int | None,
    *,
    what: str,
    sums: Sequence[float] = (),
) -> tuple[int | None, list[float]]:
    """In one all-reduce: the stop signal any rank has (the lowest rank's, when several do), or None, and the
    sums over the ranks of ``sums`` (values that travel in the same collective)."""
    votes = [0.0] * world_size + [float(v) for v in sums]
    votes[rank] = float(signal or 0)
    summed = comm.all_reduce_sum(votes, what=what)
    signals = [int(s) for s in summed[:world_size] if s]
    return (signals[0] if signals else None), summed[world_size:]
