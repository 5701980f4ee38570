"""The state pool: every cache and compressor state of `rows` sequence slots, allocated once.

A batch of n sequences uses rows 0..n-1 (`rows(n)` gives views, so a step that writes its state in place
writes into the pool; the same view objects every call, so a runner recognises them by identity instead of
comparing storage tensor by tensor). Nothing is reallocated between steps: compiled steps update their state
inputs in place (passes/reinplace_state.py), and the CUDA graphs of the step runner are captured over these
views. Every row holds the artifact's max_seq_len positions; runtime/capacity.py says what that costs per layer kind and
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
        self._views: dict[int, dict[str, torch.Tensor]] = {}  # rows(n)'s views, made once per n
        self._keys: dict[str, dict[str, str]] = {}  # per prefix: prefix + name -> name

    def rows(self, n: int) -> dict[str, torch.Tensor]:
        """Views of rows 0..n-1 of every state tensor."""
        if not 1 <= n <= self.capacity:
            raise ValueError(f"batch {n}: the state pool holds 1 to {self.capacity} sequences")
        views = self._views.get(n)
        if views is None:
            views = self._views[n] = {name: tensor[:n] for name, tensor in self.tensors.items()}
        return dict(views)

    def reset(self, n: int) -> dict[str, torch.Tensor]:
        """Rows 0..n-1 set to their initial fill (a fresh batch), as views."""
        views = self.rows(n)
        for name, view in views.items():
            view.fill_(self.specs[name].fill)
        return views

    def holds(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> int | None:
        """n if the entries `prefix + name` of `state`, one for each tensor of this pool, are exactly `rows(n)`
        (the views `rows` handed out, by identity; other views of the same rows by their data pointers and
        strides), else None. Entries without the prefix are not looked at."""
        keys = self._keys.get(prefix)
        if keys is None:
            keys = self._keys[prefix] = {prefix + name: name for name in self.tensors}
        first = state.get(next(iter(keys)))
        if first is None or first.dim() == 0:
            return None
        n = first.shape[0]
        views = self._views.get(n)
        if views is not None and all(state.get(key) is views[name] for key, name in keys.items()):
            return n
        for key, name in keys.items():
            tensor, pooled = state.get(key), self.tensors[name]
            if (tensor is None or tensor.shape[0] != n or tensor.data_ptr() != pooled.data_ptr()
                    or tensor.stride() != pooled.stride()):
                return None
        return n
