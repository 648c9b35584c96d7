"""Exponential moving average of the weights, with EDM's half-life in images and its ramp-up.

Under ZeRO-3 a rank only holds a slice of each parameter, so the EMA is kept for
that slice alone: no gather per step and 1/world_size of the memory. ``state_dict``/``load_state_dict``
save and restore exactly what this rank holds; ``full_state``/``from_full`` convert between the slices and
full tensors with DeepSpeed's ZeRO-3 layout (each parameter padded to a multiple of the world size and
split evenly), which is how the merged checkpoint stores the EMA and how a run resumes on another
number of processes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trainer.checkpoint.deepspeed_compat import full_shape, zero3_slice
from trainer.checkpoint.sharding.full_state import full_from_slices


def _local_view(param: nn.Parameter) -> torch.Tensor:
    """The part of ``param`` this rank owns: the ZeRO-3 slice, else the parameter itself."""
    part = zero3_slice(param)
    return part if part is not None else param.data


class EMA:
    """fp32 EMA of the named parameters of ``module`` (a plain module, not a DeepSpeed engine)."""

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, nn.Parameter]],
        *,
        halflife_kimg: float,
        rampup_ratio: float | None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.params = {name: p for name, p in named_parameters if p.requires_grad}
        self.partitioned = any(zero3_slice(p) is not None for p in self.params.values())
        self.rank, self.world_size = rank, world_size
        self.halflife_kimg = halflife_kimg
        self.rampup_ratio = rampup_ratio
        self.shadow = {name: _local_view(p).detach().float().clone() for name, p in self.params.items()}

    def beta(self, images_seen: int, batch_size: int) -> float:
        """Decay for one step of ``batch_size`` images after ``images_seen`` images (EDM, Karras et al.)."""
        halflife = self.halflife_kimg * 1000
        if self.rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, images_seen: int, batch_size: int) -> None:
        beta = self.beta(images_seen, batch_size)
        shadows = list(self.shadow.values())
        current = [_local_view(p).detach().float() for p in self.params.values()]
        # shadow ← beta·shadow + (1 − beta)·param, in place and in one fused call over every tensor
        torch._foreach_lerp_(shadows, current, 1.0 - beta)

    # -- checkpoint I/O ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name].reshape(tensor.shape))

    def shapes(self) -> dict[str, torch.Size]:
        return {name: full_shape(p) for name, p in self.params.items()}

    def from_full(self, full: dict[str, torch.Tensor]) -> None:
        """Load full EMA tensors (from a merged checkpoint), keeping this rank's slice under ZeRO-3."""
        if not self.partitioned:
            self.load_state_dict(full)
            return
        for name, shadow in self.shadow.items():
            flat = full[name].reshape(-1).float()
            per_rank = shadow.numel()
            start = self.rank * per_rank
            part = flat[start : start + per_rank]
            shadow.zero_()
            shadow[: part.numel()].copy_(part)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Full EMA tensors on every rank; a collective (all-gather) under ZeRO-3, so call it on all ranks."""
        if not self.partitioned:
            return self.state_dict()
        shapes = self.shapes()
        full = {}
        for name, local in self.shadow.items():
            slices = [torch.empty_like(local) for _ in range(self.world_size)]
            torch.distributed.all_gather(slices, local)
            full[name] = full_from_slices([s.cpu() for s in slices], shapes[name])
        return full
