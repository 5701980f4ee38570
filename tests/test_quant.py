"""quant.py's number formats against decoders written here from the bit fields, over every code value.

Tolerance: everything here is bit-exact (formats, packing, rounding rules); the Hadamard matrix alone is a
float transform, compared with an explicit matrix to 1e-6.
"""

from __future__ import annotations

import bisect
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4c.codegen import kv_cache
from dsv4c.model import quant

ALL_BYTES = torch.arange(256, dtype=torch.int32).to(torch.uint8)


# ---- independent decoders --------------------------------------------------------------------------
def e4m3_reference(byte: int) -> float:
    """OCP FP8 e4m3 (the 'fn' variant): bias 7, no infinities, S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0 ** -6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e8m0_reference(byte: int) -> float:
    """OCP e8m0: 2^(byte - 127), byte 255 is NaN."""
    return math.nan if byte == 255 else math.ldexp(1.0, byte - 127)


def e2m1_reference(code: int) -> float:
    """OCP FP4 e2m1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 is subnormal."""
    sign = -1.0 if code & 0x8 else 1.0
    exponent, mantissa = (code >> 1) & 0x3, code & 0x1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)


def round_to_grid(x: float, grid: list[float]) -> int:
    """Index of the grid value nearest |x| (ties to the even index, beyond the grid to the last)."""
    magnitude = abs(x)
    hi = bisect.bisect_left(grid, magnitude)
    if hi == 0 or hi == len(grid):
        return min(hi, len(grid) - 1)
    lo = hi - 1
    below, above = magnitude - grid[lo], grid[hi] - magnitude
    if below != above:
        return lo if below < above else hi
    return lo if lo % 2 == 0 else hi


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values with NaN equal to NaN."""
    return bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


# ---- code values ------------------------------------------------------------------------------------
def test_every_e4m3_byte_decodes_to_its_bit_fields():
    want = torch.tensor([e4m3_reference(b) for b in range(256)], dtype=torch.float32)
    assert same(ALL_BYTES.view(torch.float8_e4m3fn).to(torch.float32), want)
    one = quant.float_to_e8m0(torch.ones(1, 1))
    weight = ALL_BYTES.view(torch.float8_e4m3fn).view(2, 128)  # one 128x128 block, scale 1
    assert same(quant.dequant_fp8_weight(weight, one).flatten(), want)


def test_every_e8m0_byte_decodes_like_torch_and_the_bit_fields():
    want = torch.tensor([e8m0_reference(b) for b in range(256)], dtype=torch.float32)
    ours = quant.e8m0_to_float(ALL_BYTES.view(torch.float8_e8m0fnu))
    assert same(ours, want)
    assert same(ours, ALL_BYTES.view(torch.float8_e8m0fnu).to(torch.float32))
    assert same(quant.e8m0_to_float(ALL_BYTES), want)  # raw uint8 bytes too
    assert ours[0].item() == 2.0 ** -127 and ours[254].item() == 2.0 ** 127 and math.isnan(ours[255].item())


def test_float_to_e8m0_round_trips_every_finite_byte_and_rejects_the_rest():
    finite = ALL_BYTES[:255]
    assert torch.equal(quant.float_to_e8m0(quant.e8m0_to_float(finite)).view(torch.uint8), finite)
    for bad in (3.0, 0.0, -1.0, 2.0 ** 128):
        with pytest.raises(ValueError):
            quant.float_to_e8m0(torch.tensor([bad], dtype=torch.float64))


def test_every_e2m1_code_decodes_to_its_bit_fields():
    codes = torch.arange(16, dtype=torch.uint8)
    want = torch.tensor([e2m1_reference(c) for c in range(16)], dtype=torch.float32)
    assert torch.equal(quant.e2m1_to_float(codes), want)
    assert tuple(want[:8].tolist()) == quant.E2M1_MAGNITUDES


