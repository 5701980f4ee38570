"""`dsv4c::fake_quant_fp8` / `fake_quant_fp4` (model/rounding_ops.py) in Triton: the model's activation rounding
of the values no fused op absorbs (the roundings the FP8 GEMMs and the packed caches take in are gone from the
graph by then), one launch a call where the reference is ~30 (e4m3) or ~70 (e2m1) small aten kernels.

x [..., K] is read as blocks of `block` values along the last dim; a program rounds ROWS blocks: the block's
amax (floored at the format's floor), the smallest power-of-two scale with amax / scale <= the format's max,
x / scale clamped to the format's range and rounded to the nearest e4m3 or e2m1 value, ties to even
(`number_formats.block_rounded`, which the fused MoE's FP8 operands use too), times the scale, in x's dtype.
Every step is exact in fp32 (the scales are powers of two), so the result is `quant.fake_quant_fp8` /
`fake_quant_fp4` bit for bit; a block holding a NaN or an inf becomes NaN everywhere, as there (its scale is
NaN). Loads convert to fp32 first and the stores cast exact values (Triton's CPU interpreter rounds bf16
arithmetic wrongly). On CUDA the kernel is launched as its predecessor's programmatic dependent
(codegen/kernels/pdl.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.number_formats import block_rounded
from dsv4c.codegen.kernels.pdl import after_predecessor, launch_options
from dsv4c.model import quant

ROWS = 16  # blocks a program rounds
FORMATS = {"fp8": (quant.FP8_MAX, quant.FP8_AMAX_FLOOR), "fp4": (quant.FP4_MAX, quant.FP4_AMAX_FLOOR)}


@triton.jit
def _fake_quant_kernel(x_ptr, out_ptr, n_blocks, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, ROWS: tl.constexpr,
                       FMT_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, PDL: tl.constexpr):
    """Blocks ROWS * pid .. + ROWS of x (BLOCK values each, BLOCK_P2 the power of two that holds them)."""
    after_predecessor(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    columns = tl.arange(0, BLOCK_P2)
    mask = (rows < n_blocks)[:, None] & (columns < BLOCK)[None, :]
    offsets = rows.to(tl.int64)[:, None] * BLOCK + columns[None, :]
    a = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    values, scale = block_rounded(a, FMT_MAX, AMAX_FLOOR)
    tl.store(out_ptr + offsets, (values * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def fake_quant(x: torch.Tensor, block: int, fmt: str) -> torch.Tensor:
    """x [..., K] (floating) rounded to `fmt` ("fp8": e4m3, "fp4": e2m1) with a power-of-two scale per `block`
    values of the last dim -> [..., K] in x's dtype, contiguous."""
    if fmt not in FORMATS:
        raise ValueError(f"fake_quant: format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if not x.dtype.is_floating_point or x.dim() < 1 or block <= 0 or x.shape[-1] % block:
        raise ValueError(f"fake_quant_{fmt}: x {tuple(x.shape)} {x.dtype} needs a floating last dim that is a "
                         f"multiple of block {block}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n_blocks = x.numel() // block
    if n_blocks:
        fmt_max, floor = FORMATS[fmt]
        _fake_quant_kernel[(triton.cdiv(n_blocks, ROWS),)](
            x, out, n_blocks, BLOCK=block, BLOCK_P2=triton.next_power_of_2(block), ROWS=ROWS, FMT_MAX=fmt_max,
            AMAX_FLOOR=floor, PDL=x.is_cuda, num_warps=4, **launch_options(x.is_cuda))
    return out
