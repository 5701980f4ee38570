"""Sparse decode attention over packed FP8 rows in Triton; the PyTorch twin is codegen/sparse_attention.py.

Flash-decoding: the keys of one query (its window, then its selected or visible compressed entries) form one
index space, cut into `splits` ranges so that a single long sequence still fills the GPU. A program owns one
query token, one range and `block_h` heads (all heads share the one KV head, so a row read serves them all): per
tile of `block_n` keys it picks each key's packed row (this step's rows, the ring or the compressed cache, by
masks) and decodes it once into one [block_n, width] tile of exact values (e4m3 codes through the fp8
conversion times their e8m0 scale, built from the bits; the RoPE dims from their bf16 bits) that serves as the
keys of the scores and the values of the output; it runs an online softmax and writes its (max, sum,
unnormalised output). `_combine_kernel` merges the ranges with the sink in the denominator.

Products (`AttentionLaunch.product`). "bf16" (GPUs): scores = q @ keys^T as a bf16 x bf16 -> fp32 tensor-core
dot, exact products (q is bf16 by the op's contract, every decoded key is a bf16 value), then the probabilities
cast to bf16, as the reference casts its own, times the same key tile, accumulated in fp32 by the MMA. "ieee"
(the CPU interpreter, whose bf16 arithmetic is wrong): the same values in fp32 IEEE dots, the probabilities
rounded to bf16 (nearest, ties to even) by integer arithmetic first, so both sum the same products, in their own
orders; the output is rounded to bf16 the same way on both. The probabilities are the online softmax's
unnormalised ones (relative to the running maximum), so the result agrees with the reference within their bf16
rounding.

Launch (`attention_launch`). A program holds 64 heads (16 where a model has at most 16), so one row read and
decode serves all of them and the dots have the M = 64 rows of Hopper's wgmma: m64n16k16 for the scores of a
32-key tile (Triton gives each warpgroup all 64 rows of a dot whose result feeds another), m64n256k16 for the
output, half of its 512 dims a warpgroup (16-head programs run on mma.sync; 17 to 32 heads are padded to 64,
since 32-row mma.sync programs spill). The output accumulator [64, 512] fp32
is 128 KB: 8 warps at 128 registers a thread, with 32-key tiles beside it (64 decoded values a thread; 64-key
tiles spill). Splitting the 512 output dims over programs instead would repeat the decode and the scores dot,
which cost as much as the output dot.

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

MAX_SPLITS = 16  # key ranges a query's keys are cut into at most: bounds the partials of a step below the fold
MIN_DOT = 16  # tl.dot's smallest side: a program of up to 16 heads
WGMMA_M = 64  # Hopper's wgmma rows: a program of 17 or more heads (64 at most)
COMBINE_HEADS = 16  # heads a combine program: [16, 512] fp32 fit 4 warps (the bits do not depend on blocking)
PRODUCTS = ("bf16", "ieee")


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

    def __post_init__(self) -> None:
        pow2 = all(v >= MIN_DOT and v & (v - 1) == 0 for v in (self.block_h, self.block_n))
        if not pow2 or self.product not in PRODUCTS or self.splits < 1 or self.keys_per_split % self.block_n:
            raise ValueError(f"{self}: block_h and block_n powers of two >= {MIN_DOT}, whole tiles a range, "
                             f"product in {PRODUCTS}")


def attention_launch(tokens: int, heads: int, keys: int, sms: int, product: str = "bf16") -> AttentionLaunch:
    """Programs of 64 heads (16 for up to 16 heads), tiles of 32 keys, 8 warps; ranges of whole tiles enough for
    one token's (range, head block) programs to fill two waves of `sms` processors (at most MAX_SPLITS): a
    function of (heads, keys, sms), never of `tokens`, which only decides the fold: once the tokens' head blocks
    alone give every processor a program. `product`: "bf16" on GPUs, "ieee" under the interpreter."""
    block_h, block_n = (MIN_DOT if heads <= MIN_DOT else WGMMA_M), 32
    tiles = triton.cdiv(max(keys, 1), block_n)
    head_blocks = triton.cdiv(heads, block_h)
    splits = max(1, min(tiles, MAX_SPLITS, (2 * sms) // head_blocks))
    keys_per_split = triton.cdiv(tiles, splits) * block_n
    splits = triton.cdiv(max(keys, 1), keys_per_split)
    fold = splits > 1 and tokens * head_blocks >= sms
    return AttentionLaunch(block_h, block_n, splits, keys_per_split, 8, fold, product)


@triton.jit
def _pow2(exponent):
    """2^exponent for integer exponents in the normal fp32 range, exactly (built from the bits)."""
    return ((exponent + 127).to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_rounded(x):
    """fp32 x rounded to the nearest bf16 value (ties to even), as fp32: what `.to(tl.bfloat16)` does on a GPU,
    in integer arithmetic (the interpreter's conversion truncates); NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def _keys(row, ok, ROUNDED: tl.constexpr, WIDTH: tl.constexpr, D_P2: tl.constexpr, QBLOCK: tl.constexpr,
          SCALE_OFF: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 keys [n, D_P2] of the packed rows at byte pointers `row` (zeros where not `ok`, and past WIDTH):
    dims below ROUNDED are e4m3 codes times their block's e8m0 scale, the rest bf16 bits at byte ROUNDED."""
    cols = tl.arange(0, D_P2)
    code = tl.load(row[:, None] + cols[None, :], mask=ok[:, None] & (cols < ROUNDED)[None, :], other=0)
    blocks = tl.arange(0, D_P2 // QBLOCK)  # a scale a block, read once (not once a dim)
    sbyte = tl.load(row[:, None] + SCALE_OFF + blocks[None, :], mask=ok[:, None] & (blocks * QBLOCK < ROUNDED)[None, :],
                    other=127)
    value = tl.reshape(code.to(tl.float8e4nv, bitcast=True).to(tl.float32), (BLOCK_N, D_P2 // QBLOCK, QBLOCK))
    nope = tl.reshape(value * _pow2(sbyte.to(tl.int32) - 127)[:, :, None], (BLOCK_N, D_P2))
    raw_ptr = (row + ROUNDED).to(tl.pointer_type(tl.bfloat16))
    raw_cols = cols - ROUNDED
    uncoded = ok[:, None] & ((raw_cols >= 0) & (cols < WIDTH))[None, :]
    raw = tl.load(raw_ptr[:, None] + raw_cols[None, :], mask=uncoded, other=0.0).to(tl.float32)
    return tl.where((cols < ROUNDED)[None, :], nope, raw)


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
def _attend_range(q, b, t, start, p, first, last, new_ptr, ring_ptr, cache_ptr, ids_ptr, C, K, NENTRIES, scale,
                  sn_b, sn_t, sr_b, sr_c, sc_b, sc_e, si_b, si_t, WINDOW: tl.constexpr, RATIO: tl.constexpr,
                  SPARSE: tl.constexpr, ROUNDED: tl.constexpr, WIDTH: tl.constexpr, D_P2: tl.constexpr,
                  QBLOCK: tl.constexpr, SCALE_OFF: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRODUCT: tl.constexpr):
    """Online softmax of one query over its keys [first, last): (max, sum, unnormalised output [BLOCK_H, D_P2]).
    Key j < WINDOW is position pos = p - WINDOW + 1 + j: this step's row from `start` on, else ring slot pos % C
    (C >= BLOCK_N: a tile's slots wrap at most once); key WINDOW + c is entry ids[c] (SPARSE) or entry c."""
    visible = (p + 1) // RATIO if RATIO > 0 else 0
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D_P2), tl.float32)
    for base in range(first, last, BLOCK_N):
        j = base + tl.arange(0, BLOCK_N)
        pos = p - WINDOW + 1 + j
        in_window = (j < WINDOW) & (pos >= 0)
        c = j - WINDOW
        if SPARSE:
            listed = (j >= WINDOW) & (c < K)
            entry = tl.load(ids_ptr + b * si_b + t * si_t + c, mask=listed, other=-1)
            from_cache = listed & (entry >= 0)
        else:
            entry = c.to(tl.int64)
            from_cache = (j >= WINDOW) & (c < visible) & (c < NENTRIES)
        from_new = in_window & (pos >= start)
        new_row = tl.multiple_of(b * sn_b + tl.where(from_new, pos - start, 0).to(tl.int64) * sn_t, ROW_ALIGN)
        slot = (p - WINDOW + 1 + base + WINDOW * C) % C + tl.arange(0, BLOCK_N)  # pos % C, once a tile
        slot = tl.where(slot >= C, slot - C, slot)
        ring_row = tl.multiple_of(b * sr_b + tl.where(in_window, slot, 0).to(tl.int64) * sr_c, ROW_ALIGN)
        cache_row = tl.multiple_of(b * sc_b + tl.where(from_cache, entry, 0).to(tl.int64) * sc_e, ROW_ALIGN)
        row = tl.where(from_new, new_ptr + new_row, tl.where(in_window, ring_ptr + ring_row, cache_ptr + cache_row))
        valid = in_window | from_cache
        keys = _keys(row, valid, ROUNDED, WIDTH, D_P2, QBLOCK, SCALE_OFF, BLOCK_N)
        if PRODUCT == "bf16":
            keys = keys.to(tl.bfloat16)  # exact: bf16 values
            s = tl.dot(q, tl.trans(keys))
        else:
            s = tl.dot(q, tl.trans(keys), input_precision="ieee")
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m_i - m_use)
        prob = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        if PRODUCT == "bf16":
            acc = tl.dot(prob.to(tl.bfloat16), keys, acc * alpha[:, None])
        else:
            acc = tl.dot(_bf16_rounded(prob), keys, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
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
                  SCALE_OFF: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRODUCT: tl.constexpr):
    """Program (token, range, head block): the range's (max, sum, unnormalised output) into the partials."""
    bt, split, hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, t, start, p, heads, hmask, q = _query(q_ptr, start_ptr, bt, hb, T, H, sq_b, sq_t, sq_h, WIDTH, D_P2,
                                             BLOCK_H, PRODUCT)
    first = split * keys_per_split
    m_i, l_i, acc = _attend_range(
        q, b, t, start, p, first, tl.minimum(first + keys_per_split, total_keys), new_ptr, ring_ptr, cache_ptr,
        ids_ptr, C, K, NENTRIES, scale, sn_b, sn_t, sr_b, sr_c, sc_b, sc_e, si_b, si_t, WINDOW, RATIO, SPARSE,
        ROUNDED, WIDTH, D_P2, QBLOCK, SCALE_OFF, ROW_ALIGN, BLOCK_H, BLOCK_N, PRODUCT)
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
                   SCALE_OFF: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRODUCT: tl.constexpr):
    """Program (token, head block): every range in order, each merged as `_combine_kernel` merges partials. The
    merged output lives in this program's own fp32 rows of `merged_ptr` (cache-resident), not in registers: two
    [64, 512] fp32 accumulators would be the whole register file."""
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
            ROUNDED, WIDTH, D_P2, QBLOCK, SCALE_OFF, ROW_ALIGN, BLOCK_H, BLOCK_N, PRODUCT)
        peak, total, old_w, new_w = _merge(peak, total, m_i, l_i)
        tl.debug_barrier()  # the rows other threads of this program stored for the range before
        tl.store(merged, _merged(tl.load(merged, mask=mine & (split > 0), other=0.0), acc, old_w, new_w), mask=mine)
    tl.debug_barrier()
    tl.store(out_ptr + (bt * H + heads[:, None]) * WIDTH + cols[None, :],
             _bf16_rounded(tl.load(merged, mask=mine, other=0.0) / total[:, None]).to(tl.bfloat16), mask=mine)


