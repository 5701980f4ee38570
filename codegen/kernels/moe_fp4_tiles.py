"""Operand tiles and products of the fused MoE's expert GEMMs (codegen/kernels/moe_fp4.py), one 128-column block
of K a loop step.

A GEMM program computes `out^T [BN, BM] = W [BN, K] @ A^T` for BN weight rows and the BM operand rows of one
tile (swap AB: the weight rows are the MMA's M side). Its loop reads, a step:
- an MXFP4 weight block (`mxfp4_block`): 64 packed bytes a row as 16 little-endian words (16-byte vector loads),
  widened to e4m3 with shifts and masks on whole words: code c (magnitude c & 7, sign bit 3) becomes the e4m3
  bits (c & 7) << 2 | (c & 8) << 4, which is c's e2m1 value times 2^-6 (e2m1's subnormal 0.5 lands on e4m3's
  subnormal 2^-7, every other code on a normal e4m3 value), so the products take a factor 64 back in the scale;
  and its e8m0 scales, one word a row (four 32-column groups), in the K order below;
- or an FP8 weight block (`fp8_block`, the shared expert): e4m3 bytes and the one e8m0 scale of the rows'
  128 x 128 block;
- the activation operand (`operand_diag` for MXFP4 weights, `operand_rows` for FP8 weights) and its scales
  (`operand_scales`, `operand_scale`): the tile's rows of an operand buffer that codegen/kernels/moe_fp4.py
  wrote. An operand buffer is [rows, K] in the activation dtype; a row holds its values as they are
  (unrounded, FMT "none") or, rounded (FMT "fp8", "fp4"), K e4m3 bytes and then K / 32 fp32 scales, one per
  32 columns (the four of an FP8 block equal), in the row's own bytes (2K or 4K of them).

MMA K order. Within a 32-column group, packed word q (q < 4) holds columns 8q + 2i + h (byte i, nibble h); its
low nibbles widen into one word and its high nibbles into another. The widened group puts column 8q + 2i + h at
position 16h + 4q + i (`mma_order`): a wgmma operand register holds 4 consecutive columns at positions 4t and
4t + 16 of each group for one thread, so both halves of a packed word land in the thread that loads it, and the
widening needs no byte shuffle and no layout conversion. The MXFP4 GEMMs' activation operands are stored in
that order, so they multiply matching columns; the FP8 weights and their operands keep the natural order. A
dot's sum does not depend on its K order beyond the fp32 summation order the MMA chooses anyway.

Grouped product (`grouped_product`): an MXFP4 weight has a scale per row and 32 columns, so the four groups of
a block cannot share one dot. The operand enters the dot as four diagonal blocks, B [128, 4 BM]: column
g BM + m holds row m's 32 columns of group g and zeros elsewhere. One dot W [BN, 128] @ B gives every group's
product [BN, 4, BM] (each a sum of 32 exact products; adding the zero blocks adds +0), which the scales of the
weight [BN, 4] and of the operand multiply exactly (powers of two) before the sum over the groups. The dot does
four times the MMA work of one 32-column dot a group, and one-token tiles use 1 of its 16 N columns: the tensor
cores stay far from busy in a memory-bound step, and one dot a step needs one operand tile and one wait.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dsv4c.codegen.kernels.number_formats import e8m0_bits, e8m0_values

K_STEP = tl.constexpr(128)  # columns of K a loop step covers (codegen/kernels/moe_fp4_launch.py K_COLUMNS)
GROUP = tl.constexpr(32)  # columns of one MXFP4 weight scale, and of one operand scale
MXFP4_WIDENING = tl.constexpr(64.0)  # a widened code is its e2m1 value times 2^-6


@triton.jit
def mma_order(column):
    """The position of `column` (int32) in the MMA K order: 32g + 8q + 2i + h -> 32g + 16h + 4q + i."""
    return (column & ~31) | ((column & 1) << 4) | ((column >> 1) & 3) | (((column >> 3) & 3) << 2)


@triton.jit
def _bytes(words):
    """The four bytes (uint8) of uint32 words as [..., 2, 2]: byte 2x + y (least significant first) at [x, y]."""
    low = tl.join((words & 0xFF).to(tl.uint8), ((words >> 16) & 0xFF).to(tl.uint8))
    high = tl.join(((words >> 8) & 0xFF).to(tl.uint8), (words >> 24).to(tl.uint8))
    return tl.join(low, high)


@triton.jit
def _packed_words(w_ptr, rows, n_ok, kb, KDIM, ALIGNED: tl.constexpr):
    """[BN, 16] uint32: the 64 packed bytes of columns kb * 128 .. + 128 of MXFP4 rows (int8 [rows, KDIM / 2]),
    four a word, least significant byte first. ALIGNED: the base is 16-byte aligned (word loads); otherwise
    the bytes are loaded one by one and assembled."""
    if ALIGNED:
        words = w_ptr.to(tl.pointer_type(tl.uint32))
        start = rows.to(tl.int64) * tl.multiple_of(KDIM // 8, 16) + kb * (K_STEP // 8)
        return tl.load(words + start[:, None] + tl.arange(0, K_STEP // 8)[None, :], mask=n_ok[:, None], other=0)
    else:
        start = rows.to(tl.int64) * (KDIM // 2) + kb * (K_STEP // 2)
        byte = tl.arange(0, K_STEP // 8)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
        packed = tl.load(w_ptr + start[:, None, None] + byte, mask=n_ok[:, None, None], other=0)
        return tl.sum((packed.to(tl.uint32) & 0xFF) << (tl.arange(0, 4) * 8)[None, None, :], axis=2)


@triton.jit
def _mxfp4_scales(s_ptr, rows, n_ok, kb, KDIM, ALIGNED: tl.constexpr):
    """Four fp32 [BN]: the e8m0 scales of the 32-column groups of block kb (uint8 [rows, KDIM / 32]), from one
    word a row when ALIGNED."""
    if ALIGNED:
        words = s_ptr.to(tl.pointer_type(tl.uint32))
        word = tl.load(words + rows.to(tl.int64) * (KDIM // K_STEP) + kb, mask=n_ok, other=0x7F7F7F7F)
        word = word.to(tl.int32, bitcast=True)
        return (e8m0_bits((word << 23) & 0x7F800000), e8m0_bits((word << 15) & 0x7F800000),
                e8m0_bits((word << 7) & 0x7F800000), e8m0_bits((word >> 1) & 0x7F800000))
    else:
        start = s_ptr + rows.to(tl.int64) * (KDIM // GROUP) + kb * (K_STEP // GROUP)
        return (e8m0_values(tl.load(start, mask=n_ok, other=127).to(tl.uint8, bitcast=True)),
                e8m0_values(tl.load(start + 1, mask=n_ok, other=127).to(tl.uint8, bitcast=True)),
                e8m0_values(tl.load(start + 2, mask=n_ok, other=127).to(tl.uint8, bitcast=True)),
                e8m0_values(tl.load(start + 3, mask=n_ok, other=127).to(tl.uint8, bitcast=True)))


@triton.jit
def mxfp4_block(w_ptr, s_ptr, rows, n_ok, kb, KDIM, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """(e4m3 [BN, 128]: the codes of block kb of the rows, each its e2m1 value times 2^-6, in MMA K order;
    then four fp32 [BN]: the scales of its 32-column groups) of an MXFP4 weight."""
    words = _packed_words(w_ptr, rows, n_ok, kb, KDIM, ALIGNED)
    low = ((words << 2) & 0x1C1C1C1C) | ((words << 4) & 0x80808080)  # nibble h = 0 of every byte
    high = ((words >> 2) & 0x1C1C1C1C) | (words & 0x80808080)  # nibble h = 1
    halves = tl.join(tl.reshape(low, (BLOCK_N, 4, 4)), tl.reshape(high, (BLOCK_N, 4, 4)))  # [BN, g, q, h]
    bits = _bytes(tl.permute(halves, (0, 1, 3, 2)))  # [BN, group g, nibble h, word q, byte i = 2x + y: x, y]
    values = tl.reshape(bits, (BLOCK_N, K_STEP)).to(tl.float8e4nv, bitcast=True)
    s0, s1, s2, s3 = _mxfp4_scales(s_ptr, rows, n_ok, kb, KDIM, ALIGNED)
    return values, s0, s1, s2, s3


@triton.jit
def fp8_block(w_ptr, s_ptr, rows, n_ok, kb, KDIM):
    """(e4m3 [BN, 128]: block kb of FP8 rows [rows, KDIM] in the natural order; fp32 [BN]: each row's e8m0 scale
    of its 128 x 128 block, e8m0 [cdiv(rows, 128), KDIM / 128])."""
    start = rows.to(tl.int64) * KDIM + kb * K_STEP
    values = tl.load(w_ptr + start[:, None] + tl.arange(0, K_STEP)[None, :], mask=n_ok[:, None], other=0.0)
    scale = tl.load(s_ptr + (rows // K_STEP) * (KDIM // K_STEP) + kb, mask=n_ok, other=127)
    return values, e8m0_values(scale.to(tl.uint8, bitcast=True))


@triton.jit
def _row_bytes(ptr, KDIM):
    """Bytes of one row of an operand buffer ptr [rows, KDIM] (the activation dtype)."""
    return KDIM * (ptr.dtype.element_ty.primitive_bitwidth // 8)


@triton.jit
def operand_value_pointers(ptr, rows, KDIM, FMT: tl.constexpr):
    """Pointers [R] to the first value of operand rows `rows` of ptr [rows, KDIM] (the activation dtype): the
    row itself unrounded (FMT "none"), else its KDIM e4m3 bytes."""
    if FMT == "none":
        return ptr + rows.to(tl.int64) * KDIM
    else:
        return ptr.to(tl.pointer_type(tl.float8e4nv)) + rows.to(tl.int64) * _row_bytes(ptr, KDIM)


@triton.jit
def operand_scale_pointers(ptr, rows, KDIM):
    """Pointers [R] to the fp32 scales (one per 32 columns) of rounded operand rows: after their e4m3 bytes."""
    start = rows.to(tl.int64) * _row_bytes(ptr, KDIM) + KDIM
    return (ptr.to(tl.pointer_type(tl.uint8)) + start).to(tl.pointer_type(tl.float32))


@triton.jit
def operand_scales(ptr, rows, ok, kb, KDIM, FMT: tl.constexpr):
    """[BM, 4] fp32: the scales of block kb's four 32-column groups of operand rows `rows` [BM] (ones for FMT
    "none")."""
    if FMT == "none":
        return tl.full([rows.shape[0], K_STEP // GROUP], 1.0, tl.float32)
    else:
        group = kb * (K_STEP // GROUP) + tl.arange(0, K_STEP // GROUP)
        return tl.load(operand_scale_pointers(ptr, rows, KDIM)[:, None] + group[None, :], mask=ok[:, None], other=1.0)


@triton.jit
def operand_scale(ptr, rows, ok, kb, KDIM, FMT: tl.constexpr):
    """[BM] fp32: the scale of block kb of operand rows `rows` [BM] rounded per 128 (its four per-32 entries
    are equal; ones for FMT "none")."""
    if FMT == "none":
        return tl.full([rows.shape[0]], 1.0, tl.float32)
    else:
        return tl.load(operand_scale_pointers(ptr, rows, KDIM) + kb * (K_STEP // GROUP), mask=ok, other=1.0)


@triton.jit
def operand_diag(ptr, rows, ok, kb, KDIM, BLOCK_M: tl.constexpr, FMT: tl.constexpr):
    """B [128, 4 BM]: block kb of operand rows as four diagonal blocks. rows / ok [4 BM]: entry g BM + m is the
    tile's row m (m < BM); column g BM + m of B holds that row's group g (32 columns), its other entries are 0."""
    k = tl.arange(0, K_STEP)
    group = tl.arange(0, 4 * BLOCK_M) // BLOCK_M
    mine = ok[:, None] & ((k // GROUP)[None, :] == group[:, None])
    start = operand_value_pointers(ptr, rows, KDIM, FMT) + kb * K_STEP
    return tl.trans(tl.load(start[:, None] + k[None, :], mask=mine, other=0.0))


@triton.jit
def operand_rows(ptr, rows, ok, kb, KDIM, FMT: tl.constexpr):
    """B [128, BM]: block kb of operand rows `rows` [BM], natural order."""
    start = operand_value_pointers(ptr, rows, KDIM, FMT) + kb * K_STEP
    return tl.trans(tl.load(start[:, None] + tl.arange(0, K_STEP)[None, :], mask=ok[:, None], other=0.0))


@triton.jit
def product(w, b, PRODUCT: tl.constexpr):
    """w [BN, 128] (e4m3) @ b [128, N] -> fp32: an FP8 dot for e4m3 operands (rounded activations), else a
    bf16 or an fp32 dot of the exact widened values (see MoeFp4Launch.product)."""
    if b.dtype == tl.float8e4nv:
        return tl.dot(w, b)
    elif PRODUCT == "bf16":
        return tl.dot(w.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(w.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _by_group(x):
    """The four slices x[:, g, :] of x [R, 4, C], g = 0 .. 3."""
    pairs = tl.reshape(tl.permute(x, (0, 2, 1)), (x.shape[0], x.shape[2], 2, 2))  # [R, C, g // 2, g % 2]
    even, odd = tl.split(pairs)
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def grouped_product(w, s0, s1, s2, s3, b, a_scale, PRODUCT: tl.constexpr):
    """[BN, BM] fp32: the sum over the four groups g of (w_g @ b_g) * s_g * a_scale[:, g] * 64 (an fma chain
    over g), for w [BN, 128] widened MXFP4 codes in MMA K order, b [128, 4 BM] (`operand_diag`), the weight's
    group scales s_g [BN], and a_scale [BM, 4] (the operand's per group) or [BM] (one for the block: applied
    after the sum, exactly)."""
    groups = tl.reshape(product(w, b, PRODUCT), (w.shape[0], K_STEP // GROUP, b.shape[1] // (K_STEP // GROUP)))
    p0, p1, p2, p3 = _by_group(groups)
    if len(a_scale.shape) == 2:
        a0, a1, a2, a3 = _by_group(tl.trans(a_scale * MXFP4_WIDENING)[None, :, :])
        total = p0 * (s0[:, None] * a0)
        total += p1 * (s1[:, None] * a1)
        total += p2 * (s2[:, None] * a2)
        total += p3 * (s3[:, None] * a3)
        return total
    else:
        total = p0 * s0[:, None]
        total += p1 * s1[:, None]
        total += p2 * s2[:, None]
        total += p3 * s3[:, None]
        return total * (a_scale * MXFP4_WIDENING)[None, :]
