"""`dsv4c::hadamard_fake_quant_fp4` (codegen/hadamard_rounding.py) in Triton: the Lightning Indexer's query rounding,
`quant.fake_quant_fp4(quant.hadamard(x), block)`, one launch where the captured graph runs three aten kernels a
butterfly stage (an add, a subtract, a stack: 21 for 128 dims) and four more around them.

A program rotates one row of N = 2^STAGES values: x in fp32 (bf16 converted from its bits: exact, and right under
Triton's CPU interpreter, which converts bf16 subnormals wrongly), the butterflies of `hadamard_butterflies` (the
model's additions in the model's order), times the normalisation 1/sqrt(N) in fp32 (the fp32 value of the Python
float the model multiplies by), rounded to x's dtype as the model's cast does (`rounded_to`); then each block of
`block` values is rounded to e2m1 with its power-of-two scale (`number_formats.block_rounded`, the activation
roundings' rounding) and stored times that scale, in x's dtype. Every step is the model's fp32 operation on the same
operands, so the result is the reference's bit for bit; a row holding a NaN or an inf is NaN throughout (the
butterflies spread it over the row, the rounding of a non-finite block is NaN). On CUDA the kernel is launched as
its predecessor's programmatic dependent (codegen/kernels/pdl.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv4c.codegen.hadamard_rounding import check_operands
from dsv4c.codegen.kernels.hadamard import hadamard_butterflies
from dsv4c.codegen.kernels.number_formats import block_rounded, exactly_to, rounded_to
from dsv4c.codegen.kernels.pdl import after_predecessor, launch_options
from dsv4c.model import quant



@triton.jit
def _load_fp32(pointers):
    """Values as fp32, bf16 converted by its bits."""
    if pointers.dtype.element_ty == tl.bfloat16:
        bits = tl.load(pointers).to(tl.int16, bitcast=True)
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(pointers).to(tl.float32)


@triton.jit
def _hadamard_fp4_kernel(x_ptr, out_ptr, normalisation, N: tl.constexpr, STAGES: tl.constexpr, BLOCK: tl.constexpr,
                         FMT_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, PDL: tl.constexpr):
    """Row program_id(0) of x [rows, N] -> out [rows, N], both contiguous, in x's dtype."""
    after_predecessor(PDL)
    offsets = tl.program_id(0).to(tl.int64) * N + tl.arange(0, N)
    x = hadamard_butterflies(_load_fp32(x_ptr + offsets), N, STAGES)
    x = rounded_to(x * normalisation, out_ptr.dtype.element_ty)
    values, scale = block_rounded(tl.reshape(x, (N // BLOCK, BLOCK)), FMT_MAX, AMAX_FLOOR)
    rounded = tl.reshape(values * scale[:, None], (N,))
    tl.store(out_ptr + offsets, exactly_to(rounded, out_ptr.dtype.element_ty))  # e2m1 x 2^k: exact


def hadamard_fake_quant_fp4(x: torch.Tensor, block: int) -> torch.Tensor:
    """`quant.fake_quant_fp4(quant.hadamard(x), block)` of x [..., N]: [..., N] in x's dtype, contiguous."""
    check_operands(x, block)
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    rows = x.numel() // n
    if rows:
        _hadamard_fp4_kernel[(rows,)](x, out, 1.0 / math.sqrt(n), N=n, STAGES=n.bit_length() - 1, BLOCK=block,
                                      FMT_MAX=quant.FP4_MAX, AMAX_FLOOR=quant.FP4_AMAX_FLOOR, PDL=x.is_cuda,
                                      num_warps=4 if n <= 1024 else 8, **launch_options(x.is_cuda))
    return out
