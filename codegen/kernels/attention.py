"""Sparse decode attention over packed FP8 rows in Triton; the PyTorch twin is codegen/sparse_attention.py.

Flash-decoding: the keys of one query (its window, then its selected or visible compressed entries) form one
index space, cut into `splits` ranges so that a single long sequence still fills the GPU. A program owns one
query token, one range and `block_h` heads (all heads share the one KV head, so a row read serves them all): per
tile of `block_n` keys it gathers each key's packed row (this step's rows, the ring, or the compressed cache,
chosen per key by masks), decodes the e4m3 codes and e8m0 scales by integer arithmetic (exact, and the same
under the interpreter as on a GPU) and the raw RoPE dims from their bf16 bits, and runs an online softmax; it
writes its (max, sum, unnormalised output). `_combine_kernel` merges the ranges with the sink in the
denominator. The products run in fp32 (`tl.dot` with IEEE inputs, no TF32), so only the summation order differs
from the reference; bf16 tensor-core products (keys are exact in bf16) are the next step for speed.

Batch invariance (runtime/batch_invariant.py): the ranges are a function of the key count, the heads and the
GPU only, never of the tokens in the step, so a query's result is the same bits whether it runs alone, as one
of 1 + k verified tokens or beside other sequences. The ranges merge in range order, starting from the sink,
one online-softmax step each (`_merge`); once the step's tokens alone fill the GPU, one program per (token,
head block) walks its ranges itself and merges them with the same `_merge` (`fold`), so no partials are
written and the bits stay the same. Cost: a step of a few tokens writes and reads partials for as many ranges
as one token would use (at most `MAX_SPLITS`, so at most about 16 x H x D x 4 bytes a token, below the fold).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl


MAX_SPLITS = 16  # key ranges a query's keys are cut into at most: bounds the partials of a step below the fold


@dataclasses.dataclass(frozen=True)
class AttentionLaunch:
    """Tile sizes, the key ranges (`splits` of `keys_per_split` keys: they order a query's sums) and whether one
    program walks all ranges of its query (`fold`) instead of a program a range and a combine kernel."""

    block_h: int
    block_n: int
    splits: int
    keys_per_split: int
    num_warps: int
    fold: bool = False


def attention_launch(tokens: int, heads: int, keys: int, sms: int) -> AttentionLaunch:
    """Ranges of whole tiles enough for one token's (range, head block) programs to fill two waves of `sms`
    processors (at most MAX_SPLITS): a function of (heads, keys, sms), never of `tokens`, which only decides the
    fold: once the tokens' head blocks alone give every processor a program."""
    block_h, block_n = 16, 32
    tiles = triton.cdiv(max(keys, 1), block_n)
    head_blocks = triton.cdiv(heads, block_h)
    splits = max(1, min(tiles, MAX_SPLITS, (2 * sms) // head_blocks))
    keys_per_split = triton.cdiv(tiles, splits) * block_n
    splits = triton.cdiv(max(keys, 1), keys_per_split)
    return AttentionLaunch(block_h, block_n, splits, keys_per_split, 4, fold=splits > 1 and tokens * head_blocks >= sms)


@triton.jit
def _pow2(exponent):
    """2^exponent for integer exponents in the normal fp32 range, exactly (built from the bits)."""
    return ((exponent + 127).to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _rows(ptr, ptr16, row, mask, ROUNDED: tl.constexpr, ROUNDED_P2: tl.constexpr, RAW: tl.constexpr,
          QBLOCK: tl.constexpr, SCALE_OFF: tl.constexpr):
    """Decoded rows `[n, ROUNDED_P2]` (codes times scales) and `[n, RAW]` (bf16 bits) at byte offsets `row`;
    zeros where `mask` is false."""
    cols = tl.arange(0, ROUNDED_P2)
    m2 = mask[:, None] & (cols < ROUNDED)[None, :]
    code = tl.load(ptr + row[:, None] + cols[None, :], mask=m2, other=0).to(tl.int32)
    exp = (code >> 3) & 15
    man = (code & 7).to(tl.float32)
    mag = tl.where(exp == 0, man * 0.001953125, (man + 8.0) * _pow2(exp - 10))
    value = tl.where((code >> 7) != 0, -mag, mag)
    sbyte = tl.load(ptr + row[:, None] + SCALE_OFF + cols[None, :] // QBLOCK, mask=m2, other=127).to(tl.int32)
    nope = value * _pow2(sbyte - 127)
    rcols = tl.arange(0, RAW)
    bits = tl.load(ptr16 + row[:, None] // 2 + ROUNDED // 2 + rcols[None, :], mask=mask[:, None], other=0)
    rope = ((bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    return nope, rope


@triton.jit
def _query(q_ptr, start_ptr, bt, hb, T, H, sq_b, sq_t, sq_h, ROUNDED: tl.constexpr, ROUNDED_P2: tl.constexpr,
           RAW: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (token bt, head block hb)'s sequence b, token t, position p, heads, head mask and fp32 query."""
    b, t = (bt // T).to(tl.int64), bt % T  # int64: b times a sequence's cache stride passes 2^31 at long context
    start = tl.load(start_ptr + b)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    cols, rcols = tl.arange(0, ROUNDED_P2), tl.arange(0, RAW)
    qrow = q_ptr + b * sq_b + t * sq_t + heads[:, None] * sq_h
    q_nope = tl.load(qrow + cols[None, :], mask=hmask[:, None] & (cols < ROUNDED)[None, :], other=0).to(tl.float32)
    q_rope = tl.load(qrow + ROUNDED + rcols[None, :], mask=hmask[:, None], other=0).to(tl.float32)
    return b, t, start, start + t, heads, hmask, q_nope, q_rope


@triton.jit
def _attend_range(q_nope, q_rope, b, t, start, p, first, last, new_ptr, new16_ptr, ring_ptr, ring16_ptr, cache_ptr,
                  cache16_ptr, ids_ptr, C, K, NENTRIES, scale, sn_b, sn_t, sr_b, sr_c, sc_b, sc_e, si_b, si_t,
                  WINDOW: tl.constexpr, RATIO: tl.constexpr, SPARSE: tl.constexpr, ROUNDED: tl.constexpr,
                  ROUNDED_P2: tl.constexpr, RAW: tl.constexpr, QBLOCK: tl.constexpr, SCALE_OFF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of one query over its keys [first, last): (max, sum, unnormalised nope and RoPE outputs)."""
    visible = (p + 1) // RATIO if RATIO > 0 else 0
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc_nope = tl.zeros((BLOCK_H, ROUNDED_P2), tl.float32)
    acc_rope = tl.zeros((BLOCK_H, RAW), tl.float32)
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
        from_ring = in_window & (pos < start)
        n1, r1 = _rows(new_ptr, new16_ptr, b * sn_b + tl.where(from_new, pos - start, 0).to(tl.int64) * sn_t,
                       from_new, ROUNDED, ROUNDED_P2, RAW, QBLOCK, SCALE_OFF)
        n2, r2 = _rows(ring_ptr, ring16_ptr, b * sr_b + tl.where(from_ring, pos % C, 0).to(tl.int64) * sr_c,
                       from_ring, ROUNDED, ROUNDED_P2, RAW, QBLOCK, SCALE_OFF)
        n3, r3 = _rows(cache_ptr, cache16_ptr, b * sc_b + tl.where(from_cache, entry, 0).to(tl.int64) * sc_e,
                       from_cache, ROUNDED, ROUNDED_P2, RAW, QBLOCK, SCALE_OFF)
        k_nope, k_rope = n1 + n2 + n3, r1 + r2 + r3
        valid = in_window | from_cache
        s = tl.dot(q_nope, tl.trans(k_nope), input_precision="ieee")
        s += tl.dot(q_rope, tl.trans(k_rope), input_precision="ieee")
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m_i - m_use)
        prob = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        acc_nope = acc_nope * alpha[:, None] + tl.dot(prob, k_nope, input_precision="ieee")
        acc_rope = acc_rope * alpha[:, None] + tl.dot(prob, k_rope, input_precision="ieee")
        m_i = m_new
    return m_i, l_i, acc_nope, acc_rope


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
def _split_kernel(q_ptr, new_ptr, new16_ptr, ring_ptr, ring16_ptr, cache_ptr, cache16_ptr, ids_ptr, start_ptr,
                  acc_ptr, ml_ptr, T, H, C, K, NENTRIES, SPLITS, keys_per_split, total_keys, scale,
                  sq_b, sq_t, sq_h, sn_b, sn_t, sr_b, sr_c, sc_b, sc_e, si_b, si_t,
                  WINDOW: tl.constexpr, RATIO: tl.constexpr, SPARSE: tl.constexpr, ROUNDED: tl.constexpr,
                  ROUNDED_P2: tl.constexpr, RAW: tl.constexpr, QBLOCK: tl.constexpr, SCALE_OFF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (token, range, head block): the range's (max, sum, unnormalised output) into the partials."""
    bt, split, hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, t, start, p, heads, hmask, q_nope, q_rope = _query(q_ptr, start_ptr, bt, hb, T, H, sq_b, sq_t, sq_h,
                                                          ROUNDED, ROUNDED_P2, RAW, BLOCK_H)
    first = split * keys_per_split
    m_i, l_i, acc_nope, acc_rope = _attend_range(
        q_nope, q_rope, b, t, start, p, first, tl.minimum(first + keys_per_split, total_keys), new_ptr, new16_ptr,
        ring_ptr, ring16_ptr, cache_ptr, cache16_ptr, ids_ptr, C, K, NENTRIES, scale, sn_b, sn_t, sr_b, sr_c, sc_b,
        sc_e, si_b, si_t, WINDOW, RATIO, SPARSE, ROUNDED, ROUNDED_P2, RAW, QBLOCK, SCALE_OFF, BLOCK_H, BLOCK_N)
    cols, rcols = tl.arange(0, ROUNDED_P2), tl.arange(0, RAW)
    row = (bt * SPLITS + split) * H + heads
    tl.store(ml_ptr + row * 2, m_i, mask=hmask)
    tl.store(ml_ptr + row * 2 + 1, l_i, mask=hmask)
    out = acc_ptr + row[:, None] * (ROUNDED + RAW)
    tl.store(out + cols[None, :], acc_nope, mask=hmask[:, None] & (cols < ROUNDED)[None, :])
    tl.store(out + ROUNDED + rcols[None, :], acc_rope, mask=hmask[:, None])


@triton.jit
def _folded_kernel(q_ptr, new_ptr, new16_ptr, ring_ptr, ring16_ptr, cache_ptr, cache16_ptr, ids_ptr, start_ptr,
                   sink_ptr, out_ptr, T, H, C, K, NENTRIES, SPLITS, keys_per_split, total_keys, scale,
                   sq_b, sq_t, sq_h, sn_b, sn_t, sr_b, sr_c, sc_b, sc_e, si_b, si_t,
                   WINDOW: tl.constexpr, RATIO: tl.constexpr, SPARSE: tl.constexpr, ROUNDED: tl.constexpr,
                   ROUNDED_P2: tl.constexpr, RAW: tl.constexpr, QBLOCK: tl.constexpr, SCALE_OFF: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (token, head block): every range in order, each merged as `_combine_kernel` merges partials."""
    bt, hb = tl.program_id(0), tl.program_id(1)
    b, t, start, p, heads, hmask, q_nope, q_rope = _query(q_ptr, start_ptr, bt, hb, T, H, sq_b, sq_t, sq_h,
                                                          ROUNDED, ROUNDED_P2, RAW, BLOCK_H)
    peak = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
    total = tl.full((BLOCK_H,), 1.0, tl.float32)
    out_nope = tl.zeros((BLOCK_H, ROUNDED_P2), tl.float32)
    out_rope = tl.zeros((BLOCK_H, RAW), tl.float32)
    for split in range(0, SPLITS):
        first = split * keys_per_split
        m_i, l_i, acc_nope, acc_rope = _attend_range(
            q_nope, q_rope, b, t, start, p, first, tl.minimum(first + keys_per_split, total_keys), new_ptr,
            new16_ptr, ring_ptr, ring16_ptr, cache_ptr, cache16_ptr, ids_ptr, C, K, NENTRIES, scale, sn_b, sn_t,
            sr_b, sr_c, sc_b, sc_e, si_b, si_t, WINDOW, RATIO, SPARSE, ROUNDED, ROUNDED_P2, RAW, QBLOCK, SCALE_OFF,
            BLOCK_H, BLOCK_N)
        peak, total, old_w, new_w = _merge(peak, total, m_i, l_i)
        out_nope = _merged(out_nope, acc_nope, old_w, new_w)
        out_rope = _merged(out_rope, acc_rope, old_w, new_w)
    cols, rcols = tl.arange(0, ROUNDED_P2), tl.arange(0, RAW)
    out = out_ptr + (bt * H + heads[:, None]) * (ROUNDED + RAW)
    tl.store(out + cols[None, :], (out_nope / total[:, None]).to(out_ptr.dtype.element_ty),
             mask=hmask[:, None] & (cols < ROUNDED)[None, :])
    tl.store(out + ROUNDED + rcols[None, :], (out_rope / total[:, None]).to(out_ptr.dtype.element_ty),
             mask=hmask[:, None])


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
    tl.store(out_ptr + (bt * H + heads[:, None]) * D + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=hmask[:, None] & (cols < D)[None, :])


def sparse_decode_attention(q: torch.Tensor, new: torch.Tensor, ring: torch.Tensor, cache: torch.Tensor,
                            ids: torch.Tensor, start: torch.Tensor, sink: torch.Tensor, scale: float, window: int,
                            ratio: int, rounded: int, block: int,
                            launch: AttentionLaunch | None = None) -> torch.Tensor:
    """codegen/sparse_attention.py's op on packed rows (contiguous last dims; bf16 RoPE dims)."""
    batch, steps, heads, width = q.shape
    raw = width - rounded
    if q.dtype != torch.bfloat16 or raw & (raw - 1) or raw < 16:
        raise ValueError(f"sparse_decode_attention kernel: q must be bf16 with a power-of-two RoPE width >= 16, got "
                         f"{q.dtype} and {raw}")
    q, new, ring, cache = (t.contiguous() for t in (q, new, ring, cache))
    sparse = bool(ratio and ids.shape[-1])
    entries = ids.shape[-1] if sparse else (cache.shape[1] if ratio else 0)
    total = window + entries
    if launch is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        launch = attention_launch(batch * steps, heads, total, sms)
    ids = ids.contiguous()
    sink = sink.float().contiguous()
    out = torch.empty_like(q)
    rows = (q, new, new.view(torch.int16), ring, ring.view(torch.int16), cache, cache.view(torch.int16), ids,
            start.contiguous())
    sizes = (steps, heads, ring.shape[1], ids.shape[-1], cache.shape[1], launch.splits, launch.keys_per_split,
             total, scale, q.stride(0), q.stride(1), q.stride(2), new.stride(0), new.stride(1), ring.stride(0),
             ring.stride(1), cache.stride(0), cache.stride(1), ids.stride(0), ids.stride(1))
    constexprs = dict(WINDOW=window, RATIO=ratio, SPARSE=sparse, ROUNDED=rounded,
                      ROUNDED_P2=triton.next_power_of_2(rounded), RAW=raw, QBLOCK=block, SCALE_OFF=rounded + 2 * raw,
                      BLOCK_H=launch.block_h, BLOCK_N=launch.block_n, num_warps=launch.num_warps)
    head_blocks = triton.cdiv(heads, launch.block_h)
    if launch.fold:
        _folded_kernel[(batch * steps, head_blocks)](*rows, sink, out, *sizes, **constexprs)
        return out
    acc = torch.empty((batch * steps, launch.splits, heads, width), dtype=torch.float32, device=q.device)
    ml = torch.empty((batch * steps, launch.splits, heads, 2), dtype=torch.float32, device=q.device)
    _split_kernel[(batch * steps, launch.splits, head_blocks)](*rows, acc, ml, *sizes, **constexprs)
    _combine_kernel[(batch * steps, head_blocks)](
        acc, ml, sink, out, heads, launch.splits, D=width, D_P2=triton.next_power_of_2(width),
        BLOCK_H=launch.block_h)
    return out
