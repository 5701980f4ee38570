"""`dsv4c::moe_fp4` in Triton: a whole MoE layer (routing, routed experts in MXFP4, shared expert in FP8) in six
launches.

The PyTorch twin is the op's reference (codegen/moe_fp4.py); tests/test_moe_fp4.py runs these kernels under
Triton's interpreter against it. A call on N tokens with k selections each has S = N (k + 1) selections: the k
routed ones of each token, then its shared expert, counted as expert E (weight 1, its own clamp):

(0) the routing, two launches (codegen/kernels/moe_route.py): the router's logits, then per token the score
    function, the selection (bias-shifted top-k or the hash table) and the weights: ids and weights [N, k];
(1) `_prepare_kernel`, grid (E + 1,): program e counts every expert's selections (a histogram of the ids), so it
    knows where its own rows start in an expert-sorted list padded to whole tiles of block_m rows, writes its
    selections there (in selection order, -1 in the padding) and its expert id for each of its tiles; each of
    the shared expert's tiles appears `shared_split` times in a row, copy q with id E + q (below). Program 0
    writes the number of tiles. Nothing leaves the GPU: the grids below are sized for the most tiles S
    selections can make (cdiv(S, block_m) + min(E + 1, S) + (shared_split - 1) cdiv(N, block_m)) and programs
    past the real count return at once, so an expert no token chose costs no program, and a call can be
    captured in a CUDA graph. The programs also share out x's 128-column blocks and write the gate/up GEMMs'
    activation operands (below);
(2) `_gate_up_kernel`, grid (tiles, I / 128): one tile of one expert's selections against 128 rows of its w1
    and of its w3, one loop for both (swap AB: the weight rows are the dot's M side). SwiGLU as model/layers.py
    `swiglu_expert`: gate and up rounded to the activation dtype, clamped, silu(gate) * up times the routing
    weight in fp32, rounded: hidden [S, I], written as the down GEMM's operand: the program's 128 hidden
    features of a selection are one rounding block;
(3) `_down_kernel`, grid (tiles, D / 256, split_k): the same for w2 (256 rows a program) over a slice of I:
    fp32 partials [split_k, S, D]. In both GEMMs the shared expert's FP8 rows are twice an MXFP4 row's bytes,
    so with `shared_split` 2 (GPU launches) each copy of its tiles computes half of a program's rows (64 gate/up
    rows, 128 down rows), streaming about what a routed program streams;
(4) `_combine_kernel`, grid (N, D / 1024): per token, each selection's partials summed in split order and
    rounded to the activation dtype (the expert's output), added in slot order (the shared expert last) in fp32,
    rounded. Fixed orders, no atomics: the result is deterministic, and since the launch depends on the
    layer's shape only (codegen/kernels/moe_fp4_launch.py), a token's row does not depend on the step's size.

Activation operands. A matmul's input is rounded once, where it is made, as the reference rounds it
(model/quant.py): W4A8 to e4m3 per 128 columns (`fake_quant_fp8`), W4A4 to e2m1 per 32 (`fake_quant_fp4`),
both with power-of-two scales rounded up from the block's amax (`number_formats.e8m0_byte`); W4A16 (and plain numerics)
not at all. An operand is a buffer [rows, K] in the activation dtype whose rounded rows hold K e4m3 bytes and
then K / 32 fp32 scales (codegen/kernels/moe_fp4_tiles.py); the routed experts' values in that file's MMA K
order, the shared expert's in the natural order. `_prepare_kernel` writes x's two ([N, D]: xr, and xs unless
the shared expert's input is x as it is), `_gate_up_kernel` the down GEMM's (hidden [S, I], each row in its
expert's format). The GEMM loops then only load, per 128 columns, the weight block, its scales and the operand
block (all pipelined), and multiply. One exception: with `shared_split` 2 a shared gate/up program holds half
of each rounding block, so it writes its hidden features as they are (already rounded to the activation
dtype) and the down GEMM rounds each 128-column block of the shared rows on load (`number_formats.
block_rounded`, as `_rounded` does for "fp8") before the same FP8 dot: the same values, scales and products as
unsplit, bit for bit.

Products: an MXFP4 block is widened in registers to e4m3 (every e2m1 code times 2^-6 is one) and multiplied
by the operand on FP8 tensor cores (wgmma on Hopper) as four diagonal blocks, one dot for its four 32-column
scale groups; each group's product is scaled by the weight's e8m0 scale, the operand's scale and 64 and the
groups added in fp32 (codegen/kernels/moe_fp4_tiles.py). The shared expert's FP8 blocks (one scale per 128 x
128) multiply its operand in one FP8 dot a block. W4A16 multiplies the activations as they are: bf16 dots for
bf16 activations, fp32 otherwise. Every product of two such values is exact in fp32, so the result is the
reference's up to the order of fp32 sums (and, on Hopper, the FP8 MMA's in-group summation). With
`native_fp4` (sm_100a / sm_103a) W4A4's routed products are `tl.dot_scaled` of the packed codes and e8m0
scales (tcgen05 kind::mxf4), rounding their unrounded operand (x, the hidden rows) in the loop: the same
rounding, the same exact products.

bf16 is converted to fp32 right after each load and rounded by hand (`number_formats.rounded_to`): Triton's CPU
interpreter gets bf16 arithmetic and conversion wrong.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.moe_fp4_launch import DOWN_ROWS, K_COLUMNS, MoeFp4Launch, moe_fp4_launch
from dsv4c.codegen.kernels.moe_fp4_tiles import (fp8_block, grouped_product, mma_order, mxfp4_block, operand_diag,
                                                 operand_rows, operand_scale, operand_scale_pointers, operand_scales,
                                                 operand_value_pointers, product)
from dsv4c.codegen.kernels.routed_moe import (_TRITON_DTYPES, POINTER_TABLES, PointerTables, _check_weight_set,
                                              _expert_ptr)
from dsv4c.codegen import moe_routing
from dsv4c.codegen.kernels.moe_route import route
from dsv4c.codegen.kernels.number_formats import block_rounded, e2m1_grid, e8m0_byte, e8m0_pair, rounded_to
from dsv4c.codegen.kernels.pdl import after_predecessor, launch_options
from dsv4c.codegen.moe_routing import Routing
from dsv4c.codegen.targets import Target, target_for_device
from dsv4c.model import quant

K_BLOCK = K_COLUMNS  # columns of K a loop step covers: one FP8 activation scale, four MXFP4 groups
BLOCK = tl.constexpr(K_BLOCK)
GROUP = tl.constexpr(32)  # columns of one MXFP4 scale, of one W4A4 activation scale and of one operand scale
GROUPS = tl.constexpr(K_BLOCK // 32)
COMBINE_BLOCK = 1024
ACT_ROUNDING = {"w4a8": "fp8", "w4a16": "none", "w4a4": "fp4"}  # routed activations -> the kernels' rounding
FP8_AMAX_FLOOR = tl.constexpr(quant.FP8_AMAX_FLOOR)
FP4_AMAX_FLOOR = tl.constexpr(quant.FP4_AMAX_FLOOR)


# ---- number formats ------------------------------------------------------------------------------------
@triton.jit
def _e2m1_code(q):
    """The 4-bit e2m1 code (int32, bit 3 the sign) of q, an e2m1 value: 0, .5, 1, 1.5 -> 0..3; 2, 3 -> 4, 5;
    4, 6 -> 6, 7."""
    v = tl.abs(q)
    code = tl.where(v < 2.0, v * 2.0, tl.where(v < 4.0, v + 2.0, v * 0.5 + 4.0)).to(tl.int32)
    return code | tl.where(q < 0, 8, 0)


# ---- activation operands -------------------------------------------------------------------------------
@triton.jit
def _rounded(a, FMT: tl.constexpr):
    """(values [R, 128] fp32, scales [R, 4] fp32) of rows a [R, 128] (fp32) rounded as the reference rounds a
    matmul's input: "fp8" to e4m3 with one scale (amax floored at 1e-4, as `quant.fake_quant_fp8`), "fp4" to e2m1
    with a scale per 32 (amax floored at 6 * 2^-126, as `quant.fake_quant_fp4`); "none" as they are, scales 1.
    values * scale is the reference's rounded input."""
    rows: tl.constexpr = a.shape[0]
    if FMT == "fp8":
        values, scale = block_rounded(a, 448.0, FP8_AMAX_FLOOR)
        return values, tl.broadcast_to(scale[:, None], (rows, GROUPS))
    elif FMT == "fp4":
        groups = tl.reshape(a, (rows, GROUPS, GROUP))
        amax = tl.maximum(tl.max(tl.abs(groups), axis=2), FP4_AMAX_FLOOR)
        scale, inverse = e8m0_pair(e8m0_byte(amax, 6.0))
        q = tl.clamp(groups * inverse[:, :, None], -6.0, 6.0, propagate_nan=tl.PropagateNan.ALL)
        return tl.reshape(e2m1_grid(q), (rows, BLOCK)), scale
    else:
        return a, tl.full([rows, GROUPS], 1.0, tl.float32)


