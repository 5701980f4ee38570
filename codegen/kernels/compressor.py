"""DeepSeek-V4's KV compressor step in Triton, one launch per compressor per step; the PyTorch twin (and the op's
contract) is codegen/compressor.py.

One program per sequence. For each token of the step that completes a block it pools the block's window (two
passes over its slots: the column max of the scores, then the sums of exp and exp * kv; the window's positions come
from the ring or from this step's rows), casts, normalises, rotates, optionally Hadamard-transforms (a butterfly in
registers, stage by stage as model/quant.py `hadamard` adds), rounds and packs the row into its cache row; tokens
that complete nothing write the packed zero row to the spill row. Then, after a barrier (every read of the old ring
done), it writes the step's tokens into their ring slots: one program owns a sequence's ring, so no other program
reads a slot it overwrites.

Every rounding is integer arithmetic on fp32 bits (bf16, e4m3 and e2m1 codes, e8m0 scales), identical under the
interpreter and on a GPU, divisions and the square root are IEEE (`div_rn`, `sqrt_rn`) and no multiply-add is fused
(`enable_fp_fusion=False`, as the reference's separate ops round); so the bytes are the reference's wherever the fp32
values are. What may differ: the summation orders (softmax, norm) and `exp`, a last-bit difference that the casts to
the row's dtype almost always absorb.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.hadamard import hadamard_butterflies
from dsv4c.codegen.kernels.number_formats import bf16_rounded_if, e2m1_value, e8m0_byte, pow2
from dsv4c.codegen.kernels.pdl import after_predecessor, launch_options
from dsv4c.codegen.kv_cache import PackedLayout

FP8_MAX, FP4_MAX = tl.constexpr(448.0), tl.constexpr(6.0)
FP8_AMAX_FLOOR, FP4_AMAX_FLOOR = tl.constexpr(1e-4), tl.constexpr(6.0 * 2.0 ** -126)  # model/quant.py's floors
RAW_VIEWS = {2: torch.int16, 4: torch.int32}  # the raw dims' bits, by the row dtype's size


@dataclasses.dataclass(frozen=True)
class CompressorLaunch:
    """Window slots per tile of the pooling loops, and warps per program (one program a sequence)."""

    block_s: int
    num_warps: int


def compressor_launch(window: int, width: int) -> CompressorLaunch:
    """Tiles of at most 8K fp32 values a tensor; 8 warps for Flash's 512-dim rows, 4 below."""
    width_p2 = triton.next_power_of_2(width)
    block_s = min(triton.next_power_of_2(window), max(1, 8192 // width_p2))
    return CompressorLaunch(block_s, 8 if width_p2 >= 512 else 4)


# ---- exact roundings, by integer arithmetic --------------------------------------------------------------
@triton.jit
def _scale_exponent(amax, FP4: tl.constexpr):
    """log2 of model/quant.py `power_of_two_scale(max(amax, floor), fmt_max)`."""
    if FP4:
        return e8m0_byte(tl.maximum(amax, FP4_AMAX_FLOOR), FP4_MAX) - 127
    else:
        return e8m0_byte(tl.maximum(amax, FP8_AMAX_FLOOR), FP8_MAX) - 127


@triton.jit
def _e4m3_code(y):
    """The e4m3fn byte of fp32 y (|y| <= 448), rounded to nearest even as torch converts, the sign kept at zero."""
    bits = y.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    normal = ((magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    steps = tl.abs(y) * 512.0  # subnormals: multiples of 2^-9
    whole = steps.to(tl.int32)
    frac = steps - whole.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))
    code = tl.where(tl.abs(y) < 0.015625, whole + up.to(tl.int32), normal)
    return code | (((bits >> 31) & 1) << 7)


@triton.jit
def _e4m3_value(code):
    exponent = (code >> 3) & 15
    mantissa = (code & 7).to(tl.float32)
    magnitude = tl.where(exponent == 0, mantissa * 0.001953125, (mantissa + 8.0) * pow2(exponent - 10))
    return tl.where((code >> 7) != 0, -magnitude, magnitude)


@triton.jit
def _e2m1_code(y):
    """model/quant.py `float_to_e2m1`: nearest e2m1 code (ties to even, saturating), sign bit 3 unless zero."""
    m = tl.abs(y)
    code = ((m > 0.25).to(tl.int32) + (m >= 0.75).to(tl.int32) + (m > 1.25).to(tl.int32)
            + (m >= 1.75).to(tl.int32) + (m > 2.5).to(tl.int32) + (m >= 3.5).to(tl.int32) + (m > 5.0).to(tl.int32))
    negative = ((y.to(tl.int32, bitcast=True) >> 31) & 1) == 1
    return tl.where(negative & (code > 0), code | 8, code)


@triton.jit
def _quantize(blocks, FP4: tl.constexpr):
    """(codes, scale exponents) of fp32 blocks `[n, block]`, as model/quant.py's fake quantisation computes them."""
    exponent = _scale_exponent(tl.max(tl.abs(blocks), axis=1), FP4)
    scaled = blocks * pow2(-exponent)[:, None]
    if FP4:
        codes = _e2m1_code(scaled)
    else:
        codes = _e4m3_code(tl.minimum(tl.maximum(scaled, -FP8_MAX), FP8_MAX))
    return codes, exponent


@triton.jit
def _dequantize(codes, exponent, FP4: tl.constexpr):
    if FP4:
        values = e2m1_value(codes)
    else:
        values = _e4m3_value(codes)
    return values * pow2(exponent)[:, None]


# ---- the row: pool, normalise, rotate, pack --------------------------------------------------------------
@triton.jit
def _window_tile(kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, p, slots, cols, cmask,
                 skv_b, skv_t, sst_b, sst_c, sape, C, WIDTH: tl.constexpr, RATIO: tl.constexpr, COFF: tl.constexpr,
                 WINDOW: tl.constexpr, LOAD_KV: tl.constexpr):
    """(kv, score) `[slots, cols]` of the window ending at position p: this step's rows (score plus ape) for positions
    >= start, the ring's for earlier ones; -inf scores past the window."""
    pos = p - WINDOW + 1 + slots
    in_window = slots < WINDOW
    column = cols[None, :]
    if COFF == 2:
        column = column + tl.where(slots >= RATIO, WIDTH, 0)[:, None]
    fresh = (in_window & (pos >= start))[:, None] & cmask[None, :]
    old = (in_window & (pos < start))[:, None] & cmask[None, :]
    slot = ((pos % C) + C) % C
    new_row = b * skv_b + tl.where(pos >= start, pos - start, 0) * skv_t
    ring_row = b * sst_b + slot * sst_c
    ape = tl.load(ape_ptr + (tl.where(pos >= 0, pos, 0) % RATIO)[:, None] * sape + column, mask=fresh, other=0.0)
    score = tl.where(fresh, tl.load(score_ptr + new_row[:, None] + column, mask=fresh, other=0.0) + ape,
                     tl.load(score_state_ptr + ring_row[:, None] + column, mask=old, other=float("-inf")))
    score = tl.where(in_window[:, None] & cmask[None, :], score, float("-inf"))
    kv = score
    if LOAD_KV:
        kv = tl.where(fresh, tl.load(kv_ptr + new_row[:, None] + column, mask=fresh, other=0.0),
                      tl.load(kv_state_ptr + ring_row[:, None] + column, mask=old, other=0.0))
    return kv, score


@triton.jit
def _pool(kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, p, cols, cmask, skv_b, skv_t, sst_b,
          sst_c, sape, C, WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr, RATIO: tl.constexpr, COFF: tl.constexpr,
          BLOCK_S: tl.constexpr):
    """The window's softmax-weighted sum per column, fp32 `[WIDTH_P2]`."""
    WINDOW: tl.constexpr = COFF * RATIO
    peak = tl.full((WIDTH_P2,), float("-inf"), tl.float32)
    for first in range(0, WINDOW, BLOCK_S):
        slots = first + tl.arange(0, BLOCK_S)
        _, score = _window_tile(kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, p, slots, cols,
                                cmask, skv_b, skv_t, sst_b, sst_c, sape, C, WIDTH, RATIO, COFF, WINDOW, False)
        peak = tl.maximum(peak, tl.max(score, axis=0))
    peak = tl.where(cmask, peak, 0.0)
    total = tl.zeros((WIDTH_P2,), tl.float32)
    acc = tl.zeros((WIDTH_P2,), tl.float32)
    for first in range(0, WINDOW, BLOCK_S):
        slots = first + tl.arange(0, BLOCK_S)
        kv, score = _window_tile(kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, p, slots, cols,
                                 cmask, skv_b, skv_t, sst_b, sst_c, sape, C, WIDTH, RATIO, COFF, WINDOW, True)
        weight = tl.exp(score - peak[None, :])
        total += tl.sum(weight, axis=0)
        acc += tl.sum(weight * kv, axis=0)
    return tl.math.div_rn(acc, tl.where(cmask, total, 1.0))


@triton.jit
def _normalise_and_rotate(x, norm_ptr, cos_ptr, sin_ptr, b, t, cols, cmask, scs_b, scs_t, eps, hadamard_scale,
                          WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr, HALF_ROPE: tl.constexpr,
                          ROTATE: tl.constexpr, STAGES: tl.constexpr, BF16: tl.constexpr):
    """RMSNorm, RoPE on the last 2 * HALF_ROPE dims, then the optional Hadamard transform, each cast as the model
    casts."""
    x = tl.where(cmask, bf16_rounded_if(x, BF16), 0.0)
    mean = tl.math.div_rn(tl.sum(x * x, axis=0), WIDTH * 1.0)
    factor = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean + eps))
    x = bf16_rounded_if(x * factor * tl.load(norm_ptr + cols, mask=cmask, other=0.0), BF16)
    even, odd = tl.split(tl.reshape(x, (WIDTH_P2 // 2, 2)))
    pair = tl.arange(0, WIDTH_P2 // 2) - (WIDTH // 2 - HALF_ROPE)
    rope = (pair >= 0) & (pair < HALF_ROPE)
    angle = b * scs_b + t * scs_t + tl.where(rope, pair, 0)
    cos = tl.load(cos_ptr + angle, mask=rope, other=1.0)
    sin = tl.load(sin_ptr + angle, mask=rope, other=0.0)
    rotated_even = tl.where(rope, bf16_rounded_if(even * cos - odd * sin, BF16), even)
    rotated_odd = tl.where(rope, bf16_rounded_if(even * sin + odd * cos, BF16), odd)
    x = tl.reshape(tl.join(rotated_even, rotated_odd), (WIDTH_P2,))
    if ROTATE:
        x = bf16_rounded_if(hadamard_butterflies(x, WIDTH_P2, STAGES) * hadamard_scale, BF16)
    return x


@triton.jit
def _store_row(cache_ptr, raw_ptr, row, raw_row, x, cols, cmask, WIDTH_P2: tl.constexpr, ROUNDED: tl.constexpr,
               BLOCK: tl.constexpr, FP4: tl.constexpr, BF16: tl.constexpr, CODE_BYTES: tl.constexpr,
               RAW_ITEM: tl.constexpr, SCALE_OFF: tl.constexpr, PAD: tl.constexpr):
    """kv_pack of the model's rounding of row x into the cache row at byte offset `row`: the fake quantisation's
    values re-quantised (their scale may be smaller than the first), as the graph packs what the model rounded."""
    blocks = tl.reshape(x, (WIDTH_P2 // BLOCK, BLOCK))
    codes, exponent = _quantize(blocks, FP4)
    codes, exponent = _quantize(bf16_rounded_if(_dequantize(codes, exponent, FP4), BF16), FP4)
    scale_index = tl.arange(0, WIDTH_P2 // BLOCK)
    tl.store(cache_ptr + row + SCALE_OFF + scale_index, (tl.minimum(tl.maximum(exponent + 127, 0), 254)).to(tl.uint8),
             mask=scale_index < ROUNDED // BLOCK)
    codes = tl.reshape(codes, (WIDTH_P2,))
    if FP4:
        low, high = tl.split(tl.reshape(codes & 15, (WIDTH_P2 // 2, 2)))
        pairs = tl.arange(0, WIDTH_P2 // 2)
        tl.store(cache_ptr + row + pairs, (low | (high << 4)).to(tl.uint8), mask=pairs < ROUNDED // 2)
    else:
        tl.store(cache_ptr + row + cols, codes.to(tl.uint8), mask=cols < ROUNDED)
    raw = cmask & (cols >= ROUNDED)
    bits = x.to(tl.int32, bitcast=True)
    if RAW_ITEM == 2:
        bits = (bits >> 16).to(tl.int16)
    tl.store(raw_ptr + raw_row + CODE_BYTES // RAW_ITEM + tl.where(raw, cols - ROUNDED, 0), bits, mask=raw)
    if PAD > 0:
        pad = tl.arange(0, 8)
        tl.store(cache_ptr + row + SCALE_OFF + ROUNDED // BLOCK + pad, tl.zeros((8,), tl.uint8), mask=pad < PAD)


@triton.jit
def _compress_kernel(cache_ptr, raw_ptr, kv_state_ptr, score_state_ptr, kv_ptr, score_ptr, ape_ptr, norm_ptr,
                     cos_ptr, sin_ptr, start_ptr, T, C, SPILL, eps, hadamard_scale,
                     sca_b, sca_r, sraw_b, sraw_r, sst_b, sst_c, skv_b, skv_t, sape, scs_b, scs_t,
                     WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr, FEATURES_P2: tl.constexpr, RATIO: tl.constexpr,
                     COFF: tl.constexpr, HALF_ROPE: tl.constexpr, ROUNDED: tl.constexpr, BLOCK: tl.constexpr,
                     FP4: tl.constexpr, ROTATE: tl.constexpr, STAGES: tl.constexpr, BF16: tl.constexpr,
                     CODE_BYTES: tl.constexpr, RAW_ITEM: tl.constexpr, SCALE_OFF: tl.constexpr, PAD: tl.constexpr,
                     BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
    b = tl.program_id(0).to(tl.int64)
    start = tl.load(start_ptr + b)
    cols = tl.arange(0, WIDTH_P2)
    cmask = cols < WIDTH
    for t in range(0, T):
        p = start + t
        if (p + 1) % RATIO == 0:
            x = _pool(kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, p, cols, cmask, skv_b,
                      skv_t, sst_b, sst_c, sape, C, WIDTH, WIDTH_P2, RATIO, COFF, BLOCK_S)
            x = _normalise_and_rotate(x, norm_ptr, cos_ptr, sin_ptr, b, t, cols, cmask, scs_b, scs_t, eps,
                                      hadamard_scale, WIDTH, WIDTH_P2, HALF_ROPE, ROTATE, STAGES, BF16)
            entry = tl.minimum(p // RATIO, SPILL)
        else:
            x = tl.zeros((WIDTH_P2,), tl.float32)
            entry = SPILL + 0 * p
        _store_row(cache_ptr, raw_ptr, b * sca_b + entry * sca_r, b * sraw_b + entry * sraw_r, x, cols, cmask,
                   WIDTH_P2, ROUNDED, BLOCK, FP4, BF16, CODE_BYTES, RAW_ITEM, SCALE_OFF, PAD)
    tl.debug_barrier()  # every read of the old ring is done before a slot is overwritten
    features = tl.arange(0, FEATURES_P2)
    fmask = features < COFF * WIDTH
    for t in range(tl.maximum(T - C, 0), T):
        p = start + t
        kv = tl.load(kv_ptr + b * skv_b + t * skv_t + features, mask=fmask)
        score = tl.load(score_ptr + b * skv_b + t * skv_t + features, mask=fmask) \
            + tl.load(ape_ptr + (p % RATIO) * sape + features, mask=fmask)
        ring = b * sst_b + (p % C) * sst_c + features
        tl.store(kv_state_ptr + ring, kv, mask=fmask)
        tl.store(score_state_ptr + ring, score, mask=fmask)


def compress_step(cache: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor, kv: torch.Tensor,
                  score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, start: torch.Tensor, ratio: int, eps: float, format: str, rounded: int,
                  block: int, rotate: bool, dtype: torch.dtype,
                  launch: CompressorLaunch | None = None) -> torch.Tensor:
    """codegen/compressor.py's op (shapes checked there): writes `cache`, `kv_state` and `score_state` in place and
    returns `cache`. The state tensors need a contiguous last dim (rows of a larger pool are fine)."""
    width = norm_weight.numel()
    layout = PackedLayout(format, width, rounded, block, dtype)
    batch, steps, features = kv.shape
    if dtype not in (torch.bfloat16, torch.float32) or any(t.stride(-1) != 1 for t in (cache, kv_state, score_state)) \
            or kv_state.stride() != score_state.stride() or (rotate and width & (width - 1)):
        raise ValueError(f"compress_step kernel: rows of {dtype} (bf16 or fp32), state with contiguous rows and "
                         f"equal ring strides, a power-of-two width to rotate (got {width})")
    launch = launch or compressor_launch((features // width) * ratio, width)
    kv, score, cos, sin = (t.contiguous() for t in (kv, score, cos, sin))
    ape, norm_weight = ape.float().contiguous(), norm_weight.float().contiguous()
    raw = cache.view(RAW_VIEWS[dtype.itemsize])
    width_p2 = triton.next_power_of_2(width)
    _compress_kernel[(batch,)](
        cache, raw, kv_state, score_state, kv, score, ape, norm_weight, cos, sin, start.contiguous(), steps,
        kv_state.shape[1], cache.shape[1] - 1, eps, 1.0 / math.sqrt(width_p2),
        cache.stride(0), cache.stride(1), raw.stride(0), raw.stride(1), kv_state.stride(0), kv_state.stride(1),
        kv.stride(0), kv.stride(1), ape.stride(0), cos.stride(0), cos.stride(1),
        WIDTH=width, WIDTH_P2=width_p2, FEATURES_P2=triton.next_power_of_2(features), RATIO=ratio,
        COFF=features // width, HALF_ROPE=cos.shape[-1], ROUNDED=rounded, BLOCK=block, FP4=format == "e2m1",
        ROTATE=rotate, STAGES=width_p2.bit_length() - 1, BF16=dtype == torch.bfloat16, CODE_BYTES=layout.code_bytes,
        RAW_ITEM=dtype.itemsize, SCALE_OFF=layout.scale_offset,
        PAD=layout.row_bytes - layout.scale_offset - layout.scale_bytes, BLOCK_S=launch.block_s,
        PDL=kv.is_cuda, num_warps=launch.num_warps, enable_fp_fusion=False, **launch_options(kv.is_cuda))
    return cache
