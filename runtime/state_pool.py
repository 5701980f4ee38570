"""The state pool: every cache and compressor state of `rows` sequence slots, and one prefill row, allocated once.

A batch of n sequences uses rows 0..n-1 (`rows(n)` gives views, so a step that writes its state in place
writes into the pool; the same view objects every call, so a runner recognises them by identity instead of
comparing storage tensor by tensor). A prompt is prefilled in the prefill row, a row past the slots at a fixed
address (`prefill_row()`; `holds_prefill_row` recognises it), then copied into its slot (`commit_prefill`): the
prefill steps then run over the same buffers whichever slot the request takes, so the step runner captures them
in CUDA graphs once, as it does the decode steps over rows 0..n-1. Nothing is reallocated between steps: compiled
steps update their state inputs in place (passes/reinplace_state.py), and the CUDA graphs of the step runner are
captured over these views. Every row holds the artifact's max_seq_len positions; runtime/capacity.py says what that
costs per layer kind and how many rows fit (the prefill row counted: `PREFILL_ROWS`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

PREFILL_ROWS = 1  # rows the pool holds beyond its sequence slots: the prefill row


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
    """Fixed state tensors `[rows + PREFILL_ROWS, *shape]` per name on one device: `rows` sequence slots (the
    `capacity`), then the prefill row."""

    def __init__(self, specs: Mapping[str, StateSpec], rows: int, device: torch.device | str):
        if rows < 1:
            raise ValueError(f"state pool: needs at least one row, got {rows}")
        self.specs, self.capacity, self.device = dict(specs), rows, torch.device(device)
        self.tensors = {name: torch.full((rows + PREFILL_ROWS, *s.shape), s.fill, dtype=s.dtype, device=self.device)
                        for name, s in self.specs.items()}
        self._views: dict[int, dict[str, torch.Tensor]] = {}  # rows(n)'s views, made once per n
        self._prefill = {name: tensor[rows:rows + 1] for name, tensor in self.tensors.items()}
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

    def prefill_row(self) -> dict[str, torch.Tensor]:
        """Views `[1, *shape]` of the prefill row (the same views every call), reset to their initial fill."""
        for name, view in self._prefill.items():
            view.fill_(self.specs[name].fill)
        return dict(self._prefill)

    def commit_prefill(self, slot: int) -> None:
        """Copy the prefill row into sequence slot `slot` (the prompt's state, ready for the batch's steps)."""
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot}: the state pool has slots 0 to {self.capacity - 1}")
        for name, view in self._prefill.items():
            self.tensors[name][slot:slot + 1].copy_(view)

    def holds_prefill_row(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> bool:
        """Whether the entries `prefix + name` of `state`, one for each tensor of this pool, are the prefill row
        (its views, or other views of the same storage with the same strides)."""
        for key, name in self._prefixed(prefix).items():
            tensor, row = state.get(key), self._prefill[name]
            if tensor is row:
                continue
            if (tensor is None or tensor.shape != row.shape or tensor.data_ptr() != row.data_ptr()
                    or tensor.stride() != row.stride()):
                return False
        return True

    def _prefixed(self, prefix: str) -> dict[str, str]:
        keys = self._keys.get(prefix)
        if keys is None:
            keys = self._keys[prefix] = {prefix + name: name for name in self.tensors}
        return keys

    def holds(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> int | None:
        """n if the entries `prefix + name` of `state`, one for each tensor of this pool, are exactly `rows(n)`
        (the views `rows` handed out, by identity; other views of the same rows by their data pointers and
        strides), else None. Entries without the prefix are not looked at."""
        keys = self._prefixed(prefix)
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