@triton.jit
def _store_operand(ptr, rows, ok, kb, a, KDIM, FMT: tl.constexpr, MMA_ORDER: tl.constexpr):
    """Block kb of operand rows `rows` [R] (where `ok`) of ptr [rows, KDIM] (see codegen/kernels/moe_fp4_tiles.py):
    a [R, 128] (fp32) rounded to FMT, its values in the MMA K order when MMA_ORDER."""
    values, scales = _rounded(a, FMT)
    column = tl.arange(0, BLOCK)
    if MMA_ORDER:
        column = mma_order(column)
    start = operand_value_pointers(ptr, rows, KDIM, FMT) + kb * BLOCK
    tl.store(start[:, None] + column[None, :], values.to(start.dtype.element_ty), mask=ok[:, None])
    if FMT != "none":
        start = operand_scale_pointers(ptr, rows, KDIM) + kb * GROUPS
        tl.store(start[:, None] + tl.arange(0, GROUPS)[None, :], scales, mask=ok[:, None])


@triton.jit
def _store_unrounded(ptr, rows, ok, columns, columns_ok, a, KDIM):
    """Columns `columns` [C] (where `columns_ok`) of operand rows `rows` [R] (where `ok`) of ptr [rows, KDIM],
    FMT "none": a [R, C] (fp32) as it is, in the natural order."""
    start = operand_value_pointers(ptr, rows, KDIM, "none")
    tl.store(start[:, None] + columns[None, :], a.to(ptr.dtype.element_ty), mask=ok[:, None] & columns_ok[None, :])