def test_device_rounding_makes_no_tensor_from_python_data():
    """The rounding references run inside a captured CUDA graph on GPUs, where a tensor made from Python data
    (aten.lift_fresh: a host-to-device copy) is refused; the e2m1 decoding once made its table so."""
    made = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            made.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 128) * 3
    with Record():
        quant.e2m1_to_float(torch.arange(16, dtype=torch.uint8))
        quant.fake_quant_fp4(x, 32)
        quant.fake_quant_fp8(x, 64)
        for format, rounded, block in (("e4m3", 96, 32), ("e2m1", 128, 32)):  # the packed caches' references
            packed = kv_cache.pack_reference(x.bfloat16(), format, rounded, block)
            kv_cache.unpack_reference(packed, format, 128, rounded, block, torch.bfloat16)
    assert made and torch.ops.aten.lift_fresh.default not in made


def test_e2m1_matches_torch_float4_where_torch_can_decode_it():
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no float4_e2m1fn_x2 dtype")
    packed = ALL_BYTES.view(torch.float4_e2m1fn_x2)
    try:
        decoded = packed.to(torch.float32)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch cannot convert float4_e2m1fn_x2 on this build: {err}")
    codes = quant.unpack_fp4(ALL_BYTES.view(torch.int8))
    assert torch.equal(decoded.flatten(), quant.e2m1_to_float(codes).flatten())


def test_every_e2m1_value_times_a_usable_scale_is_exact_in_e4m3():
    # Section 5: W4A8 widens FP4 weights to FP8 exactly, for scales 2^-8 .. 2^6.
    values = quant.e2m1_to_float(torch.arange(16, dtype=torch.uint8))
    for k in range(-8, 7):
        scaled = values * 2.0 ** k
        assert torch.equal(scaled.to(torch.float8_e4m3fn).to(torch.float32), scaled), k


# ---- packing ------------------------------------------------------------------------------------------
def test_unpack_puts_the_low_nibble_first_for_every_byte():
    codes = quant.unpack_fp4(ALL_BYTES.view(torch.int8))
    assert codes.shape == (512,) and codes.dtype == torch.uint8
    assert torch.equal(codes[0::2], ALL_BYTES & 0x0F)
    assert torch.equal(codes[1::2], ALL_BYTES >> 4)


def test_pack_unpack_round_trip_is_bit_exact():
    packed = ALL_BYTES.view(torch.int8).view(16, 16)
    assert torch.equal(quant.pack_fp4(quant.unpack_fp4(packed)), packed)
    pairs = torch.cartesian_prod(torch.arange(16), torch.arange(16)).to(torch.uint8).flatten()
    assert torch.equal(quant.unpack_fp4(quant.pack_fp4(pairs)), pairs)


# ---- rounding to e2m1 ----------------------------------------------------------------------------
E2M1_GRID = list(quant.E2M1_MAGNITUDES)
MIDPOINTS = [(a + b) / 2 for a, b in zip(E2M1_GRID, E2M1_GRID[1:])]


def e2m1_code_reference(x: float) -> int:
    code = round_to_grid(x, E2M1_GRID)
    return code | (0x8 if x < 0 and code else 0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_float_to_e2m1_ties_to_even_at_every_midpoint(sign):
    mids = torch.tensor(MIDPOINTS) * sign
    codes = quant.float_to_e2m1(mids)
    # The even code of each tie: 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2, 2.5->2, 3.5->4, 5->4.
    assert [abs(v) for v in quant.e2m1_to_float(codes).tolist()] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert codes.tolist() == [e2m1_code_reference(v) for v in mids.tolist()]
    above = torch.nextafter(mids, mids * 2)  # just past each midpoint, away from zero: rounds outward
    below = torch.nextafter(mids, torch.zeros_like(mids))
    assert codes.tolist() != quant.float_to_e2m1(above).tolist()
    assert [c & 7 for c in quant.float_to_e2m1(above).tolist()] == list(range(1, 8))
    assert [c & 7 for c in quant.float_to_e2m1(below).tolist()] == list(range(0, 7))


def test_float_to_e2m1_saturates_and_keeps_zero_unsigned():
    x = torch.tensor([6.0, 7.0, 1e30, math.inf, -6.5, -math.inf, -0.0, -0.2, 0.2])
    assert quant.float_to_e2m1(x).tolist() == [7, 7, 7, 7, 15, 15, 0, 0, 0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-20, max_value=20, width=32), min_size=1, max_size=64))
