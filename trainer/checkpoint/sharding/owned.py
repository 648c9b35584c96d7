"""What this process holds of the training state, as pieces of full tensors by name, and how it puts them back.

A checkpoint stores full tensors by name (the weights in fp32, the EMA, Adam's two moments), whatever the
sharding, so that any number of processes at any ZeRO stage reads it back. Each process writes the pieces of
those tensors it owns, straight into the checkpoint's files (``formats/base.py``):

  ZeRO-1/2 (and DeepSpeed's bf16 optimizer)  the fragment of each parameter in this rank's flat fp32
                                             partition (master weights and Adam state alike)
  ZeRO-3                                     this rank's slice of each parameter (padded to a multiple of the
                                             world size and cut evenly), the EMA's slices likewise
  replicated state (one process, DDP, an     an even share of the section's tensors end to end (``shares``),
  unpartitioned EMA)                         so that every process writes as much, none twice, and each one
                                             a stretch of the file of its own

Every piece is written once, by one process; together they tile every tensor. Weights are the fp32 master
weights where DeepSpeed keeps them (the module may hold bf16 copies). Tensors of the model that are not
trained (buffers; frozen parameters) are written whole by rank 0, or under ZeRO-3 in slices like the rest.

A resume reads back exactly what this launch needs (``restore``): each rank's own pieces of the master
weights, moments and EMA, cut for this launch's layout (its files know nothing of who wrote them, so another
number of processes or another stage needs nothing else), and where the model keeps whole weights on every
rank (one process, DDP, ZeRO-1/2), the whole weights, cast to the module's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from launch import Topology
from trainer.checkpoint import deepspeed_compat as compat
from trainer.checkpoint.states import TrainingStates, unwrap_model
from trainer.storage.tensor_files import FileLayout, TensorSpec, safetensors_layout

ADAM_STATES = ("exp_avg", "exp_avg_sq")
WEIGHTS, EMA = "state_dict", "ema_state_dict"
"""Sections of the model file (the merged checkpoint users load); the optimizer file's are ``ADAM_STATES``."""

Read = Callable[[str, int, torch.Tensor], None]
"""``read(key, start, dest)``: fill ``dest`` (any shape, dtype or device; row-major) with ``dest.numel()``
elements of the stored tensor ``key``, flattened, from element ``start`` on."""


def key(section: str, name: str) -> str:
    return f"{section}/{name}"


@dataclass
class Piece:
    """Elements ``start .. start + data.numel()`` of the flattened full tensor ``key``."""

    key: str
    start: int
    data: torch.Tensor
    """1-D; a view of the live state, or a copy."""


def shares(sizes: dict[str, int], rank: int, world_size: int) -> dict[str, tuple[int, int]]:
    """(first element, count) of ``rank``'s share of each tensor of ``sizes`` (name → elements, in file
    order), when the tensors, end to end, are cut into ``world_size`` stretches as even as can be: each rank's
    pieces are then next to each other in the file. Tensors outside the rank's stretch get (0, 0)."""
    total = sum(sizes.values())
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    out, offset = {}, 0
    for name, numel in sizes.items():
        start, end = max(lo, offset), min(hi, offset + numel)
        out[name] = (start - offset, end - start) if start < end else (0, 0)
        offset += numel
    return out