@triton.jit
def _store_routed(ptr, rows, ok, kb, a, KDIM, ROUTED_ACT: tl.constexpr, NATIVE_FP4: tl.constexpr):
    """`_store_operand` of routed rows: as they are in the natural order for native MXFP4 products (which round
    in their loop), else rounded to ROUTED_ACT in the MMA K order."""
    if NATIVE_FP4:
        _store_operand(ptr, rows, ok, kb, a, KDIM, "none", False)
    else:
        _store_operand(ptr, rows, ok, kb, a, KDIM, ROUTED_ACT, True)


# ---- the K loops ---------------------------------------------------------------------------------------
@triton.jit
def _mxfp4_gemm(acc, acc2, w_ptr, s_ptr, w2_ptr, s2_ptr, a_ptr, rows, ok, rows4, ok4, n, n_ok, kb_start, kb_stop,
                KDIM, FMT: tl.constexpr, PAIR: tl.constexpr, PRODUCT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, NUM_STAGES: tl.constexpr):
    """acc [BN, BM] += rows n of an MXFP4 weight times operand rows `rows` of a_ptr (FMT, MMA K order) over the
    128-column blocks [kb_start, kb_stop); with PAIR, acc2 the same for a second weight (one operand tile for
    both). rows / ok [BM]; rows4 / ok4 [4 BM]: the same, four times (`_tile_rows`)."""
    for kb in tl.range(kb_start, kb_stop, num_stages=NUM_STAGES):
        b = operand_diag(a_ptr, rows4, ok4, kb, KDIM, BLOCK_M, FMT)
        if FMT == "fp4":
            a_scale = operand_scales(a_ptr, rows, ok, kb, KDIM, FMT)  # a scale per 32 columns
        else:
            a_scale = operand_scale(a_ptr, rows, ok, kb, KDIM, FMT)  # one for the 128
        w, s0, s1, s2, s3 = mxfp4_block(w_ptr, s_ptr, n, n_ok, kb, KDIM, BLOCK_N, ALIGNED)
        acc += grouped_product(w, s0, s1, s2, s3, b, a_scale, PRODUCT)
        if PAIR:
            w, s0, s1, s2, s3 = mxfp4_block(w2_ptr, s2_ptr, n, n_ok, kb, KDIM, BLOCK_N, ALIGNED)
            acc2 += grouped_product(w, s0, s1, s2, s3, b, a_scale, PRODUCT)
    return acc, acc2