@triton.jit
def _combine_kernel(acc_ptr, ml_ptr, sink_ptr, out_ptr, H, SPLITS, D: tl.constexpr, D_P2: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    """Program (token, head block): the partials of its ranges merged in range order, starting from the sink."""
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
    tl.store(out_ptr + (bt * H + heads[:, None]) * D + cols[None, :], _bf16_rounded(out).to(tl.bfloat16),
             mask=hmask[:, None] & (cols < D)[None, :])


def kernel_constexprs(window: int, ratio: int, sparse: bool, width: int, rounded: int, block: int, row_bytes: int,
                      launch: AttentionLaunch) -> dict:
    """The split and folded kernels' constexprs, for rows of `row_bytes` bytes."""
    return dict(WINDOW=window, RATIO=ratio, SPARSE=sparse, ROUNDED=rounded, WIDTH=width,
                D_P2=triton.next_power_of_2(width), QBLOCK=block, SCALE_OFF=rounded + 2 * (width - rounded),
                ROW_ALIGN=min(16, row_bytes & -row_bytes), BLOCK_H=launch.block_h, BLOCK_N=launch.block_n,
                PRODUCT=launch.product)


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
    if block & (block - 1) or ring.shape[1] < launch.block_n:
        raise ValueError(f"sparse_decode_attention kernel: the scale block ({block}) must be a power of two and the "
                         f"ring ({ring.shape[1]} slots) hold a tile of {launch.block_n} keys")
    ids = ids.contiguous()
    sink = sink.float().contiguous()
    out = torch.empty_like(q)
    rows = (q, new, ring, cache, ids, start.contiguous())
    sizes = (steps, heads, ring.shape[1], ids.shape[-1], cache.shape[1], launch.splits, launch.keys_per_split,
             total, scale, q.stride(0), q.stride(1), q.stride(2), new.stride(0), new.stride(1), ring.stride(0),
             ring.stride(1), cache.stride(0), cache.stride(1), ids.stride(0), ids.stride(1))
    constexprs = kernel_constexprs(window, ratio, sparse, width, rounded, block, new.shape[-1], launch)
    head_blocks = triton.cdiv(heads, launch.block_h)
    if launch.fold:
        merged = torch.empty((batch * steps, heads, width), dtype=torch.float32, device=q.device)
        _folded_kernel[(batch * steps, head_blocks)](*rows, sink, merged, out, *sizes, **constexprs,
                                                     num_warps=launch.num_warps)
        return out
    acc = torch.empty((batch * steps, launch.splits, heads, width), dtype=torch.float32, device=q.device)
    ml = torch.empty((batch * steps, launch.splits, heads, 2), dtype=torch.float32, device=q.device)
    _split_kernel[(batch * steps, launch.splits, head_blocks)](*rows, acc, ml, *sizes, **constexprs,
                                                               num_warps=launch.num_warps)
    _combine_kernel[(batch * steps, triton.cdiv(heads, COMBINE_HEADS))](
        acc, ml, sink, out, heads, launch.splits, D=width, D_P2=triton.next_power_of_2(width), BLOCK_H=COMBINE_HEADS)
    return out
