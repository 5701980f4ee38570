"""How many sequences fit: the state pool's bytes plus the step's activation peak, against the device's memory.

A sequence's state (runtime/state_pool.py) is sized for the artifact's max_seq_len, because the plans' state
shapes are static: window rings and compressor rings hold a fixed number of positions whatever the context, and
each compressed cache holds `max_seq_len // ratio + 1` rows (model/step.py `state_shapes`: its entries and the
spill row), in whatever layout the plans store them (packed: passes/kv_compression.py). `StateLayout` splits a
sequence's bytes that way, per compressed layer kind (`C4`, `C128`: every layer of that ratio), and gives them at
any context: the bytes per sequence of an artifact compiled with `--max-seq-len` that context.

The activation peak of each step variant is the memory-planning pass's (passes/memory_planning.py): the bytes
its intermediates need at once, a polynomial in the batch, recorded in the manifest's pass log as integer
coefficients (`peak_polynomial`). No planned intermediate grows with the cache length (what reads a whole cache is
one fused op), so the same peak holds at any max_seq_len. The loader sizes its pool by it and the state bytes;
`capacity_rows` is the table `dsv4c inspect` prints: per context, how many sequences fit in a memory budget
after the weights. Everything here is arithmetic on the manifest and the plans; runtime/device_memory.py asks the
machine how much memory there is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

from dsv4c.model.config import MAX_DRAFTS, ModelConfig
from dsv4c.model.layout import layer_prefix
from dsv4c.runtime.plan import Plan
from dsv4c.runtime.state_pool import PREFILL_ROWS, StateSpec

PLANNER = "memory_planning"
COMPRESSED_CACHES = ("compressed_kv", "indexer_kv")
REPORT_CONTEXTS = (4096, 65536, 262144, 1048576)  # the contexts the capacity table lists (up to the model's limit)
# Decode, MTP verification of up to MAX_DRAFTS drafts, and the MTP draft steps: the variants a token's step runs.
PER_TOKEN_VARIANTS = tuple(f"{kind}_t{t}" for kind in ("main", "mtp") for t in range(1, MAX_DRAFTS + 2))


def prefill_variants(chunk: int) -> tuple[str, ...]:
    """The variants a prompt's prefill runs, one sequence at a time on the pool's prefill row: whole chunks of
    `chunk` tokens and single tokens for the rest, main model and MTP layer."""
    return tuple(f"{kind}_t{t}" for kind in ("main", "mtp") for t in sorted({1, chunk}))


# ---- state bytes ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerKind:
    """The compressed layers of one ratio: how many, and the bytes one entry row of all their caches takes."""

    ratio: int
    layers: int
    row_bytes: int  # one entry of every cache of every such layer (main KV and, for C4, the indexer's keys)

    @property
    def name(self) -> str:
        return f"C{self.ratio}"

    def bytes_per_token(self) -> float:
        """What one more position of context adds, over all layers of this kind."""
        return self.row_bytes / self.ratio

    def bytes_at(self, context: int) -> int:
        """The caches' bytes for a capacity of `context` positions: its entries and the spill row."""
        return self.row_bytes * (context // self.ratio + 1)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """A sequence's state bytes: `fixed` (window and compressor rings, whatever the context) plus, per compressed
    layer kind, caches that grow with it."""

    fixed: int
    kinds: tuple[LayerKind, ...]

    def bytes_per_sequence(self, context: int) -> int:
        return self.fixed + sum(kind.bytes_at(context) for kind in self.kinds)

    def bytes_per_token(self) -> float:
        return sum(kind.bytes_per_token() for kind in self.kinds)


def state_layout(specs: Mapping[str, StateSpec], cfg: ModelConfig) -> StateLayout:
    """The layout of the state `specs` (each compressed cache's row as the specs store it: packed or not)."""
    rows: dict[int, list[int]] = {}
    caches = set()
    for layer, ratio in enumerate(cfg.compress_ratios[:cfg.n_layers_total]):
        names = [layer_prefix(cfg, layer) + cache for cache in COMPRESSED_CACHES]
        names = [name for name in names if name in specs]
        if ratio and names:
            rows.setdefault(ratio, []).append(sum(specs[n].bytes_per_sequence() // specs[n].shape[0] for n in names))
            caches.update(names)
    fixed = sum(spec.bytes_per_sequence() for name, spec in specs.items() if name not in caches)
    return StateLayout(fixed, tuple(LayerKind(ratio, len(each), sum(each)) for ratio, each in sorted(rows.items())))


def weight_bytes(plans: Mapping[str, Plan]) -> int:
    """Bytes of the weights the plans read, as stored (each `weights.*` input once, however many plans read it;
    the plans' small constant tables aside)."""
    sizes = {spec.name: math.prod(spec.shape) * spec.torch_dtype().itemsize
             for plan in plans.values() for spec in plan.inputs if spec.name.startswith("weights.")}
    return sum(sizes.values())


# ---- step activations ----------------------------------------------------------------------------------
def activation_bytes(manifest: Mapping[str, Any], variant: str, batch: int) -> int | None:
    """Peak bytes of `variant`'s intermediates at `batch` sequences, or None where no plan was recorded."""
    for entry in manifest.get("pass_log", []):
        if isinstance(entry, dict) and entry.get("variant") == variant:
            for record in entry.get("passes", []):
                coefficients = (record.get("details") or {}).get("peak_polynomial")
                if record.get("name") == PLANNER and isinstance(coefficients, list):
                    return sum(int(c) * batch ** i for i, c in enumerate(coefficients))
    return None


def step_bytes(manifest: Mapping[str, Any], variants: Iterable[str], batch: int, state_per_sequence: int,
               prefill: Iterable[str] = ()) -> int:
    """The pool of `batch` sequences and its prefill row, plus the largest activation peak among `variants` at
    that batch and `prefill` at one sequence."""
    peaks = [activation_bytes(manifest, v, batch) or 0 for v in variants]
    peaks += [activation_bytes(manifest, v, 1) or 0 for v in prefill]
    return (batch + PREFILL_ROWS) * state_per_sequence + max(peaks, default=0)


def largest_fitting(manifest: Mapping[str, Any], variants: Iterable[str], buckets: Iterable[int],
                    state_per_sequence: int, free_bytes: int, prefill: Iterable[str] = ()) -> int | None:
    """The largest bucket whose pool and activations fit in `free_bytes`, or None if not even one does."""
    variants, prefill = list(variants), list(prefill)
    fitting = [b for b in buckets if step_bytes(manifest, variants, b, state_per_sequence, prefill) <= free_bytes]
    return max(fitting, default=None)


def max_sequences(manifest: Mapping[str, Any], variants: Iterable[str], state_per_sequence: int,
                  free_bytes: int, prefill: Iterable[str] = ()) -> int:
    """The most sequences whose pool and activations fit in `free_bytes` (0 if not even one does). The need only
    grows with the batch (the peak's coefficients are byte counts), so bisection finds it."""
    variants, prefill = list(variants), list(prefill)
    fits = lambda n: step_bytes(manifest, variants, n, state_per_sequence, prefill) <= free_bytes  # noqa: E731
    low, high = 0, max(free_bytes, 0) // max(state_per_sequence, 1)  # fits(low); nothing above high fits
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


# ---- the capacity table --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """Device memory for the weights, the state pool and the step activations, and where the figure comes from."""

    bytes: int
    source: str


@dataclasses.dataclass(frozen=True)
class CapacityRow:
    """Pool rows of `context` positions: a sequence's state bytes, and how many sequences fit."""

    context: int
    state_per_sequence: int
    sequences: int


def report_contexts(max_seq_len: int, max_position_embeddings: int) -> tuple[int, ...]:
    """`REPORT_CONTEXTS` the model reaches, and the artifact's own max_seq_len, in order."""
    return tuple(sorted({c for c in REPORT_CONTEXTS if c <= max_position_embeddings} | {max_seq_len}))


def capacity_rows(layout: StateLayout, manifest: Mapping[str, Any], variants: Iterable[str], free_bytes: int,
                  contexts: Iterable[int], prefill: Iterable[str] = ()) -> list[CapacityRow]:
    """Per context, the state bytes of one sequence and how many such sequences fit beside the activation peaks
    of `variants` (and of `prefill` at one sequence) in `free_bytes` (the budget left after the weights)."""
    variants, prefill = list(variants), list(prefill)
    rows = []
    for context in contexts:
        state = layout.bytes_per_sequence(context)
        rows.append(CapacityRow(context, state, max_sequences(manifest, variants, state, free_bytes, prefill)))
    return rows
