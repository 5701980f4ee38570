"""The model's number formats inside Triton kernels: exact roundings and decodings on fp32 bits.

Every kernel that rounds to bf16, e4m3 or e2m1, or decodes e8m0 scales and e2m1 codes, calls these (but the
mHC kernels, below). They work
on integer bits and exact fp32 additions, so the CPU interpreter (whose fp32 -> bf16 and fp32 -> fp8
conversions truncate) and the GPU round the same way: round to nearest, ties to even, as torch converts.

    pow2(e)                   2^e for int32 e in the normal fp32 range
    bf16_rounded(x)           x rounded to bf16, as fp32; NaN stays NaN
    bf16_rounded_if(x, BF16)  x rounded to bf16 where BF16 (a row dtype of bf16 or fp32), else x
    rounded_to(x, DTYPE)      x rounded to DTYPE (bf16 by hand, fp32 as it is, other dtypes by conversion), as fp32
    e4m3_grid(q)              q (|q| <= 448) rounded to the nearest e4m3 value, as fp32
    e2m1_grid(q)              q (|q| <= 6) rounded to the nearest e2m1 value, as fp32
    e2m1_value(code)          the value of a 4-bit e2m1 code (bit 3 the sign)
    e8m0_byte(amax, M)        the e8m0 byte of quant.power_of_two_scale for a block of amax and format maximum M
    e8m0_values(byte)         2^(byte - 127) of e8m0 bytes; e8m0_bits(bits) the same from the exponent field
    e8m0_pair(byte)           (2^(byte - 127), its inverse) of int32 bytes 1 to 253, NaN for 255
    block_rounded(a, M, F)    rows rounded to e4m3 (M 448) or e2m1 (M 6) with a power-of-two scale a row, amax
                              floored at F: quant.fake_quant_fp8 / fake_quant_fp4 of one block a row

The mHC kernels keep their own bf16 rounding (codegen/kernels/mhc_kernels.py `_round`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pow2(exponent):
    """2^exponent for integer exponents in the normal fp32 range [-126, 127], exactly (built from the bits)."""
    return ((exponent + 127).to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def bf16_rounded(x):
    """fp32 x rounded to the nearest bf16 value (ties to even), as fp32: what `.to(tl.bfloat16)` does on a GPU;
    NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def bf16_rounded_if(x, BF16: tl.constexpr):
    """x rounded to bf16 where BF16, else x: a row of bf16 or fp32, as fp32."""
    if BF16:
        x = bf16_rounded(x)
    return x


