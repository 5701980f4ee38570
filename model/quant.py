"""DeepSeek-V4's number formats: FP8 e4m3 and MXFP4 e2m1 weights with e8m0 scales, and the
rounding simulations its reference code applies to activations and cached values.

Conventions (section 5 and 8 of the architecture spec):
- e8m0 scale byte b means 2^(b - 127); byte 255 is NaN.
- FP8 weights: e4m3 `[out, in]`, one scale per 128x128 block, `[ceil(out/128), ceil(in/128)]`.
- MXFP4 weights: int8 `[out, in/2]`, two e2m1 codes a byte, the low nibble the even element;
  code bit 3 is the sign, bits 0-2 index {0, .5, 1, 1.5, 2, 3, 4, 6}; one scale per 32 along `in`.
- Activation rounding: per row, blocks along the last dim; `s = 2^ceil(log2(amax / fmt_max))`
  with amax floored (1e-4 for FP8, 6 * 2^-126 for FP4), values `x / s` rounded to the format.
All arithmetic is fp32; functions return fp32 unless they say otherwise.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0 ** -126
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding |x| to e2m1: a magnitude above threshold i moves past code i. Ties go to the even code,
# so the ties at 0.75, 1.75 and 3.5 round up (strict '>=' thresholds) and the others round down.
_E2M1_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIE_UP = (False, True, False, True, False, True, False)


# ---- scales --------------------------------------------------------------------------------------
def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent (integer tensor) as fp32, built from the bits: exact on every device (a device's exp2 need not
    be), subnormal down to 2^-149, 0 below it, inf above 2^127. Subnormals are a normal power of two times 2^-64
    (an exact product; 2^-150, half the smallest subnormal, rounds to even: 0). Shifts by constants only, so the
    traced graph exports to ONNX."""
    e = exponent.to(torch.int32).clamp(-150, 128)
    normal = ((e.clamp(-126, 128) + 127) << 23).view(torch.float32)
    small = ((e.clamp(-150, -127) + 191) << 23).view(torch.float32) * 2.0 ** -64
    return torch.where(e >= -126, normal, small)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode e8m0 scales (dtype float8_e8m0fnu or uint8 bytes) to fp32; byte 255 gives NaN."""
    raw = scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale
    if raw.dtype != torch.uint8:
        raise TypeError(f"e8m0 scales must be float8_e8m0fnu or uint8, got {scale.dtype}")
    return torch.where(raw == 255, torch.nan, pow2(raw.to(torch.int32) - 127))


def float_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Encode positive powers of two (fp32) as float8_e8m0fnu; anything else is a ValueError."""
    mantissa, exponent = torch.frexp(scale.to(torch.float64))  # exact: scale = mantissa * 2^exponent
    exponent = exponent - 1
    if not torch.all(mantissa == 0.5) or not torch.all((exponent >= -127) & (exponent <= 127)):
        raise ValueError("e8m0 can only hold powers of two between 2^-127 and 2^127")
    return (exponent + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def power_of_two_scale(amax: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """The ue8m0 scale rule: the smallest power of two s with amax / s <= fmt_max, i.e. 2^ceil(log2(r))
    taken exactly on the fp32 quotient r = amax / fmt_max, as DeepSeek's kernel does from r's bits.
    (An fp32 log2 would round log2(r) down to an integer when r is just above a power of two.)"""
    ratio = amax.to(torch.float32) / fmt_max
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.where(torch.isfinite(ratio), pow2(exponent), ratio)


# ---- e2m1 codes ----------------------------------------------------------------------------------
def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Decode 4-bit e2m1 codes (uint8 values 0..15, bit 3 the sign) to fp32, by arithmetic on the codes: no
    table made from Python data, which on a GPU would be a host-to-device copy (refused inside CUDA-graph
    capture). Magnitude code m: m / 2 below 4 (0, 0.5, 1, 1.5), m - 2 for 4 and 5, 2m - 8 for 6 and 7."""
    value = codes.to(torch.float32)
    negative = value >= 8
    m = torch.where(negative, value - 8, value)
    magnitude = torch.where(m < 4, m * 0.5, torch.where(m < 6, m - 2, m * 2 - 8))
    return torch.where(negative, -magnitude, magnitude)


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the nearest e2m1 code (ties to even, saturating at 6); uint8 codes."""
    magnitude = x.abs().to(torch.float32)
    code = torch.zeros_like(magnitude, dtype=torch.uint8)
    for threshold, tie_up in zip(_E2M1_THRESHOLDS, _E2M1_TIE_UP):
        code += (magnitude >= threshold) if tie_up else (magnitude > threshold)
    sign = (torch.signbit(x) & (code > 0)).to(torch.uint8) << 3
    return code | sign


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 `[..., n/2]` -> uint8 codes `[..., n]`, the low nibble first."""
    raw = packed.view(torch.uint8)
    return torch.stack((raw & 0x0F, raw >> 4), dim=-1).flatten(-2)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes `[..., n]` (n even) -> int8 `[..., n/2]`, the even element in the low nibble."""
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).view(torch.int8)


# ---- weights -------------------------------------------------------------------------------------
def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    full = scale.repeat_interleave(block_rows, dim=0).repeat_interleave(block_cols, dim=1)
    return full[:rows, :cols]


def dequant_fp8_weight(weight: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """e4m3 `[out, in]` with e8m0 `[ceil(out/b), ceil(in/b)]` scales -> exact fp32 values."""
    rows, cols = weight.shape
    return weight.to(torch.float32) * _expand_blocks(e8m0_to_float(scale), rows, cols, block, block)


def dequant_fp4_weight(packed: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """MXFP4 int8 `[out, in/2]` with e8m0 `[out, in/32]` scales -> exact fp32 `[out, in]` values."""
    values = e2m1_to_float(unpack_fp4(packed))
    return values * e8m0_to_float(scale).repeat_interleave(block, dim=-1)[..., : values.shape[-1]]


def quantize_fp8_weight(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `[out, in]` -> (e4m3 weight, e8m0 per-block scales), the release's weight format."""
    rows, cols = weight.shape
    padded = torch.nn.functional.pad(weight.float(), (0, -cols % block, 0, -rows % block))
    blocks = padded.unflatten(0, (-1, block)).unflatten(2, (-1, block))
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(FP8_AMAX_FLOOR)
    scale = power_of_two_scale(amax, FP8_MAX)
    scaled = weight.float() / _expand_blocks(scale, rows, cols, block, block)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), float_to_e8m0(scale)


def quantize_fp4_weight(weight: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `[out, in]` -> (MXFP4 int8 `[out, in/2]`, e8m0 `[out, in/32]`), the release's expert format."""
    blocks = weight.float().unflatten(-1, (-1, block))
    scale = power_of_two_scale(blocks.abs().amax(dim=-1).clamp_min(FP4_AMAX_FLOOR), FP4_MAX)
    codes = float_to_e2m1(blocks / scale.unsqueeze(-1)).flatten(-2)
    return pack_fp4(codes), float_to_e8m0(scale)


# ---- activation / cache rounding simulations -----------------------------------------------------
def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Round `x` as DeepSeek's `act_quant` does (e4m3, ue8m0 scales per `block` along the last dim)
    and return the dequantised values in x's dtype. The last dim must be a multiple of `block`."""
    blocks = x.to(torch.float32).unflatten(-1, (-1, block))
    scale = power_of_two_scale(blocks.abs().amax(dim=-1, keepdim=True).clamp_min(FP8_AMAX_FLOOR), FP8_MAX)
    rounded = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    return (rounded * scale).flatten(-2).to(x.dtype)


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round `x` to e2m1 with ue8m0 scales per `block` along the last dim; dequantised, in x's dtype."""
    blocks = x.to(torch.float32).unflatten(-1, (-1, block))
    scale = power_of_two_scale(blocks.abs().amax(dim=-1, keepdim=True).clamp_min(FP4_AMAX_FLOOR), FP4_MAX)
    rounded = e2m1_to_float(float_to_e2m1(blocks / scale))
    return (rounded * scale).flatten(-2).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The normalised Walsh-Hadamard transform (Sylvester order) along the last dim, a power of two."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    out = x.to(torch.float32)
    h = 1
    while h < n:
        pairs = out.unflatten(-1, (-1, 2, h))
        out = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        out = out.flatten(-3)
        h *= 2
    return (out * (1.0 / math.sqrt(n))).to(x.dtype)
