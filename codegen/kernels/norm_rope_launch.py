"""Launch choice of the row kernel of RMSNorm / RoPE (codegen/kernels/norm_rope.py).

Pure Python (no Triton import). One program a row holds the whole row in registers; the warps per program grow
with the row so that each thread holds at most 16 fp32 values (Flash: 512-dim heads and KV rows, 1024-dim q_lora,
4096-dim hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_VALUES_PER_THREAD = 16
MAX_WARPS = 16


@dataclass(frozen=True)
class RowLaunch:
    """num_warps: Triton's warps per program (one program a row)."""

    num_warps: int

    def __post_init__(self) -> None:
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"row launch: num_warps {self.num_warps} must be a power of two from 1 to 32")


def row_launch(width_p2: int) -> RowLaunch:
    """4 warps up to rows of 2048 values, then enough for at most 16 values a thread (at most 16 warps)."""
    warps = 4
    while warps < MAX_WARPS and width_p2 > warps * 32 * MAX_VALUES_PER_THREAD:
        warps *= 2
    return RowLaunch(warps)