@triton.jit
def _accumulate_mxf4(acc, a_rows, a_ok, w_ptr, s_ptr, n, n_ok, kb_start, kb_stop, KDIM, BLOCK_M: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
    """acc [BN, BM] += rows n of an MXFP4 weight times the unrounded activation rows a_rows (natural order),
    rounded to W4A4's e2m1 per 32 in the loop, as `tl.dot_scaled` (tcgen05 kind::mxf4): each 128-column block
    packed two codes a byte (the weight's layout) with its e8m0 scale bytes."""
    rows = n.to(tl.int64)
    for kb in tl.range(kb_start, kb_stop, num_stages=NUM_STAGES):
        a = tl.load(a_rows[:, None] + kb * BLOCK + tl.arange(0, BLOCK)[None, :], mask=a_ok[:, None],
                    other=0.0).to(tl.float32)
        groups = tl.reshape(a, (BLOCK_M, BLOCK // GROUP, GROUP))
        exponent = e8m0_byte(tl.maximum(tl.max(tl.abs(groups), axis=2), FP4_AMAX_FLOOR), 6.0)
        _, inverse = e8m0_pair(exponent)
        q = e2m1_grid(tl.clamp(groups * inverse[:, :, None], -6.0, 6.0, propagate_nan=tl.PropagateNan.ALL))
        low, high = tl.split(tl.reshape(_e2m1_code(q), (BLOCK_M, BLOCK // 2, 2)))
        a_packed = (low | (high << 4)).to(tl.uint8)
        w = tl.load(w_ptr + rows[:, None] * (KDIM // 2) + kb * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :],
                    mask=n_ok[:, None], other=0).to(tl.uint8, bitcast=True)
        w_scale = tl.load(s_ptr + rows[:, None] * (KDIM // GROUP) + kb * (BLOCK // GROUP)
                          + tl.arange(0, BLOCK // GROUP)[None, :], mask=n_ok[:, None], other=127)
        acc = tl.dot_scaled(w, w_scale, "e2m1", tl.trans(a_packed), exponent.to(tl.uint8), "e2m1", acc)
    return acc


@triton.jit
def _fp8_gemm(acc, acc2, w_ptr, s_ptr, w2_ptr, s2_ptr, a_ptr, rows, ok, n, n_ok, kb_start, kb_stop, KDIM,
              FMT: tl.constexpr, ROUND: tl.constexpr, PAIR: tl.constexpr, PRODUCT: tl.constexpr,
              NUM_STAGES: tl.constexpr):
    """`_mxfp4_gemm` for FP8 weights (e8m0 scales per 128 x 128) and an operand in the natural order (FMT "fp8"
    or "none"): one dot a block, times the weight's and the operand's scale. ROUND "fp8": an unrounded operand
    (FMT "none") rounded in the loop, each block as `_store_operand` would have rounded it
    (`number_formats.block_rounded`). rows / ok [BM]."""
    for kb in tl.range(kb_start, kb_stop, num_stages=NUM_STAGES):
        b = operand_rows(a_ptr, rows, ok, kb, KDIM, FMT)
        a_scale = operand_scale(a_ptr, rows, ok, kb, KDIM, FMT)
        if ROUND == "fp8":
            values, a_scale = block_rounded(tl.trans(b).to(tl.float32), 448.0, FP8_AMAX_FLOOR)
            b = tl.trans(values.to(tl.float8e4nv))
        w, w_scale = fp8_block(w_ptr, s_ptr, n, n_ok, kb, KDIM)
        acc += product(w, b, PRODUCT) * (w_scale[:, None] * a_scale[None, :])
        if PAIR:
            w, w_scale = fp8_block(w2_ptr, s2_ptr, n, n_ok, kb, KDIM)
            acc2 += product(w, b, PRODUCT) * (w_scale[:, None] * a_scale[None, :])
    return acc, acc2


# ---- kernels ---------------------------------------------------------------------------------------------
@triton.jit
def _tile_place(first, rank, copy, copies, BLOCK_M: tl.constexpr):
    """Where entry `rank` of an expert's selections sits in the tile list, in its copy `copy` of `copies`: the
    expert's tiles start at tile `first`, and each of its tiles of BLOCK_M selections appears `copies` times in
    a row."""
    return (first + (rank // BLOCK_M) * copies + copy) * BLOCK_M + rank % BLOCK_M


@triton.jit
def _group(ids_ptr, sorted_ptr, tile_expert_ptr, n_tiles_ptr, S, K, E, BLOCK_M: tl.constexpr,
           BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, SHARED_SPLIT: tl.constexpr):
    """Program e (0 .. E; E the shared expert): its selections' places in the tile-padded, expert-sorted list
    and its tiles' expert ids. Selection s is slot s % (K + 1) of token s // (K + 1); slot K is the shared
    expert. Each of the shared expert's tiles appears SHARED_SPLIT times in a row, copy q with expert id E + q
    (the slice of the weight rows its programs compute). BLOCK_E >= E + 2: the last bin counts the lanes past
    S."""
    e = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    valid = s < S
    token, slot = s // (K + 1), s % (K + 1)
    routed = valid & (slot < K)
    expert = tl.load(ids_ptr + token * K + slot, mask=routed, other=0).to(tl.int32)
    expert = tl.where(routed, expert, tl.where(valid, E, BLOCK_E - 1))
    counts = tl.histogram(expert, BLOCK_E)
    bins = tl.arange(0, BLOCK_E)
    row_tiles = tl.where(bins <= E, (counts + BLOCK_M - 1) // BLOCK_M, 0)
    tiles = tl.where(bins == E, row_tiles * SHARED_SPLIT, row_tiles)
    first = tl.sum(tl.where(bins < e, tiles, 0), axis=0)
    mine = tl.sum(tl.where(bins == e, row_tiles, 0), axis=0)
    count = tl.sum(tl.where(bins == e, counts, 0), axis=0)
    copies = 1 + (SHARED_SPLIT - 1) * (e == E).to(tl.int32)
    member = expert == e
    rank = tl.cumsum(member.to(tl.int32), 0) - 1
    pad = count + tl.arange(0, BLOCK_M)
    for copy in tl.static_range(SHARED_SPLIT):
        mine_copy = member & (tl.full([BLOCK_S], copy, tl.int32) < copies)
        tl.store(sorted_ptr + _tile_place(first, rank, copy, copies, BLOCK_M), s, mask=mine_copy)
        pad_copy = (pad < mine * BLOCK_M) & (tl.full([BLOCK_M], copy, tl.int32) < copies)
        tl.store(sorted_ptr + _tile_place(first, pad, copy, copies, BLOCK_M), tl.full([BLOCK_M], -1, tl.int32),
                 mask=pad_copy)
    t = tl.arange(0, BLOCK_T)
    tl.store(tile_expert_ptr + first + t, e + t % copies, mask=t < mine * copies)
    if e == 0:
        tl.store(n_tiles_ptr, tl.sum(tiles, axis=0))


@triton.jit
def _prepare_kernel(ids_ptr, sorted_ptr, tile_expert_ptr, n_tiles_ptr, x_ptr, xr_ptr, xs_ptr, N, S, D, K, E,
                    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                    ROUTED_ACT: tl.constexpr, SHARED_ACT: tl.constexpr, NATIVE_FP4: tl.constexpr,
                    SHARED_SPLIT: tl.constexpr, PDL: tl.constexpr):
    """`_group`, then x's 128-column blocks shared out over the programs, each rounded to the gate/up GEMMs'
    operands [N, D]: the routed experts' xr (ROUTED_ACT, MMA K order; not for native products, which read x)
    and the shared expert's xs (when SHARED_ACT is "fp8"; unrounded, it reads x)."""
    after_predecessor(PDL)
    _group(ids_ptr, sorted_ptr, tile_expert_ptr, n_tiles_ptr, S, K, E, BLOCK_M, BLOCK_S, BLOCK_E, BLOCK_T,
           SHARED_SPLIT)
    if not NATIVE_FP4 or SHARED_ACT != "none":
        blocks = D // BLOCK
        for index in range(tl.program_id(0), N * blocks, tl.num_programs(0)):
            token = tl.full([1], index // blocks, tl.int32)
            kb = index % blocks
            ok = token < N
            a = tl.load(x_ptr + token.to(tl.int64)[:, None] * D + kb * BLOCK + tl.arange(0, BLOCK)[None, :],
                        mask=ok[:, None], other=0.0)
            if not NATIVE_FP4:
                _store_operand(xr_ptr, token, ok, kb, a.to(tl.float32), D, ROUTED_ACT, True)
            if SHARED_ACT != "none":
                _store_operand(xs_ptr, token, ok, kb, a.to(tl.float32), D, SHARED_ACT, False)


@triton.jit
def _tile_rows(sorted_ptr, tile, BLOCK_M: tl.constexpr, ROWS: tl.constexpr):
    """(selections [ROWS] (0 in the padding), valid [ROWS]) of one tile; entry r is its row r % BLOCK_M (ROWS =
    4 BLOCK_M: the rows of `operand_diag`'s four blocks). Selection s is token s // (K + 1)'s slot s % (K + 1)."""
    sel = tl.load(sorted_ptr + tile * BLOCK_M + tl.arange(0, ROWS) % BLOCK_M)
    return tl.maximum(sel, 0), sel >= 0


@triton.jit
def _swiglu(gate, up, weight, limit, ACT_DTYPE: tl.constexpr):
    """h [BM, R] = round(silu(clamp(round(gate))) * clamp(round(up)) * weight) for gate / up [R, BM] (fp32), as
    model/layers.py `swiglu_expert`."""
    g = rounded_to(gate, ACT_DTYPE)
    u = rounded_to(up, ACT_DTYPE)
    g = tl.where(g > limit, limit, g)  # (NaN stays NaN; an absent clamp is a limit of +inf)
    u = tl.where(u > limit, limit, tl.where(u < -limit, -limit, u))
    return tl.trans(rounded_to(g * tl.sigmoid(g) * u * weight[None, :], ACT_DTYPE))


@triton.jit
def _shared_rows(part, BLOCK_N: tl.constexpr, SHARED_SPLIT: tl.constexpr):
    """The weight rows [BLOCK_N / SHARED_SPLIT] a shared program computes of its grid column's BLOCK_N: slice
    `part` (its tile's expert id less E, `_group`)."""
    rows: tl.constexpr = BLOCK_N // SHARED_SPLIT
    return tl.program_id(1) * BLOCK_N + part * rows + tl.arange(0, rows)


@triton.jit
def _shared_gate_up(xs_ptr, sw1_ptr, ss1_ptr, sw3_ptr, ss3_ptr, hidden_ptr, part, sel, row_ok, token, D, I, limit,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHARED_ACT: tl.constexpr,
                    SHARED_SPLIT: tl.constexpr, PRODUCT: tl.constexpr, ACT_DTYPE: tl.constexpr,
                    NUM_STAGES: tl.constexpr):
    """`_gate_up_kernel` for slice `part` of the shared expert's BLOCK_N rows (weight 1). Unsplit, its hidden
    features of a selection are one rounding block, written rounded to SHARED_ACT; split, they are half of one,
    written as they are (the down GEMM rounds them on load)."""
    n = _shared_rows(part, BLOCK_N, SHARED_SPLIT)
    n_ok = n < I
    gate = tl.zeros([BLOCK_N // SHARED_SPLIT, BLOCK_M], dtype=tl.float32)
    gate, up = _fp8_gemm(gate, gate, sw1_ptr, ss1_ptr, sw3_ptr, ss3_ptr, xs_ptr, token, row_ok, n, n_ok, 0,
                         D // BLOCK, D, SHARED_ACT, "none", True, PRODUCT, NUM_STAGES)
    h = _swiglu(gate, up, tl.full([BLOCK_M], 1.0, tl.float32), limit, ACT_DTYPE)
    if SHARED_SPLIT == 1:
        _store_operand(hidden_ptr, sel, row_ok, tl.program_id(1), h, I, SHARED_ACT, False)
    else:
        _store_unrounded(hidden_ptr, sel, row_ok, n, n_ok, h, I)


@triton.jit
def _shared_down(hidden_ptr, sw2_ptr, ss2_ptr, part_ptr, part, split, sel, row_ok, kb_start, kb_stop, D, I, S,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHARED_ACT: tl.constexpr,
                 SHARED_SPLIT: tl.constexpr, PRODUCT: tl.constexpr, NUM_STAGES: tl.constexpr):
    """`_down_kernel` for slice `part` of the shared expert's BLOCK_N rows: its operand rows as
    `_shared_gate_up` wrote them, split ones rounded to SHARED_ACT on load."""
    n = _shared_rows(part, BLOCK_N, SHARED_SPLIT)
    n_ok = n < D
    acc = tl.zeros([BLOCK_N // SHARED_SPLIT, BLOCK_M], dtype=tl.float32)
    if SHARED_SPLIT == 1:
        acc = _fp8_gemm(acc, acc, sw2_ptr, ss2_ptr, sw2_ptr, ss2_ptr, hidden_ptr, sel, row_ok, n, n_ok, kb_start,
                        kb_stop, I, SHARED_ACT, "none", False, PRODUCT, NUM_STAGES)[0]
    else:
        acc = _fp8_gemm(acc, acc, sw2_ptr, ss2_ptr, sw2_ptr, ss2_ptr, hidden_ptr, sel, row_ok, n, n_ok, kb_start,
                        kb_stop, I, "none", SHARED_ACT, False, PRODUCT, NUM_STAGES)[0]
    _store_partials(part_ptr, split, S, sel, row_ok, n, n_ok, acc, D)


@triton.jit
def _gate_up_kernel(x_ptr, xr_ptr, xs_ptr, weights_ptr, sorted_ptr, tile_expert_ptr, n_tiles_ptr, table_ptr, sw1_ptr,
                    ss1_ptr, sw3_ptr, ss3_ptr, hidden_ptr, D, I, K, E, routed_limit, shared_limit,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUTED_ACT: tl.constexpr,
                    SHARED_ACT: tl.constexpr, PRODUCT: tl.constexpr, NATIVE_FP4: tl.constexpr,
                    SHARED_SPLIT: tl.constexpr, ACT_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                    NUM_STAGES: tl.constexpr, PDL: tl.constexpr):
    """hidden[sel, tile of I] = round(silu(clamp(round(x W1.T))) * clamp(round(x W3.T)) * weight) for the
    selections of one tile (x [N, D] in the activation dtype, its operands xr and xs; the shared expert's
    weight is 1), written as the down GEMM's operand [S, I]. A shared program computes a 1 / SHARED_SPLIT
    slice of the tile's BLOCK_N rows; split, it writes them unrounded (half a rounding block: the down GEMM
    rounds them on load)."""
    after_predecessor(PDL)
    tile = tl.program_id(0)
    if tile < tl.load(n_tiles_ptr):
        expert = tl.load(tile_expert_ptr + tile)
        sel, row_ok = _tile_rows(sorted_ptr, tile, BLOCK_M, BLOCK_M)
        token, slot = sel // (K + 1), sel % (K + 1)
        if expert < E:
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < I
            gate = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            w1 = _expert_ptr(table_ptr, 0, E, expert, tl.int8, ALIGNED)
            s1 = _expert_ptr(table_ptr, 1, E, expert, tl.uint8, ALIGNED)
            w3 = _expert_ptr(table_ptr, 2, E, expert, tl.int8, ALIGNED)
            s3 = _expert_ptr(table_ptr, 3, E, expert, tl.uint8, ALIGNED)
            if NATIVE_FP4:
                a_rows = x_ptr + token.to(tl.int64) * D
                gate = _accumulate_mxf4(gate, a_rows, row_ok, w1, s1, n, n_ok, 0, D // BLOCK, D, BLOCK_M, NUM_STAGES)
                up = _accumulate_mxf4(up, a_rows, row_ok, w3, s3, n, n_ok, 0, D // BLOCK, D, BLOCK_M, NUM_STAGES)
            else:
                sel4, ok4 = _tile_rows(sorted_ptr, tile, BLOCK_M, 4 * BLOCK_M)
                gate, up = _mxfp4_gemm(gate, up, w1, s1, w3, s3, xr_ptr, token, row_ok, sel4 // (K + 1), ok4, n,
                                       n_ok, 0, D // BLOCK, D, ROUTED_ACT, True, PRODUCT, BLOCK_M, BLOCK_N, ALIGNED,
                                       NUM_STAGES)
            weight = tl.load(weights_ptr + token * K + slot, mask=row_ok, other=0.0)
            h = _swiglu(gate, up, weight, routed_limit, ACT_DTYPE)  # [BM, 128]: one rounding block
            _store_routed(hidden_ptr, sel, row_ok, tl.program_id(1), h, I, ROUTED_ACT, NATIVE_FP4)
        else:
            _shared_gate_up(xs_ptr, sw1_ptr, ss1_ptr, sw3_ptr, ss3_ptr, hidden_ptr, expert - E, sel, row_ok, token, D,
                            I, shared_limit, BLOCK_M, BLOCK_N, SHARED_ACT, SHARED_SPLIT, PRODUCT, ACT_DTYPE,
                            NUM_STAGES)


@triton.jit
def _store_partials(part_ptr, split, S, sel, row_ok, n, n_ok, acc, D):
    """part[split, sel, n] = acc [R, BM] (fp32) for the tile's valid selections and the rows n < D."""
    out = part_ptr + (split * S + sel).to(tl.int64)[None, :] * D + n[:, None]
    tl.store(out, acc, mask=n_ok[:, None] & row_ok[None, :])


@triton.jit
def _down_kernel(hidden_ptr, sorted_ptr, tile_expert_ptr, n_tiles_ptr, table_ptr, sw2_ptr, ss2_ptr, part_ptr,
                 D, I, K, E, S, BLOCKS_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 ROUTED_ACT: tl.constexpr, SHARED_ACT: tl.constexpr, PRODUCT: tl.constexpr,
                 NATIVE_FP4: tl.constexpr, SHARED_SPLIT: tl.constexpr, ALIGNED: tl.constexpr,
                 NUM_STAGES: tl.constexpr, PDL: tl.constexpr):
    """part[split, sel, tile of D] = hidden[sel] @ W2.T over split's slice of I (fp32, not rounded); hidden: the
    operand [S, I] the gate/up kernel wrote. A shared program computes a 1 / SHARED_SPLIT slice of the tile's
    BLOCK_N rows; split, its operand rows are unrounded and it rounds them to SHARED_ACT on load."""
    after_predecessor(PDL)
    tile = tl.program_id(0)
    if tile < tl.load(n_tiles_ptr):
        expert = tl.load(tile_expert_ptr + tile)
        sel, row_ok = _tile_rows(sorted_ptr, tile, BLOCK_M, BLOCK_M)
        split = tl.program_id(2)
        kb_start = split * BLOCKS_PER_SPLIT
        kb_stop = tl.minimum(kb_start + BLOCKS_PER_SPLIT, I // BLOCK)
        if expert < E:
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < D
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            w2 = _expert_ptr(table_ptr, 4, E, expert, tl.int8, ALIGNED)
            s2 = _expert_ptr(table_ptr, 5, E, expert, tl.uint8, ALIGNED)
            if NATIVE_FP4:
                acc = _accumulate_mxf4(acc, hidden_ptr + sel.to(tl.int64) * I, row_ok, w2, s2, n, n_ok, kb_start,
                                       kb_stop, I, BLOCK_M, NUM_STAGES)
            else:
                sel4, ok4 = _tile_rows(sorted_ptr, tile, BLOCK_M, 4 * BLOCK_M)
                acc = _mxfp4_gemm(acc, acc, w2, s2, w2, s2, hidden_ptr, sel, row_ok, sel4, ok4, n, n_ok, kb_start,
                                  kb_stop, I, ROUTED_ACT, False, PRODUCT, BLOCK_M, BLOCK_N, ALIGNED, NUM_STAGES)[0]
            _store_partials(part_ptr, split, S, sel, row_ok, n, n_ok, acc, D)
        else:
            _shared_down(hidden_ptr, sw2_ptr, ss2_ptr, part_ptr, expert - E, split, sel, row_ok, kb_start, kb_stop, D,
                         I, S, BLOCK_M, BLOCK_N, SHARED_ACT, SHARED_SPLIT, PRODUCT, NUM_STAGES)


@triton.jit
def _combine_kernel(part_ptr, out_ptr, S, D, K, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACT_DTYPE: tl.constexpr, PDL: tl.constexpr):
    """out[token, tile] = round(sum over slots 0 .. K of round(sum over splits of part[split, sel]))."""
    after_predecessor(PDL)
    token = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for slot in range(0, K + 1):
        sel = token * (K + 1) + slot
        y = tl.zeros([BLOCK_D], dtype=tl.float32)
        for split in tl.static_range(SPLITS):
            y += tl.load(part_ptr + (split * S + sel).to(tl.int64) * D + d, mask=ok, other=0.0)
        total += rounded_to(y, ACT_DTYPE)
    tl.store(out_ptr + token.to(tl.int64) * D + d, rounded_to(total, ACT_DTYPE).to(out_ptr.dtype.element_ty), mask=ok)


# ---- host wrapper ----------------------------------------------------------------------------------------
def check_shared(shared: Sequence[torch.Tensor], d: int, i: int, device: torch.device) -> None:
    """The shared expert's six tensors: e4m3 w1, w3 [I, D], w2 [D, I], e8m0 scales per 128 x 128 block."""
    blocks = lambda rows, cols: (-(-rows // K_BLOCK), -(-cols // K_BLOCK))  # noqa: E731
    expected = (((i, d), torch.float8_e4m3fn), (blocks(i, d), None), ((i, d), torch.float8_e4m3fn),
                (blocks(i, d), None), ((d, i), torch.float8_e4m3fn), (blocks(d, i), None))
    names = ("w1", "s1", "w3", "s3", "w2", "s2")
    for name, tensor, (shape, dtype) in zip(names, shared, expected):
        ok = tuple(tensor.shape) == shape and tensor.device == device and tensor.is_contiguous() and (
            tensor.dtype == dtype if dtype else tensor.dtype in (torch.float8_e8m0fnu, torch.uint8))
        if not ok:
            raise ValueError(f"moe_fp4: shared {name} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}; "
                             f"expected {shape} {dtype or 'e8m0'} contiguous on {device}")


def moe_fp4(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
            tokens: torch.Tensor | None, routing: Routing, lists: Sequence[Sequence[torch.Tensor]],
            shared: Sequence[torch.Tensor], routed_limit: float | None, shared_limit: float | None,
            activations: str, shared_act_quant: bool, target: Target | None = None,
            launch: MoeFp4Launch | None = None, tables: PointerTables = POINTER_TABLES) -> torch.Tensor:
    """The op on flat inputs: x [N, D] (bf16, fp16 or fp32); the router [E, D] with the bias [E] (score
    routing) or the table [V, k] and the N token ids (hash routing), as `routing` says; `lists` the routed
    experts' six weight lists (w1, s1, w3, s3, w2, s2), `shared` the shared expert's six tensors -> [N, D] in
    x's dtype. `launch`: `target`'s choice for the layer's shape (None: x's device's) unless given. See the
    module docstring and codegen/moe_fp4.py."""
    d, i = _check_weight_set(lists, x, every=False)
    check_shared(shared, d, i, x.device)
    experts, k = len(lists[0]), routing.top_k
    moe_routing.check(x, router, bias, table, tokens, routing, experts)
    if d % K_BLOCK or i % K_BLOCK:
        raise ValueError(f"moe_fp4: D ({d}) and I ({i}) must be multiples of {K_BLOCK}")
    if x.dtype not in _TRITON_DTYPES or activations not in ACT_ROUNDING:
        raise ValueError(f"moe_fp4: activations {activations!r} in {x.dtype}; allowed: {', '.join(ACT_ROUNDING)} "
                         f"in bf16, fp16 or fp32")
    n = x.shape[0]
    launch = launch or moe_fp4_launch(target or target_for_device(x.device), experts, k, d, i, activations,
                                      x.dtype == torch.bfloat16)
    if launch.product == "bf16" and x.dtype != torch.bfloat16 or launch.native_fp4 and activations != "w4a4":
        raise ValueError(f"moe_fp4: {launch} does not fit {activations} in {x.dtype}")
    out = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    x = x.contiguous()
    pdl = launch.pdl and x.is_cuda
    ids, weights = route(x, router, bias, table, tokens, routing, launch)
    pointers, aligned = tables.get(lists, x)
    s, bm = n * (k + 1), launch.block_m
    shared_tiles = triton.cdiv(n, bm)  # the shared expert's tiles, each repeated shared_split times (`_group`)
    max_tiles = triton.cdiv(s, bm) + min(experts + 1, s) + (launch.shared_split - 1) * shared_tiles
    order = torch.empty(max_tiles * bm, dtype=torch.int32, device=x.device)
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=x.device)
    n_tiles = torch.empty(1, dtype=torch.int32, device=x.device)
    routed_act, shared_act = ACT_ROUNDING[activations], "fp8" if shared_act_quant else "none"
    native = launch.native_fp4
    xr = x if native else torch.empty_like(x)  # the operands (codegen/kernels/moe_fp4_tiles.py); unrounded, x
    xs = torch.empty_like(x) if shared_act_quant else x
    _prepare_kernel[(experts + 1,)](ids, order, tile_expert, n_tiles, x, xr, xs, n, s, d, k, experts, BLOCK_M=bm,
                                    BLOCK_S=triton.next_power_of_2(s), BLOCK_E=triton.next_power_of_2(experts + 2),
                                    BLOCK_T=triton.next_power_of_2(max(triton.cdiv(s, bm),
                                                                       launch.shared_split * shared_tiles)),
                                    ROUTED_ACT=routed_act, SHARED_ACT=shared_act, NATIVE_FP4=native,
                                    SHARED_SPLIT=launch.shared_split, PDL=pdl, **launch_options(pdl))
    sw1, ss1, sw3, ss3, sw2, ss2 = (t.view(torch.uint8) if t.dtype == torch.float8_e8m0fnu else t for t in shared)
    common = dict(BLOCK_M=bm, BLOCK_N=launch.block_n, ROUTED_ACT=routed_act, SHARED_ACT=shared_act,
                  PRODUCT=launch.product, NATIVE_FP4=native, SHARED_SPLIT=launch.shared_split, ALIGNED=aligned,
                  NUM_STAGES=launch.num_stages, PDL=pdl, num_warps=launch.num_warps, **launch_options(pdl))
    limits = [float("inf") if v is None else float(v) for v in (routed_limit, shared_limit)]
    hidden = torch.empty((s, i), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(max_tiles, triton.cdiv(i, launch.block_n))](
        x, xr, xs, weights, order, tile_expert, n_tiles, pointers, sw1, ss1, sw3, ss3, hidden, d, i, k, experts,
        *limits, ACT_DTYPE=_TRITON_DTYPES[x.dtype], **common)
    blocks_per_split = triton.cdiv(i // K_BLOCK, launch.split_k)
    part = torch.empty((launch.split_k, s, d), dtype=torch.float32, device=x.device)
    _down_kernel[(max_tiles, triton.cdiv(d, DOWN_ROWS), launch.split_k)](
        hidden, order, tile_expert, n_tiles, pointers, sw2, ss2, part, d, i, k, experts, s, blocks_per_split,
        **dict(common, BLOCK_N=DOWN_ROWS))
    _combine_kernel[(n, triton.cdiv(d, COMBINE_BLOCK))](part, out, s, d, k, SPLITS=launch.split_k,
                                                        BLOCK_D=COMBINE_BLOCK, ACT_DTYPE=_TRITON_DTYPES[x.dtype],
                                                        PDL=pdl, num_warps=4, **launch_options(pdl))
    return out
