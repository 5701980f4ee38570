"""The Walsh-Hadamard butterflies in Triton, shared by the kernels that rotate a row before rounding it (the fused
compressor's indexer keys, codegen/kernels/compressor.py; the indexer queries, codegen/kernels/hadamard_rounding.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def hadamard_butterflies(x, N: tl.constexpr, STAGES: tl.constexpr):
    """model/quant.py `hadamard`'s butterflies (unnormalised) on fp32 x `[N]`, N = 2^STAGES: stage s pairs
    (i, i + h) in blocks of 2h, h = 2^s, into (a + b, a - b), the same additions in the same order, so the same
    fp32 bits."""
    for stage in tl.static_range(STAGES):  # h = 2^stage
        pairs = tl.permute(tl.reshape(x, (N >> (stage + 1), 2, 1 << stage)), (0, 2, 1))
        a, b = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (N,))
    return x