@triton.jit
def rounded_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE and back: bf16 by `bf16_rounded`, fp32 unchanged, any other by conversion."""
    if DTYPE == tl.bfloat16:
        return bf16_rounded(x)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def exactly_to(x, DTYPE: tl.constexpr):
    """fp32 x, each value exactly representable in DTYPE (or NaN), converted to DTYPE. bf16 takes x's upper 16 bits:
    what a GPU's conversion gives for such values, bf16 subnormals included, which Triton's CPU interpreter's
    conversion flushes to zero."""
    if DTYPE == tl.bfloat16:
        return (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def e4m3_grid(q):
    """q (fp32, |q| <= 448) rounded to the nearest e4m3 value, ties to even, as fp32. e4m3 values of q's
    binade are multiples of s = 2^(max(e, -6) - 3); adding and subtracting 1.5 * 2^23 * s rounds q to a
    multiple of s in one fp32 addition."""
    exponent = (q.to(tl.int32, bitcast=True) >> 23) & 0xFF
    magic = (((tl.maximum(exponent, 127 - 6) + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (q + magic) - magic


@triton.jit
def e2m1_grid(q):
    """q (fp32, |q| <= 6) rounded to the nearest e2m1 value, ties to even: values of q's binade [2^e, 2^(e+1))
    are multiples of 2^(max(e, 0) - 1), and adding and subtracting 1.5 * 2^23 times that rounds to one."""
    exponent = (q.to(tl.int32, bitcast=True) >> 23) & 0xFF
    magic = (((tl.maximum(exponent, 127) + 22) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (q + magic) - magic


@triton.jit
def e2m1_value(code):
    """fp32 values of e2m1 codes (int32 0..15): level m = code & 7 is m / 2 below 4, m - 2 from 4 to 6, and 6 for
    7; bit 3 the sign."""
    level = code & 7
    magnitude = tl.where(level < 4, level.to(tl.float32) * 0.5,
                         tl.where(level == 7, 6.0, (level - 2).to(tl.float32)))
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def e8m0_byte(amax, FMT_MAX: tl.constexpr):
    """The e8m0 byte (biased exponent) of the smallest power of two s with amax / s <= FMT_MAX (448 or 6), as
    `quant.power_of_two_scale` takes it from the correctly rounded fp32 r = amax / FMT_MAX (r's exponent, plus
    one unless r is a power of two); 255 (NaN) for inf or NaN. amax is positive and r normal (the amax floors
    see to it). Without the division: with amax = M 2^a and FMT_MAX = F 2^f (M, F in [1, 2), F 1.75 or 1.5), r
    rounds to a power of two exactly when M = F, and its exponent is a - f, less one when M < F; so the byte is
    a - f + 127 (biased) plus one when M > F."""
    bits = amax.to(tl.int32, bitcast=True)
    fmt_bits = tl.full([], FMT_MAX, tl.float32).to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    exponent = biased - ((fmt_bits >> 23) - 127) + ((bits & 0x7FFFFF) > (fmt_bits & 0x7FFFFF)).to(tl.int32)
    return tl.where(biased == 255, 255, exponent)


@triton.jit
def e8m0_values(byte):
    """2^(byte - 127) in fp32 of e8m0 bytes (uint8): byte 0 the subnormal 2^-127, 255 NaN."""
    return e8m0_bits(byte.to(tl.int32) << 23)


@triton.jit
def e8m0_bits(bits):
    """e8m0_values of a byte already in fp32's exponent field (bits 23..30 of int32 `bits`, the rest 0): byte 0
    becomes 2^-127's bits, and fma(s, 0, s) turns byte 255's +inf into NaN and keeps every finite s."""
    scale = tl.maximum(bits, 0x400000).to(tl.float32, bitcast=True)
    return tl.fma(scale, 0.0, scale)


@triton.jit
def e8m0_pair(byte):
    """(2^(byte - 127), its inverse) in fp32 of int32 e8m0 bytes in [1, 253], exactly (a scale's byte: amax /
    448 or / 6 lies far below 2^126); NaN for 255 (an amax that was inf or NaN)."""
    finite = byte < 255
    scale = tl.where(finite, (byte << 23).to(tl.float32, bitcast=True), float("nan"))
    inverse = tl.where(finite, ((254 - byte) << 23).to(tl.float32, bitcast=True), float("nan"))
    return scale, inverse


@triton.jit
def block_rounded(a, FMT_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    """(values [R, C], scale [R]) of rows a [R, C] (fp32), each row one block rounded as `quant.fake_quant_fp8`
    (FMT_MAX 448: e4m3) or `quant.fake_quant_fp4` (FMT_MAX 6: e2m1) round it: amax floored at AMAX_FLOOR, the
    e8m0 scale of `e8m0_byte`, a / scale clamped to +-FMT_MAX and rounded to the grid; values * scale is the
    rounded row, exactly. A row holding a NaN or an inf gets a NaN scale, as the reference's block does (its amax
    is NaN or inf: `tl.max` alone may drop a NaN)."""
    amax = tl.max(tl.where(a == a, tl.abs(a), float("inf")), axis=1)
    scale, inverse = e8m0_pair(e8m0_byte(tl.maximum(amax, AMAX_FLOOR), FMT_MAX))
    q = tl.clamp(a * inverse[:, None], -FMT_MAX, FMT_MAX, propagate_nan=tl.PropagateNan.ALL)
    if FMT_MAX == 448.0:
        values = e4m3_grid(q)
    else:
        values = e2m1_grid(q)
    return values, scale
