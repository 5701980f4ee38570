"""How many sequences fit: the state pool's bytes plus the step's activation peak, against the device's memory.

The activation peak of each step variant is the memory-planning pass's (passes/memory_planning.py): the bytes
its intermediates need at once, a polynomial in the batch, recorded in the manifest's pass log as integer
coefficients (`peak_polynomial`). The loader sizes its pool by it and refuses a batch that cannot fit, naming
the largest that can.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

PLANNER = "memory_planning"


def activation_bytes(manifest: Mapping[str, Any], variant: str, batch: int) -> int | None:
    """Peak bytes of `variant`'s intermediates at `batch` sequences, or None where no plan was recorded."""
    for entry in manifest.get("pass_log", []):
        if isinstance(entry, dict) and entry.get("variant") == variant:
            for record in entry.get("passes", []):
                coefficients = (record.get("details") or {}).get("peak_polynomial")
                if record.get("name") == PLANNER and isinstance(coefficients, list):
                    return sum(int(c) * batch ** i for i, c in enumerate(coefficients))
    return None


def step_bytes(manifest: Mapping[str, Any], variants: Iterable[str], batch: int, state_per_sequence: int) -> int:
    """The pool of `batch` sequences plus the largest activation peak among `variants` at that batch."""
    peaks = [activation_bytes(manifest, v, batch) or 0 for v in variants]
    return batch * state_per_sequence + max(peaks, default=0)


def largest_fitting(manifest: Mapping[str, Any], variants: Iterable[str], buckets: Iterable[int],
                    state_per_sequence: int, free_bytes: int) -> int | None:
    """The largest bucket whose pool and activations fit in `free_bytes`, or None if not even one does."""
    variants = list(variants)
    fitting = [b for b in buckets if step_bytes(manifest, variants, b, state_per_sequence) <= free_bytes]
    return max(fitting, default=None)