def test_float_to_e2m1_is_the_nearest_code(values):
    got = quant.float_to_e2m1(torch.tensor(values, dtype=torch.float32)).tolist()
    assert got == [e2m1_code_reference(v) for v in values]


# ---- weight formats ---------------------------------------------------------------------------------
FINITE_E4M3 = [b for b in range(256) if b not in (0x7F, 0xFF)]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_fp8_weight_round_trip_is_exact_on_representable_values(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.tensor(FINITE_E4M3, dtype=torch.uint8)[torch.randint(0, 254, (rows, cols), generator=gen)]
    block_exp = torch.randint(-20, 20, (-(-rows // 128), -(-cols // 128)), generator=gen).float()
    scale = torch.exp2(block_exp).repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    weight = codes.view(torch.float8_e4m3fn).to(torch.float32) * scale
    q, s = quant.quantize_fp8_weight(weight)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert s.shape == (-(-rows // 128), -(-cols // 128))
    assert torch.equal(quant.dequant_fp8_weight(q, s), weight)
    q2, s2 = quant.quantize_fp8_weight(quant.dequant_fp8_weight(q, s))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(s2.view(torch.uint8), s.view(torch.uint8))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_fp4_weight_round_trip_is_exact_on_representable_values(rows, blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, 32 * blocks), generator=gen).to(torch.uint8)
    block_exp = torch.randint(-30, 30, (rows, blocks), generator=gen).float()
    weight = quant.e2m1_to_float(codes) * torch.exp2(block_exp).repeat_interleave(32, 1)
    packed, scale = quant.quantize_fp4_weight(weight)
    assert packed.dtype == torch.int8 and packed.shape == (rows, 16 * blocks)
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (rows, blocks)
    assert torch.equal(quant.dequant_fp4_weight(packed, scale), weight)


def test_fp4_weight_round_trip_bytes_when_every_block_reaches_six():
    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    codes[:, ::32] = 7  # amax 6 in each block: the scale is exactly the block's scale, codes unchanged
    packed, scale = quant.quantize_fp4_weight(quant.e2m1_to_float(codes))
    assert torch.equal(packed, quant.pack_fp4(torch.where(codes == 8, 0, codes)))  # -0 encodes as +0
    assert torch.equal(quant.e8m0_to_float(scale), torch.ones(8, 2))


# ---- activation rounding ---------------------------------------------------------------------------
E4M3_GRID = [e4m3_reference(b) for b in range(0x7F)]  # the 127 finite non-negative values, ascending


def act_quant_reference(row: list[float], block: int, fmt_max: float, floor: float, grid: list[float]) -> list[float]:
    """DeepSeek's act_quant per block: amax = max(|x|, floor); s = 2^ceil(log2(fp32(amax / fmt_max))),
    the ceiling taken exactly on that fp32 quotient (as the kernel's bit trick does); q = round(x / s)
    to the grid, ties to even, clamped to fmt_max; returns q * s."""
    out = []
    for start in range(0, len(row), block):
        chunk = row[start:start + block]
        amax = max(max(abs(v) for v in chunk), floor)
        ratio = torch.tensor(amax, dtype=torch.float32) / fmt_max  # rounded to fp32, like the kernel
        mantissa, exponent = math.frexp(ratio.item())
        s = math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)
        for v in chunk:
            q = grid[round_to_grid(min(abs(v) / s, fmt_max), grid)]
            out.append(math.copysign(q * s, v))
    return out


finite32 = st.floats(min_value=-1e6, max_value=1e6, width=32)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite32, min_size=64, max_size=64), st.integers(-8, 8))
def test_fake_quant_fp8_matches_deepseek_act_quant(values, shift):
    x = torch.tensor(values, dtype=torch.float32) * 2.0 ** shift
    want = act_quant_reference(x.tolist(), 32, quant.FP8_MAX, quant.FP8_AMAX_FLOOR, E4M3_GRID)
    assert quant.fake_quant_fp8(x, 32).tolist() == want


def test_fake_quant_fp8_scale_edges():
    # amax just above 448 * 2^k: the scale must step up to 2^(k+1) (a log2 in fp32 would round it away);
    # 2.0 shows it: 2^-9 (the smallest e4m3 step) at scale 2^10, but a tie rounding to 0 at scale 2^11.
    edge = torch.nextafter(torch.tensor(448.0 * 1024), torch.tensor(math.inf)).item()
    cases = [[edge, 2.0, 3.0, -7.0], [448.0, 0.5, -1.0, 300.0], [0.0, 0.0, 0.0, 0.0], [1e-6, -2e-6, 0.0, 5e-5],
             [-edge, 1e3, 2.5e3, 1.0]]
    for row in cases:
        want = act_quant_reference(row, 4, quant.FP8_MAX, quant.FP8_AMAX_FLOOR, E4M3_GRID)
        assert quant.fake_quant_fp8(torch.tensor(row), 4).tolist() == want, row
    assert quant.power_of_two_scale(torch.tensor([edge]), quant.FP8_MAX).item() == 2048.0


def test_fake_quant_fp8_keeps_the_input_dtype():
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y = quant.fake_quant_fp8(x, 128)
    assert y.dtype == torch.bfloat16
    want = act_quant_reference(x[0].float().tolist(), 128, quant.FP8_MAX, quant.FP8_AMAX_FLOOR, E4M3_GRID)
    assert y[0].float().tolist() == torch.tensor(want).to(torch.bfloat16).float().tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(finite32, min_size=64, max_size=64))
def test_fake_quant_fp4_matches_the_indexer_rule(values):
    x = torch.tensor(values, dtype=torch.float32)
    want = act_quant_reference(x.tolist(), 32, quant.FP4_MAX, quant.FP4_AMAX_FLOOR, E2M1_GRID)
    assert quant.fake_quant_fp4(x, 32).tolist() == want


# ---- Hadamard ---------------------------------------------------------------------------------------
def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 128])
def test_hadamard_is_the_normalised_sylvester_matrix(n):
    matrix = quant.hadamard(torch.eye(n)).double()  # row i is H e_i, i.e. column i of H (symmetric)
    assert torch.allclose(matrix, sylvester(n) / math.sqrt(n), atol=1e-6)
    assert torch.allclose(matrix @ matrix.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(quant.hadamard(x), x @ sylvester(n).T / math.sqrt(n), atol=1e-6)


def test_hadamard_rejects_other_sizes_and_keeps_dtype():
    with pytest.raises(ValueError, match="power of two"):
        quant.hadamard(torch.ones(3, 12))
    assert quant.hadamard(torch.ones(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_pow2_and_e8m0_are_exact_over_their_whole_range():
    """Powers of two are built from their bits (a device's exp2 / log2 need not be exact: on the H100 a bench's
    weight scales failed float_to_e8m0's check), subnormal ones and e8m0's 2^-127 included; every e8m0 byte but
    255 (NaN) round-trips."""
    exponents = torch.arange(-160, 140)
    want = torch.tensor([2.0 ** x if x >= -149 else 0.0 for x in exponents.tolist()], dtype=torch.float64).float()
    assert torch.equal(quant.pow2(exponents), want)
    raw = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = quant.e8m0_to_float(raw)
    assert torch.equal(values[:255], want[(raw[:255].long() - 127 + 160)]) and values[255].isnan()
    assert torch.equal(quant.float_to_e8m0(values[:255]).view(torch.uint8), raw[:255])
    with pytest.raises(ValueError, match="powers of two"):
        quant.float_to_e8m0(torch.tensor([0.75]))
