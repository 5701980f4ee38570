"""Sparse decode attention over packed FP8 rows in Triton; the PyTorch twin is codegen/sparse_attention.py.

Flash-decoding: the keys of one query (its window, then its selected or visible compressed entries) form one
index space, cut into `splits` ranges so that a single long sequence still fills the GPU. A program owns one
query token, one range and `block_h` heads (all heads share the one KV head, so a row read serves them all) and
walks the range in tiles of `block_n` keys: first the window's tiles (each key this step's row or a ring slot),
then the entries' (each key a cache row), in two loops so that a tile computes only its own kind of address (a
tile across the window's end, where `block_n` does not divide it, runs in both, each on its own keys). A tile
decodes each key's packed row once into one [block_n, width] tile of exact values that serves as the keys of the
scores and the values of the output, runs an online softmax step and, at the range's end, writes its (max, sum,
unnormalised output); `_combine_kernel` merges the ranges with the sink in the denominator.

Rows and decode (`_keys`). Every read of a tile is a plain copy of row bytes, so Triton pipelines all of them
(asynchronous copies a tile ahead): the codes, the bf16 RoPE dims, and the scales as one 8-byte word a row where
the layout puts them in one aligned word (`SCALE_WORD`; Flash's 584-byte rows), else a byte each. An invalid key
(a window position before 0, an id of -1, an entry not yet visible) reads this step's first row instead, a key
that every query of the step weighs (so its values are finite wherever a result is), and gets a score of -inf:
its probability is 0 and it adds nothing, whatever the bytes of the row it stands for (unwritten ring slots and
cache rows included). No row read is masked by key, and none outside the step's tensors is touched.
Values: e4m3 code times 2^(scale byte - 127), plus the RoPE dims, as one fused multiply-add over the [key,
scale block, dim] tile (the code is 0 on RoPE dims, the RoPE value 0 on coded dims); "bf16" builds take the
code through the hardware fp8 -> bf16 conversion and the power of two as bf16 bits, exact wherever the value is
a normal bf16 number, "ieee" builds do the same in fp32.

Online softmax (`_online_step`). Scores s = q . k unscaled; the running maximum m (per head, in units of
s x scale, as the merges and the sink use) moves only when a tile's maximum passes it by more than
RESCALE_SLACK (8 ln 2), and only then is the output rescaled (a branch the whole program takes or skips;
before the first valid tile the output is zero and is left alone). So a probability is e^(s scale - m) <= 256,
computed as 2^(fma(s, scale log2 e, -m log2 e)): the same sums, relative to a maximum that may lag the true
one by the slack, exact in the math. Split ranges and the fold run this same code, so their bits agree.

Products (`AttentionLaunch.product`). "bf16" (GPUs): scores = q @ keys^T as a bf16 x bf16 -> fp32 tensor-core
dot, exact products (q is bf16 by the op's contract, every decoded key is a bf16 value), then the probabilities
cast to bf16, as the reference casts its own, times the same key tile, accumulated in fp32 by the MMA. "ieee"
(the CPU interpreter, whose bf16 arithmetic is wrong): the same values in fp32 IEEE dots, the probabilities
rounded to bf16 (nearest, ties to even) by integer arithmetic first, so both sum the same products, in their own
orders; the output is rounded to bf16 the same way on both. The probabilities are the online softmax's
unnormalised ones, so the result agrees with the reference within their bf16 rounding.

Launch (`attention_launch`). A program holds 64 heads (16 where a model has at most 16), so one row read and
decode serves all of them and the dots have the M = 64 rows of Hopper's wgmma: m64n32k16 for the scores of a
64-key tile (Triton gives each warpgroup all 64 rows of a dot whose result feeds another), m64n256k16 for the
output, half of its 512 dims a warpgroup (16-head programs run on mma.sync with 32-key tiles; 17 to 32 heads are
padded to 64, since 32-row mma.sync programs spill). The output accumulator [64, 512] fp32 is 128 KB: 8 warps
at 128 registers a thread, half the register file, and the build sits at the 255-register limit;
bench/attention_sass.py counts the key loops' instructions of the sm_90a build. 64-key tiles halve the per-tile
work (softmax bookkeeping, wgmma issue, loop control) per key against 32-key ones. The ring must hold a tile
(C >= block_n: a tile's slots wrap at most once). Splitting the 512 output dims over programs instead would
repeat the decode and the scores dot, which cost as much as the output dot.

Batch invariance (runtime/batch_invariant.py): the ranges are a function of the key count, the heads and the
GPU only, never of the tokens in the step, so a query's result is the same bits whether it runs alone, as one
of 1 + k verified tokens or beside other sequences. The ranges merge in range order, starting from the sink,
one online-softmax step each (`_merge`); once the step's tokens alone fill the GPU, one program per (token,
head block) walks its ranges itself and merges them with the same `_merge` (`fold`), so no partials go out to
a second kernel and the bits stay the same. The folded program keeps its merged output in its own fp32 rows of
a scratch buffer (read and written once a range, from cache), since the range's and the merged accumulators
together would be the whole register file. Cost: a step of a few tokens writes and reads partials for as many
ranges as one token would use (at most `MAX_SPLITS`, so at most about 16 x H x D x 4 bytes a token, below the
fold).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.number_formats import bf16_rounded, pow2
from dsv4c.codegen.kernels.pdl import after_predecessor, launch_options

MAX_SPLITS = 16  # key ranges a query's keys are cut into at most: bounds the partials of a step below the fold
MIN_DOT = 16  # tl.dot's smallest side: a program of up to 16 heads
WGMMA_M = 64  # Hopper's wgmma rows: a program of 17 or more heads (64 at most)
COMBINE_HEADS = 16  # heads a combine program: [16, 512] fp32 fit 4 warps (the bits do not depend on blocking)
PRODUCTS = ("bf16", "ieee")
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
RESCALE_SLACK: tl.constexpr = tl.constexpr(5.545177444479562)  # 8 ln 2: rescale once a maximum grows x 256


@dataclasses.dataclass(frozen=True)
class AttentionLaunch:
    """Tile sizes, the key ranges (`splits` of `keys_per_split` keys: they order a query's sums), whether one
    program walks all ranges of its query (`fold`) instead of a program a range and a combine kernel, and how
    the dots multiply: "bf16" tensor-core products (GPUs) or "ieee" fp32 ones (the CPU interpreter)."""

    block_h: int
    block_n: int
    splits: int
    keys_per_split: int
    num_warps: int
    fold: bool = False
    product: str = "bf16"
    num_stages: int = 3

    def options(self) -> dict:
        """Triton's launch options of the split and folded kernels."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def __post_init__(self) -> None:
        powers_of_two = all(v >= MIN_DOT and v & (v - 1) == 0 for v in (self.block_h, self.block_n))
        if not powers_of_two or self.product not in PRODUCTS or self.splits < 1 or self.keys_per_split % self.block_n:
            raise ValueError(f"{self}: block_h and block_n powers of two >= {MIN_DOT}, whole tiles a range, "
                             f"product in {PRODUCTS}")


def attention_launch(tokens: int, heads: int, keys: int, sms: int, product: str = "bf16") -> AttentionLaunch:
    """Programs of 64 heads with tiles of 64 keys in two pipeline stages (three would pass the 227 KiB of shared
    memory an H100 block may use), or 16 heads and 32 keys in three for up to 16 heads, 8 warps; ranges of
    whole tiles enough for one token's (range, head block) programs to fill two waves of `sms` processors (at most
    MAX_SPLITS): a function of (heads, keys, sms), never of `tokens`, which only decides the fold: once the tokens'
    head blocks alone give every processor a program. `product`: "bf16" on GPUs, "ieee" under the interpreter."""
    block_h, block_n = (MIN_DOT, 32) if heads <= MIN_DOT else (WGMMA_M, 64)
    tiles = triton.cdiv(max(keys, 1), block_n)
    head_blocks = triton.cdiv(heads, block_h)
    splits = max(1, min(tiles, MAX_SPLITS, (2 * sms) // head_blocks))
    keys_per_split = triton.cdiv(tiles, splits) * block_n
    splits = triton.cdiv(max(keys, 1), keys_per_split)
    fold = splits > 1 and tokens * head_blocks >= sms
    return AttentionLaunch(block_h, block_n, splits, keys_per_split, 8, fold, product, 3 if heads <= MIN_DOT else 2)


@triton.jit
def _keys(row, ROUNDED: tl.constexpr, WIDTH: tl.constexpr, D_P2: tl.constexpr, QBLOCK: tl.constexpr,
          SCALE_OFF: tl.constexpr, SCALE_WORD: tl.constexpr, BLOCK_N: tl.constexpr, PRODUCT: tl.constexpr):
    """Keys [n, D_P2] of the packed rows at byte pointers `row` (zeros past WIDTH), every row read whole: dims
    below ROUNDED are e4m3 codes times their block's e8m0 scale, the rest bf16 bits at byte ROUNDED. bf16 for
    "bf16" products (code -> bf16 by the hardware conversion, times the scale as a bf16 power of two, plus the
    RoPE dim, in one multiply-add: exact wherever the value is a normal bf16 number), fp32 for "ieee"."""
    blocks = tl.arange(0, D_P2 // QBLOCK)  # a scale a block, read once (not once a dim)
    cols = (blocks * QBLOCK)[:, None] + tl.arange(0, QBLOCK)[None, :]  # [blocks, QBLOCK]: every load shares `row`
    row3 = row[:, None, None]
    code = tl.load(row3 + cols[None, :, :], mask=(cols < ROUNDED)[None, :, :], other=0)
    if SCALE_WORD == 8:  # the scales in one 8-byte word a row (one copy a row, pipelined like the codes)
        word = tl.load((row + SCALE_OFF).to(tl.pointer_type(tl.int64)))
        sbyte = (word[:, None] >> (8 * blocks[None, :]).to(tl.int64)) & 255
        sbyte = tl.where((blocks * QBLOCK < ROUNDED)[None, :], sbyte, 127)
    else:
        sbyte = tl.load(row[:, None] + SCALE_OFF + blocks[None, :], mask=(blocks * QBLOCK < ROUNDED)[None, :],
                        other=127)
    raw_ptr = (row3 + ROUNDED).to(tl.pointer_type(tl.bfloat16))
    raw_cols = cols - ROUNDED
    raw = tl.load(raw_ptr + raw_cols[None, :, :], mask=((raw_cols >= 0) & (cols < WIDTH))[None, :, :], other=0.0)
    if PRODUCT == "bf16":
        value = code.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
        power = (sbyte.to(tl.int16) << 7).to(tl.bfloat16, bitcast=True)  # 2^(sbyte - 127)
    else:
        value = code.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        power = pow2(sbyte.to(tl.int32) - 127)
        raw = raw.to(tl.float32)
    return tl.reshape(tl.fma(value, power[:, :, None], raw), (BLOCK_N, D_P2))


@triton.jit
def _query(q_ptr, start_ptr, bt, hb, T, H, sq_b, sq_t, sq_h, WIDTH: tl.constexpr, D_P2: tl.constexpr,
           BLOCK_H: tl.constexpr, PRODUCT: tl.constexpr):
    """Program (token bt, head block hb)'s sequence b, token t, position p, heads, head mask and query [BLOCK_H,
    D_P2]: bf16 for "bf16" products, fp32 for "ieee"."""
    b, t = (bt // T).to(tl.int64), bt % T  # int64: b times a sequence's cache stride passes 2^31 at long context
    start = tl.load(start_ptr + b)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    cols = tl.arange(0, D_P2)
    q = tl.load(q_ptr + b * sq_b + t * sq_t + heads[:, None] * sq_h + cols[None, :],
                mask=hmask[:, None] & (cols < WIDTH)[None, :], other=0.0)
    if PRODUCT == "ieee":
        q = q.to(tl.float32)
    return b, t, start, start + t, heads, hmask, q


@triton.jit
def _online_step(q, keys, valid, m_i, l_i, acc, scale, PRODUCT: tl.constexpr):
    """One tile of keys (valid ones only) folded into the online softmax (max m_i, sum l_i, output acc). The
    output is rescaled only when a head's tile maximum passes its running one by more than RESCALE_SLACK, so a
    probability may reach e^RESCALE_SLACK: the same sums relative to a maximum that may lag the true one."""
    if PRODUCT == "bf16":
        s = tl.dot(q, tl.trans(keys))
    else:
        s = tl.dot(q, tl.trans(keys), input_precision="ieee")
    s = tl.where(valid[None, :], s, float("-inf"))
    m_tile = tl.max(s, axis=1) * scale  # scale > 0: the maximum of the scaled scores
    if tl.max((m_tile > m_i + RESCALE_SLACK).to(tl.int32), axis=0) > 0:  # a scalar: the whole program rescales
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.exp(m_i - tl.where(m_new > float("-inf"), m_new, 0.0))
        if tl.max(m_i, axis=0) > float("-inf"):  # acc holds keys (before the first valid tile it is zero)
            acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    shift = tl.where(m_i > float("-inf"), m_i, 0.0) * -LOG2E
    prob = tl.exp2(tl.fma(s, scale * LOG2E, shift[:, None]))  # e^(s scale - m), one multiply-add and one ex2
    l_i = l_i + tl.sum(prob, axis=1)
    if PRODUCT == "bf16":
        acc = tl.dot(prob.to(tl.bfloat16), keys, acc)
    else:
        acc = tl.dot(bf16_rounded(prob), keys, acc, input_precision="ieee")
    return m_i, l_i, acc


@triton.jit
def _attend_range(q, b, t, start, p, first, last, new_ptr, ring_ptr, cache_ptr, ids_ptr, C, K, NENTRIES, scale,
                  sn_b, sn_t, sr_b, sr_c, sc_b, sc_e, si_b, si_t, WINDOW: tl.constexpr, RATIO: tl.constexpr,
                  SPARSE: tl.constexpr, ROUNDED: tl.constexpr, WIDTH: tl.constexpr, D_P2: tl.constexpr,
                  QBLOCK: tl.constexpr, SCALE_OFF: tl.constexpr, SCALE_WORD: tl.constexpr, ROW_ALIGN: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRODUCT: tl.constexpr):
    """Online softmax of one query over its keys [first, last): (max, sum, unnormalised output [BLOCK_H, D_P2]).
    Key j < WINDOW is position pos = p - WINDOW + 1 + j: this step's row from `start` on, else ring slot pos % C
    (C >= BLOCK_N: a tile's slots wrap at most once); key WINDOW + c is entry ids[c] (SPARSE) or entry c. The
    window's tiles, then the entries' (a tile across WINDOW, if any, visits both loops, each its own keys)."""
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D_P2), tl.float32)
    lowest = p - WINDOW + 1  # position of key 0
    new_rows = new_ptr + b * sn_b  # this step's first row: what an invalid key reads (it is never weighed)
    ring_rows = ring_ptr + b * sr_b
    slot = (lowest + first + WINDOW * C) % C  # the ring slot of key `first`: kept below C as the tiles advance
    for base in range(first, tl.minimum(last, WINDOW), BLOCK_N):
        j = base + tl.arange(0, BLOCK_N)
        pos = lowest + j
        valid = (j < WINDOW) & (pos >= 0)
        from_new = pos >= start
        ring_slot = slot + tl.arange(0, BLOCK_N)
        ring_slot = tl.where(ring_slot >= C, ring_slot - C, ring_slot)
        from_ring = valid & (pos < start)
        new_row = tl.where(valid & from_new, pos - start, 0) * sn_t
        row = tl.multiple_of(tl.where(from_ring, ring_rows + ring_slot * sr_c, new_rows + new_row), ROW_ALIGN)
        keys = _keys(row, ROUNDED, WIDTH, D_P2, QBLOCK, SCALE_OFF, SCALE_WORD, BLOCK_N, PRODUCT)
        m_i, l_i, acc = _online_step(q, keys, valid, m_i, l_i, acc, scale, PRODUCT)
        slot += BLOCK_N
        slot = tl.where(slot >= C, slot - C, slot)
    if RATIO > 0:
        cache_rows = cache_ptr + b * sc_b
        listed_ids = ids_ptr.to(tl.pointer_type(tl.int32)) + 2 * (b * si_b + t * si_t)  # low words: ids < 2^31
        visible = tl.minimum((p + 1) // RATIO, NENTRIES)
        for base in range(tl.maximum(first, WINDOW - WINDOW % BLOCK_N), last, BLOCK_N):
            c = base - WINDOW + tl.arange(0, BLOCK_N)
            if SPARSE:
                entry = tl.load(listed_ids + 2 * c, mask=(c >= 0) & (c < K), other=-1)
                valid = entry >= 0
            else:
                entry = c
                valid = (c >= 0) & (c < visible)
            row = tl.multiple_of(tl.where(valid, cache_rows + entry.to(tl.int64) * sc_e, new_rows), ROW_ALIGN)
            keys = _keys(row, ROUNDED, WIDTH, D_P2, QBLOCK, SCALE_OFF, SCALE_WORD, BLOCK_N, PRODUCT)
            m_i, l_i, acc = _online_step(q, keys, valid, m_i, l_i, acc, scale, PRODUCT)
    return m_i, l_i, acc


@triton.jit
def _merge(peak, total, m, l):
    """One range (max m, sum l) merged into the running (peak, total): (new peak, new total, the weight of the
    running output, the weight of the range's output). Fused multiply-adds, so every kernel rounds alike."""
    new_peak = tl.maximum(peak, m)
    old_w = tl.exp(peak - new_peak)
    new_w = tl.exp(m - new_peak)
    return new_peak, tl.fma(total, old_w, l * new_w), old_w, new_w


@triton.jit
def _merged(acc, part, old_w, new_w):
    return tl.fma(acc, old_w[:, None], part * new_w[:, None])


@triton.jit
def _split_kernel(q_ptr, new_ptr, ring_ptr, cache_ptr, ids_ptr, start_ptr, acc_ptr, ml_ptr, T, H, C, K, NENTRIES,
                  SPLITS, keys_per_split, total_keys, scale, sq_b, sq_t, sq_h, sn_b, sn_t, sr_b, sr_c, sc_b, sc_e,
                  si_b, si_t, WINDOW: tl.constexpr, RATIO: tl.constexpr, SPARSE: tl.constexpr,
                  ROUNDED: tl.constexpr, WIDTH: tl.constexpr, D_P2: tl.constexpr, QBLOCK: tl.constexpr,
                  SCALE_OFF: tl.constexpr, SCALE_WORD: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRODUCT: tl.constexpr, PDL: tl.constexpr):
    """Program (token, range, head block): the range's (max, sum, unnormalised output) into the partials."""
    after_predecessor(PDL)
    bt, split, hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, t, start, p, heads, hmask, q = _query(q_ptr, start_ptr, bt, hb, T, H, sq_b, sq_t, sq_h, WIDTH, D_P2,
                                             BLOCK_H, PRODUCT)
    first = split * keys_per_split
    m_i, l_i, acc = _attend_range(
        q, b, t, start, p, first, tl.minimum(first + keys_per_split, total_keys), new_ptr, ring_ptr, cache_ptr,
        ids_ptr, C, K, NENTRIES, scale, sn_b, sn_t, sr_b, sr_c, sc_b, sc_e, si_b, si_t, WINDOW, RATIO, SPARSE,
        ROUNDED, WIDTH, D_P2, QBLOCK, SCALE_OFF, SCALE_WORD, ROW_ALIGN, BLOCK_H, BLOCK_N, PRODUCT)
    cols = tl.arange(0, D_P2)
    row = (bt * SPLITS + split) * H + heads
    tl.store(ml_ptr + row * 2, m_i, mask=hmask)
    tl.store(ml_ptr + row * 2 + 1, l_i, mask=hmask)
    tl.store(acc_ptr + row[:, None] * WIDTH + cols[None, :], acc, mask=hmask[:, None] & (cols < WIDTH)[None, :])


@triton.jit
def _folded_kernel(q_ptr, new_ptr, ring_ptr, cache_ptr, ids_ptr, start_ptr, sink_ptr, merged_ptr, out_ptr, T, H, C,
                   K, NENTRIES, SPLITS, keys_per_split, total_keys, scale, sq_b, sq_t, sq_h, sn_b, sn_t, sr_b, sr_c,
                   sc_b, sc_e, si_b, si_t, WINDOW: tl.constexpr, RATIO: tl.constexpr, SPARSE: tl.constexpr,
                   ROUNDED: tl.constexpr, WIDTH: tl.constexpr, D_P2: tl.constexpr, QBLOCK: tl.constexpr,
                   SCALE_OFF: tl.constexpr, SCALE_WORD: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRODUCT: tl.constexpr, PDL: tl.constexpr):
    """Program (token, head block): every range in order, each merged as `_combine_kernel` merges partials. The
    merged output lives in this program's own fp32 rows of `merged_ptr` (cache-resident), not in registers: two
    [64, 512] fp32 accumulators would be the whole register file."""
    after_predecessor(PDL)
    bt, hb = tl.program_id(0), tl.program_id(1)
    b, t, start, p, heads, hmask, q = _query(q_ptr, start_ptr, bt, hb, T, H, sq_b, sq_t, sq_h, WIDTH, D_P2,
                                             BLOCK_H, PRODUCT)
    peak = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
    total = tl.full((BLOCK_H,), 1.0, tl.float32)
    cols = tl.arange(0, D_P2)
    mine = hmask[:, None] & (cols < WIDTH)[None, :]
    merged = merged_ptr + (bt * H + heads[:, None]) * WIDTH + cols[None, :]
    for split in range(0, SPLITS):
        first = split * keys_per_split
        m_i, l_i, acc = _attend_range(
            q, b, t, start, p, first, tl.minimum(first + keys_per_split, total_keys), new_ptr, ring_ptr, cache_ptr,
            ids_ptr, C, K, NENTRIES, scale, sn_b, sn_t, sr_b, sr_c, sc_b, sc_e, si_b, si_t, WINDOW, RATIO, SPARSE,
            ROUNDED, WIDTH, D_P2, QBLOCK, SCALE_OFF, SCALE_WORD, ROW_ALIGN, BLOCK_H, BLOCK_N, PRODUCT)
        peak, total, old_w, new_w = _merge(peak, total, m_i, l_i)
        tl.debug_barrier()  # the rows other threads of this program stored for the range before
        tl.store(merged, _merged(tl.load(merged, mask=mine & (split > 0), other=0.0), acc, old_w, new_w), mask=mine)
    tl.debug_barrier()
    tl.store(out_ptr + (bt * H + heads[:, None]) * WIDTH + cols[None, :],
             bf16_rounded(tl.load(merged, mask=mine, other=0.0) / total[:, None]).to(tl.bfloat16), mask=mine)


@triton.jit
def _combine_kernel(acc_ptr, ml_ptr, sink_ptr, out_ptr, H, SPLITS, D: tl.constexpr, D_P2: tl.constexpr,
                    BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """Program (token, head block): the partials of its ranges merged in range order, starting from the sink."""
    after_predecessor(PDL)
    bt, hb = tl.program_id(0), tl.program_id(1)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    cols = tl.arange(0, D_P2)
    peak = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
    total = tl.full((BLOCK_H,), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_H, D_P2), tl.float32)
    for split in range(0, SPLITS):
        row = (bt * SPLITS + split) * H + heads
        m = tl.load(ml_ptr + row * 2, mask=hmask, other=float("-inf"))
        peak, total, old_w, new_w = _merge(peak, total, m, tl.load(ml_ptr + row * 2 + 1, mask=hmask, other=0.0))
        part = tl.load(acc_ptr + row[:, None] * D + cols[None, :], mask=hmask[:, None] & (cols < D)[None, :], other=0.0)
        acc = _merged(acc, part, old_w, new_w)
    out = acc / total[:, None]
    tl.store(out_ptr + (bt * H + heads[:, None]) * D + cols[None, :], bf16_rounded(out).to(tl.bfloat16),
             mask=hmask[:, None] & (cols < D)[None, :])


def kernel_constexprs(window: int, ratio: int, sparse: bool, width: int, rounded: int, block: int, row_bytes: int,
                      launch: AttentionLaunch) -> dict:
    """The split and folded kernels' constexprs, for rows of `row_bytes` bytes. SCALE_WORD: 8 where a row's scales
    fill (with padding) one aligned 8-byte word, read as one; else 1 (a byte each)."""
    scale_off, row_align = rounded + 2 * (width - rounded), min(16, row_bytes & -row_bytes)
    d_p2 = triton.next_power_of_2(width)
    word = scale_off % 8 == 0 and row_align >= 8 and row_bytes - scale_off >= 8 and d_p2 // block <= 8
    return dict(WINDOW=window, RATIO=ratio, SPARSE=sparse, ROUNDED=rounded, WIDTH=width, D_P2=d_p2, QBLOCK=block,
                SCALE_OFF=scale_off, SCALE_WORD=8 if word else 1, ROW_ALIGN=row_align, BLOCK_H=launch.block_h,
                BLOCK_N=launch.block_n, PRODUCT=launch.product)


def sparse_decode_attention(q: torch.Tensor, new: torch.Tensor, ring: torch.Tensor, cache: torch.Tensor,
                            ids: torch.Tensor, start: torch.Tensor, sink: torch.Tensor, scale: float, window: int,
                            ratio: int, rounded: int, block: int,
                            launch: AttentionLaunch | None = None) -> torch.Tensor:
    """codegen/sparse_attention.py's op on packed rows (contiguous last dims; bf16 RoPE dims)."""
    batch, steps, heads, width = q.shape
    if q.dtype != torch.bfloat16:
        raise ValueError(f"sparse_decode_attention kernel: q (and the rows' raw dims) must be bf16, got {q.dtype}")
    q, new, ring, cache = (t.contiguous() for t in (q, new, ring, cache))
    sparse = bool(ratio and ids.shape[-1])
    entries = ids.shape[-1] if sparse else (cache.shape[1] if ratio else 0)
    total = window + entries
    if launch is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        launch = attention_launch(batch * steps, heads, total, sms, "bf16" if q.is_cuda else "ieee")
    if launch.product == "bf16" and not q.is_cuda:
        raise ValueError("sparse_decode_attention kernel: bf16 products need a GPU (the interpreter's are wrong)")
    if block & (block - 1) or ring.shape[1] < launch.block_n or ids.dtype != torch.int64:
        raise ValueError(f"sparse_decode_attention kernel: the scale block ({block}) must be a power of two, the "
                         f"ring ({ring.shape[1]} slots) hold a tile of {launch.block_n} keys and ids be int64 "
                         f"({ids.dtype})")
    ids = ids.contiguous()
    sink = sink.float().contiguous()
    out = torch.empty_like(q)
    rows = (q, new, ring, cache, ids, start.contiguous())
    sizes = (steps, heads, ring.shape[1], ids.shape[-1], cache.shape[1], launch.splits, launch.keys_per_split,
             total, scale, q.stride(0), q.stride(1), q.stride(2), new.stride(0), new.stride(1), ring.stride(0),
             ring.stride(1), cache.stride(0), cache.stride(1), ids.stride(0), ids.stride(1))
    constexprs = kernel_constexprs(window, ratio, sparse, width, rounded, block, new.shape[-1], launch)
    pdl = q.is_cuda  # each kernel launched as its predecessor's programmatic dependent (codegen/kernels/pdl.py)
    head_blocks = triton.cdiv(heads, launch.block_h)
    if launch.fold:
        merged = torch.empty((batch * steps, heads, width), dtype=torch.float32, device=q.device)
        _folded_kernel[(batch * steps, head_blocks)](*rows, sink, merged, out, *sizes, **constexprs, PDL=pdl,
                                                     **launch.options(), **launch_options(pdl))
        return out
    acc = torch.empty((batch * steps, launch.splits, heads, width), dtype=torch.float32, device=q.device)
    ml = torch.empty((batch * steps, launch.splits, heads, 2), dtype=torch.float32, device=q.device)
    _split_kernel[(batch * steps, launch.splits, head_blocks)](*rows, acc, ml, *sizes, **constexprs, PDL=pdl,
                                                               **launch.options(), **launch_options(pdl))
    _combine_kernel[(batch * steps, triton.cdiv(heads, COMBINE_HEADS))](
        acc, ml, sink, out, heads, launch.splits, D=width, D_P2=triton.next_power_of_2(width), BLOCK_H=COMBINE_HEADS,
        PDL=pdl, **launch_options(pdl))
    return out
