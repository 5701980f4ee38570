"""`dsv4c::kv_pack` (codegen/kv_cache.py `pack_reference`) in Triton: rows of x stored as packed cache rows
`[codes | raw | e8m0 scales | zero pad]` (`PackedLayout`), one launch a call where the reference is ~90 small aten
kernels.

A program packs `rows` rows. Its tile of the rounded dims is `[rows * blocks, block]`, one scale block a tile row,
rounded by `number_formats.block_rounded` (the activation roundings' rounding: amax floored, the power-of-two scale
of `quant.power_of_two_scale`, x / scale clamped and rounded to nearest even); the rounded values, exact e4m3 or
e2m1 values, become their codes by their fp32 bits, the sign from x as torch's conversions take it (e4m3: -0 and
negatives that round to zero are 0x80; e2m1: a zero code has no sign). The raw dims are copied as bytes, the scales
stored as bytes, the pad zeroed: every byte of the row is written.

Blocks holding a NaN or an inf, as the reference stores them: the scale byte 255, e8m0's NaN, so the block
unpacks to NaN as the model's rounding makes it; e2m1 codes 0 (NaN compares false with every rounding threshold); e4m3 codes those of
x / scale with a NaN (NaN present) or +inf (inf present) scale, so a NaN code 0x7F, or signed zeros for the finite
values of a block with an inf. The one difference: a NaN code is always 0x7F, as on a GPU whose divisions return
the canonical (positive) NaN; the reference on the CPU keeps the sign of a NaN operand, or takes the x86 default NaN
(negative) for inf / inf, and writes 0xFF there. Loads convert to fp32 first (Triton's CPU interpreter rounds bf16
arithmetic wrongly), bf16 by its bits; every step is exact in fp32. On CUDA the kernel is launched as its
predecessor's programmatic dependent (codegen/kernels/pdl.py).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.number_formats import block_rounded
from dsv4c.codegen.kernels.pdl import after_predecessor, launch_options
from dsv4c.codegen.kv_cache import PackedLayout
from dsv4c.model import quant

FORMATS = {"e4m3": (quant.FP8_MAX, quant.FP8_AMAX_FLOOR), "e2m1": (quant.FP4_MAX, quant.FP4_AMAX_FLOOR)}
TILE_VALUES = 2048  # rounded values a program's tile holds (rows * blocks * block, powers of two)
NONFINITE_SCALE_BYTE = tl.constexpr(255)  # e8m0's NaN: a block holding a NaN or an inf unpacks to NaN


@dataclasses.dataclass(frozen=True)
class KvPackLaunch:
    """Rows a program packs, and its warps."""

    rows: int
    num_warps: int


def kv_pack_launch(layout: PackedLayout) -> KvPackLaunch:
    """A tile of about TILE_VALUES rounded values: 4 rows of Flash's main KV (8 blocks of 64), 16 indexer keys."""
    blocks = triton.next_power_of_2(layout.rounded // layout.block)
    return KvPackLaunch(max(1, TILE_VALUES // (blocks * triton.next_power_of_2(layout.block))), 4)


@triton.jit
def _e4m3_codes(a, values, scale):
    """e4m3fn bytes (int32) of exact e4m3 values [R, C] (|v| <= 448), the sign bit x's (a's); in a row whose scale is
    NaN, those of a / scale: 0x7F where a row holds a NaN or a is inf, a signed zero elsewhere (an inf row)."""
    finite = (scale == scale)[:, None]
    magnitude = tl.where(finite, tl.abs(values), 0.0)  # no NaN converted to int
    normal = (magnitude.to(tl.int32, bitcast=True) >> 20) - ((127 - 7) << 3)  # exponent and 3 mantissa bits
    codes = tl.where(magnitude >= 0.015625, normal, (magnitude * 512.0).to(tl.int32))  # subnormals: k * 2^-9
    sign = (a.to(tl.int32, bitcast=True) >> 24) & 0x80
    nan_code = (tl.max((a != a).to(tl.int32), axis=1) > 0)[:, None] | (tl.abs(a) == float("inf"))
    return tl.where(finite, codes | sign, tl.where(nan_code, 0x7F, sign))


@triton.jit
def _e2m1_codes(a, values, scale):
    """e2m1 codes (int32 0..15) of exact e2m1 values [R, C] (|v| <= 6), bit 3 the sign of a nonzero code; 0 in a row
    whose scale is NaN. Magnitude codes: 2v below 1, else exponent and one mantissa bit (1 -> 2 ... 6 -> 7)."""
    finite = (scale == scale)[:, None]
    magnitude = tl.where(finite, tl.abs(values), 0.0)  # no NaN converted to int: its codes become 0
    codes = tl.where(magnitude >= 1.0, (magnitude.to(tl.int32, bitcast=True) >> 22) - 252,
                     (magnitude * 2.0).to(tl.int32))
    return tl.where((a < 0) & (codes > 0), codes | 8, codes)


@triton.jit
def _scale_bytes(scale):
    """e8m0 bytes (int32) of power-of-two fp32 scales, NONFINITE_SCALE_BYTE for a NaN scale."""
    biased = (scale.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.where(scale == scale, biased, NONFINITE_SCALE_BYTE)


@triton.jit
def _load_fp32(pointers, mask):
    """x's values as fp32, bf16 converted by its bits (exact; Triton's CPU interpreter converts bf16 subnormals
    wrongly)."""
    if pointers.dtype.element_ty == tl.bfloat16:
        bits = tl.load(pointers, mask=mask, other=0.0).to(tl.int16, bitcast=True)
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pack_blocks(x_ptr, out_ptr, first, n_rows, x_row_stride, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
                 BLOCKS_P2: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, FP4: tl.constexpr,
                 FMT_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, ROW_BYTES: tl.constexpr, SCALE_OFF: tl.constexpr):
    """Codes and scale bytes of rows first .. first + ROWS: tile row i is block i % BLOCKS_P2 of row i // BLOCKS_P2."""
    tile = tl.arange(0, ROWS * BLOCKS_P2)
    rows = first + tile // BLOCKS_P2
    blocks = tile % BLOCKS_P2
    columns = tl.arange(0, BLOCK_P2)
    live = (rows < n_rows) & (blocks < BLOCKS)
    mask = live[:, None] & (columns < BLOCK)[None, :]
    a = _load_fp32(x_ptr + (rows * x_row_stride + blocks * BLOCK)[:, None] + columns[None, :], mask)
    values, scale = block_rounded(a, FMT_MAX, AMAX_FLOOR)
    out_block = out_ptr + rows * ROW_BYTES
    tl.store(out_block + SCALE_OFF + blocks, _scale_bytes(scale).to(tl.uint8), mask=live)
    if FP4:
        low, high = tl.split(tl.reshape(_e2m1_codes(a, values, scale), (ROWS * BLOCKS_P2, BLOCK_P2 // 2, 2)))
        pairs = tl.arange(0, BLOCK_P2 // 2)
        tl.store((out_block + blocks * (BLOCK // 2))[:, None] + pairs[None, :], (low | (high << 4)).to(tl.uint8),
                 mask=live[:, None] & (pairs < BLOCK // 2)[None, :])
    else:
        tl.store((out_block + blocks * BLOCK)[:, None] + columns[None, :],
                 _e4m3_codes(a, values, scale).to(tl.uint8), mask=mask)


@triton.jit
def _copy_bytes(src_ptr, dst_ptr, rows, live, src_row_bytes, src_offset, DST_ROW_BYTES: tl.constexpr,
                DST_OFFSET: tl.constexpr, N: tl.constexpr, N_P2: tl.constexpr):
    """N bytes of each live row from src_offset of the source row to DST_OFFSET of the packed row (N > 0)."""
    columns = tl.arange(0, N_P2)
    mask = live[:, None] & (columns < N)[None, :]
    data = tl.load(src_ptr + (rows * src_row_bytes + src_offset)[:, None] + columns[None, :], mask=mask)
    tl.store(dst_ptr + (rows * DST_ROW_BYTES + DST_OFFSET)[:, None] + columns[None, :], data, mask=mask)


@triton.jit
def _kv_pack_kernel(x_ptr, x_bytes_ptr, out_ptr, n_rows, x_row_stride, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
                    BLOCKS_P2: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, FP4: tl.constexpr,
                    FMT_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, ROW_BYTES: tl.constexpr,
                    CODE_BYTES: tl.constexpr, RAW_BYTES: tl.constexpr, RAW_P2: tl.constexpr,
                    ITEM: tl.constexpr, SCALE_OFF: tl.constexpr, PAD: tl.constexpr, PAD_P2: tl.constexpr,
                    PDL: tl.constexpr):
    """Packed rows ROWS * pid .. + ROWS of x [n_rows, width] (row stride x_row_stride elements of ITEM bytes)."""
    after_predecessor(PDL)
    first = tl.program_id(0).to(tl.int64) * ROWS
    _pack_blocks(x_ptr, out_ptr, first, n_rows, x_row_stride, ROWS, BLOCKS, BLOCKS_P2, BLOCK, BLOCK_P2, FP4,
                 FMT_MAX, AMAX_FLOOR, ROW_BYTES, SCALE_OFF)
    rows = first + tl.arange(0, ROWS)
    live = rows < n_rows
    if RAW_BYTES > 0:  # the dims after the rounded ones: they start at byte BLOCKS * BLOCK * ITEM of x's row
        _copy_bytes(x_bytes_ptr, out_ptr, rows, live, x_row_stride * ITEM, BLOCKS * BLOCK * ITEM, ROW_BYTES,
                    CODE_BYTES, RAW_BYTES, RAW_P2)
    if PAD > 0:
        pad = tl.arange(0, PAD_P2)
        tl.store(out_ptr + (rows * ROW_BYTES + SCALE_OFF + BLOCKS)[:, None] + pad[None, :],
                 tl.zeros((ROWS, PAD_P2), tl.uint8), mask=live[:, None] & (pad < PAD)[None, :])


def kv_pack(x: torch.Tensor, format: str, rounded: int, block: int,
            launch: KvPackLaunch | None = None) -> torch.Tensor:
    """`pack_reference(x, format, rounded, block)` (codegen/kv_cache.py): x [..., width] in bf16, fp32 or fp16 ->
    uint8 [..., row_bytes], contiguous. x needs no layout but its own (a copy is made where its last dim is
    strided or its leading dims do not flatten to one stride)."""
    layout = PackedLayout(format, x.shape[-1], rounded, block, x.dtype)
    fmt_max, floor = FORMATS[format]
    rows = x.reshape(-1, layout.width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((*x.shape[:-1], layout.row_bytes), dtype=torch.uint8, device=x.device)
    if rows.shape[0] == 0:
        return out
    launch = launch or kv_pack_launch(layout)
    blocks, pad = rounded // block, layout.row_bytes - layout.scale_offset - layout.scale_bytes
    _kv_pack_kernel[(triton.cdiv(rows.shape[0], launch.rows),)](
        rows, rows.view(torch.uint8), out, rows.shape[0], rows.stride(0), ROWS=launch.rows, BLOCKS=blocks,
        BLOCKS_P2=triton.next_power_of_2(blocks), BLOCK=block, BLOCK_P2=triton.next_power_of_2(block),
        FP4=format == "e2m1", FMT_MAX=fmt_max, AMAX_FLOOR=floor, ROW_BYTES=layout.row_bytes,
        CODE_BYTES=layout.code_bytes, RAW_BYTES=layout.raw_bytes, RAW_P2=triton.next_power_of_2(layout.raw_bytes),
        ITEM=x.dtype.itemsize, SCALE_OFF=layout.scale_offset, PAD=pad, PAD_P2=triton.next_power_of_2(pad),
        PDL=x.is_cuda, num_warps=launch.num_warps, **launch_options(x.is_cuda))
    return out
