"""The state pool: every cache and compressor state of `rows` sequence slots, allocated once.

A batch of n sequences uses rows 0..n-1 (`rows(n)` gives views, so a step that writes its state in place
writes into the pool). Nothing is reallocated between steps: compiled steps update their state inputs in
place (passes/reinplace_state.py), and the CUDA graphs of the step runner are captured over these views.
Every row holds the artifact's max_seq_len positions; runtime/capacity.py says what that costs per layer kind and
how many rows fit.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """One state tensor per sequence: its shape without the batch dim, dtype and initial fill."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float

    def bytes_per_sequence(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


class StatePool:
    """Fixed state tensors `[rows, *shape]` per name on one device."""

    def __init__(self, specs: Mapping[str, StateSpec], rows: int, device: torch.device | str):
        if rows < 1:
            raise ValueError(f"state pool: needs at least one row, got {rows}")
        self.specs, self.capacity, self.device = dict(specs), rows, torch.device(device)
        self.tensors = {name: torch.full((rows, *s.shape), s.fill, dtype=s.dtype, device=self.device)
                        for name, s in self.specs.items()}

    def rows(self, n: int) -> dict[str, torch.Tensor]:
        """Views of rows 0..n-1 of every state tensor."""
        if not 1 <= n <= self.capacity:
            raise ValueError(f"batch {n}: the state pool holds 1 to {self.capacity} sequences")
        return {name: tensor[:n] for name, tensor in self.tensors.items()}

    def reset(self, n: int) -> dict[str, torch.Tensor]:
        """Rows 0..n-1 set to their initial fill (a fresh batch), as views."""
        views = self.rows(n)
        for name, view in views.items():
            view.fill_(self.specs[name].fill)
        return views

    def holds(self, state: Mapping[str, torch.Tensor]) -> int | None:
        """n if `state` is exactly `rows(n)` of this pool (same names and storage), else None."""
        if state.keys() != self.tensors.keys():
            return None
        sizes = {t.shape[0] for t in state.values()}
        if len(sizes) != 1:
            return None
        for name, tensor in state.items():
            pooled = self.tensors[name]
            if tensor.data_ptr() != pooled.data_ptr() or tensor.stride() != pooled.stride():
                return None
        return sizes.pop()