class OwnedState:
    """This rank's pieces of the training state registered in ``states``, for a launch of ``topo``."""

    def __init__(self, states: TrainingStates, topo: Topology) -> None:
        self.states, self.topo = states, topo
        self.engine = states.model
        self.module = unwrap_model(states.model)
        self.trained = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        params = list(self.trained.values())
        if topo.deepspeed_stage is not None and any(hasattr(p, "ds_id") for p in params):
            self.layout = "zero3"
        elif topo.deepspeed_stage is not None and any(compat.has_zero12_fragments(p) for p in params):
            self.layout = "fragments"
        else:
            self.layout = "replicated"
        sizes = {name: p.numel() for name, p in self.trained.items()}
        spans = shares(sizes, topo.rank, topo.world_size)
        self._replicated = {id(p): spans[name] for name, p in self.trained.items()}
        """This rank's share of each trained tensor where every rank holds all of it (``shares``)."""
        self._views_stay = self.layout == "zero3" and compat.zero3_views_stay(self.engine)
        self._pieces: tuple[list[Piece], list[Piece]] | None = None
        self._live = True
        """Whether every piece made so far is a view of the live state (none a copy, none made of zeros)."""

    # -- what the files hold ----------------------------------------------------------------------

    @cached_property
    def moments_layout(self) -> FileLayout:
        """The optimizer file's layout (the same on every rank, and from one save to the next)."""
        return safetensors_layout(self.moment_specs)

    @cached_property
    def weight_specs(self) -> dict[str, TensorSpec]:
        """The model file's ``state_dict``: every tensor of the module's state dict, floating ones in fp32."""
        specs = {}
        for name, tensor in self._module_state().items():
            dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
            specs[name] = TensorSpec(dtype, tuple(compat.full_shape(tensor)))
        return specs

    @cached_property
    def ema_specs(self) -> dict[str, TensorSpec]:
        return {
            name: TensorSpec(torch.float32, tuple(shape)) for name, shape in self.states.ema.shapes().items()
        }

    @cached_property
    def moment_specs(self) -> dict[str, TensorSpec]:
        return {
            key(state, name): TensorSpec(torch.float32, tuple(compat.full_shape(p)))
            for state in ADAM_STATES
            for name, p in self.trained.items()
        }

    def check(self, layouts: Iterable[FileLayout]) -> None:
        """That the files of ``layouts`` hold every tensor ``restore`` reads, at its shape (``ValueError``)."""
        stored = {key: spec for layout in layouts for key, spec in layout.specs.items()}
        wanted = {**{key(WEIGHTS, n): s for n, s in self.weight_specs.items()},
                  **{key(EMA, n): s for n, s in self.ema_specs.items()}, **self.moment_specs}  # fmt: skip
        for name, spec in wanted.items():
            if name not in stored:
                raise ValueError(f"no tensor {name}")
            if (
                stored[name].shape != spec.shape
                or stored[name].dtype.is_floating_point != spec.dtype.is_floating_point
            ):
                raise ValueError(f"{name} is {stored[name]}, not {spec}")

    def _module_state(self) -> dict[str, torch.Tensor]:
        """The module's state dict, with ZeRO-3's [0]-shaped placeholders (``full_shape`` has their shape)."""
        named = dict(self.module.named_parameters())
        return {
            name: named.get(name, tensor) for name, tensor in self.module.state_dict(keep_vars=True).items()
        }

    # -- saving -----------------------------------------------------------------------------------

    def pieces(self) -> tuple[list[Piece], list[Piece]]:
        """(``model_pieces``, ``optimizer_pieces``): made once and kept while they are all views of the live
        state (they follow it as it trains), else made anew each time; a resume makes them anew."""
        if self._pieces is not None:
            return self._pieces
        self._live = True
        made = self.model_pieces(), self.optimizer_pieces()
        if self._live:
            self._pieces = made
        return made

    def model_pieces(self) -> list[Piece]:
        """This rank's pieces of the model file: fp32 master weights, the EMA, and the untrained tensors."""
        pieces = []
        for name, tensor in self._module_state().items():
            p = self.trained.get(name)
            if p is not None:
                pieces += self._owned(key(WEIGHTS, name), p, self._master)
            else:  # a buffer or frozen parameter: no master copy, no optimizer state
                pieces += self._untrained(key(WEIGHTS, name), tensor)
        pieces += self._ema_pieces()
        return pieces

    def optimizer_pieces(self) -> list[Piece]:
        """This rank's pieces of Adam's moments (zeros before the first step)."""
        return [
            piece
            for state in ADAM_STATES
            for name, p in self.trained.items()
            for piece in self._owned(key(state, name), p, lambda q, s=state: self._moment(q, s))  # type: ignore[misc]
        ]

    def adam_steps(self) -> dict[str, float]:
        """Adam's step count by parameter (one count for all under DeepSpeed)."""
        if self.layout == "replicated":
            optimizer = self.states.optimizer
            return {name: _step_of(optimizer.state.get(p)) for name, p in self.trained.items()}
        step = compat.optimizer_step(self.engine)
        return dict.fromkeys(self.trained, step)

    def engine_counters(self) -> dict[str, float]:
        return compat.engine_counters(self.engine) if self.topo.deepspeed_stage is not None else {}

    def _owned(
        self, name: str, p: nn.Parameter, values: Callable[[nn.Parameter], torch.Tensor | None]
    ) -> list[Piece]:
        """The piece of trained parameter ``p`` this rank owns, with ``values(p)``: the values of that piece
        (a 1-D view) for DeepSpeed's layouts, the whole tensor when replicated (None: zeros)."""
        if self.layout == "fragments":
            fragment = compat.zero12_fragment(p)
            if fragment is None:
                return []
            start, count = fragment[0], fragment[1].numel()
        elif self.layout == "zero3":
            start, count = self._zero3_span(p)
        else:
            start, count = self._replicated[id(p)]
            if not count:
                return []
        data = values(p)
        if data is None:  # no optimizer state yet: Adam's zeros
            self._live = False
            return [Piece(name, start, torch.zeros(count))]
        flat = data.reshape(-1)
        if self.layout == "fragments":  # the fragment itself
            return [Piece(name, start, flat)]
        if self.layout == "zero3":  # this rank's slice, without its padding
            return [Piece(name, start, flat[:count])]
        return [Piece(name, start, flat[start : start + count])]  # this rank's share of the whole tensor

    def _master(self, p: nn.Parameter) -> torch.Tensor:
        if self.layout == "fragments":
            fragment = compat.zero12_fragment(p)
            assert fragment is not None
            return fragment[1]
        if self.layout == "zero3":
            from deepspeed.utils import safe_get_local_fp32_param

            return self._kept(safe_get_local_fp32_param(p))
        return self._float(p.detach())

    def _moment(self, p: nn.Parameter, state: str) -> torch.Tensor | None:
        if self.layout == "fragments":
            return compat.zero12_moment(p, state)
        if self.layout == "zero3":
            from deepspeed.utils import safe_get_local_optimizer_state

            try:
                return self._kept(safe_get_local_optimizer_state(p, state))
            except KeyError:  # no optimizer state before the first step
                return None
        saved = self.states.optimizer.state.get(p) or {}
        return saved.get(state)

    def _kept(self, local: torch.Tensor) -> torch.Tensor:
        """A ZeRO-3 local tensor as it may be held until it is written: itself where it is a view of the
        partitions that stays valid, else a copy (``compat.zero3_views_stay``)."""
        if self._views_stay:
            return local
        self._live = False
        return local.clone()

    def _float(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in fp32: itself, or a copy (then the pieces are not kept)."""
        if tensor.dtype == torch.float32:
            return tensor
        self._live = False
        return tensor.float()

    def _ema_pieces(self) -> list[Piece]:
        ema, pieces = self.states.ema, []
        for name, shadow in ema.state_dict().items():
            p = self.trained[name]
            if ema.partitioned:
                start, count = self._zero3_span(p)
                pieces.append(Piece(key(EMA, name), start, shadow.reshape(-1)[:count]))
            else:
                start, count = self._replicated[id(p)]
                if count:
                    pieces.append(Piece(key(EMA, name), start, shadow.reshape(-1)[start : start + count]))
        return pieces

    def _untrained(self, name: str, tensor: torch.Tensor) -> list[Piece]:
        part = compat.zero3_slice(tensor)
        if part is not None:  # a frozen ZeRO-3 parameter: every rank writes its slice
            start, count = self._zero3_span(tensor)
            return [Piece(name, start, self._float(part.detach().reshape(-1)[:count]))]
        if not self.topo.is_main:
            return []
        data = tensor.detach().reshape(-1)
        return [Piece(name, 0, self._float(data) if data.is_floating_point() else data)]

    def _zero3_span(self, p: Any) -> tuple[int, int]:
        per_rank = compat.zero3_slice(p).numel()  # type: ignore[union-attr]
        numel = math.prod(compat.full_shape(p))
        start = min(numel, self.topo.rank * per_rank)
        return start, max(0, min(per_rank, numel - start))

    # -- resuming -----------------------------------------------------------------------------------

    def restore(self, read: Read, steps: dict[str, float], counters: dict[str, float]) -> None:
        """Load the stored state into the live model, optimizer and EMA (collective under ZeRO-3)."""
        self._pieces = None  # the optimizer's state may be new tensors now (one process, DDP)
        if self.topo.deepspeed_stage is not None:
            compat.create_adam_state(self.engine)  # the state to read into (torch's AdamW makes it lazily)
        if self.layout == "zero3":
            with compat.zero3_checkpoint_events(self.engine):
                self._restore_tensors(read, steps)
        else:
            self._restore_tensors(read, steps)
        if self.topo.deepspeed_stage is not None:
            compat.set_optimizer_step(self.engine, max(steps.values(), default=0.0))
            compat.restore_engine_counters(self.engine, counters)

    def _restore_tensors(self, read: Read, steps: dict[str, float]) -> None:
        with torch.no_grad():
            for name, tensor in self._module_state().items():
                p = self.trained.get(name)
                if p is None:
                    self._restore_untrained(read, key(WEIGHTS, name), tensor)
                elif self.layout == "fragments":
                    self._restore_fragment(read, name, p)
                elif self.layout == "zero3":
                    self._restore_slice(read, name, p)
                else:
                    self._restore_replicated(read, name, p, steps.get(name, 0.0))
            self._restore_ema(read)

    def _restore_replicated(self, read: Read, name: str, p: nn.Parameter, step: float) -> None:
        read(key(WEIGHTS, name), 0, p.data)
        state = {"step": torch.tensor(step, dtype=torch.float32)}
        for moment in ADAM_STATES:
            value = torch.empty(p.shape, dtype=torch.float32)
            read(key(moment, name), 0, value)
            state[moment] = value.to(p.device)
        self.states.optimizer.state[p] = state

    def _restore_fragment(self, read: Read, name: str, p: nn.Parameter) -> None:
        read(key(WEIGHTS, name), 0, p.data)  # every rank keeps whole (bf16 or fp32) weights
        fragment = compat.zero12_fragment(p)
        if fragment is None:
            return
        start, hp = fragment
        read(key(WEIGHTS, name), start, hp)
        for moment in ADAM_STATES:
            view = compat.zero12_moment(p, moment)
            assert view is not None, "create_adam_state linked no optimizer state"
            read(key(moment, name), start, view)

    def _restore_slice(self, read: Read, name: str, p: nn.Parameter) -> None:
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        start, count = self._zero3_span(p)
        part = compat.zero3_slice(p)
        assert part is not None
        if self._views_stay:  # straight into the partitions (the padding after the slice stays zero)
            master = safe_get_local_fp32_param(p)
            master[count:].zero_()
            read(key(WEIGHTS, name), start, master[:count])
            part.copy_(master)
            for moment in ADAM_STATES:
                state = safe_get_local_optimizer_state(p, moment)
                state[count:].zero_()
                read(key(moment, name), start, state[:count])
            return
        local = torch.zeros(part.numel(), dtype=torch.float32)
        read(key(WEIGHTS, name), start, local[:count])
        safe_set_local_fp32_param(p, local.to(part.device))
        part.copy_(local.to(part.dtype))
        for moment in ADAM_STATES:
            local.zero_()
            read(key(moment, name), start, local[:count])
            safe_set_local_optimizer_state(p, local.to(part.device), moment)

    def _restore_untrained(self, read: Read, name: str, tensor: torch.Tensor) -> None:
        part = compat.zero3_slice(tensor)
        if part is not None:
            start, count = self._zero3_span(tensor)
            local = torch.zeros(part.numel(), dtype=torch.float32)
            read(name, start, local[:count])
            part.copy_(local.to(part.dtype))
        else:
            read(name, 0, tensor.data)

    def _restore_ema(self, read: Read) -> None:
        ema = self.states.ema
        for name, shadow in ema.state_dict().items():
            if ema.partitioned:
                start, count = self._zero3_span(self.trained[name])
                shadow.zero_()
                read(key(EMA, name), start, shadow.reshape(-1)[:count])
            else:
                read(key(EMA, name), 0, shadow.reshape(-1))


def _step_of(state: dict[str, Any] | None) -> float:
    step = (state or {}).get("step", 0.0)
    return float(step.item() if isinstance(step, torch.Tensor) else step)
