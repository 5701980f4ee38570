"""The kernels' number formats (codegen/kernels/number_formats.py) under TRITON_INTERPRET=1, against torch's
conversions and model/quant.py, exactly (bit for bit where not said otherwise; NaN where the reference is NaN):

- bf16_rounded: random fp32 bit patterns of every binade, the exact ties (half a bf16 step) and one bit on either
  side of them, signed zeros, subnormals, the largest finite values (which round to inf), inf, NaN and the GPU's
  NaN 0x7FFFFFFF (all mantissa bits set: a rounding carry would make it -0), against
  torch's fp32 -> bf16 conversion; bf16_rounded_if and rounded_to(bf16 / fp32) against the same or identity;
- e4m3_grid: every e4m3 value, every midpoint between neighbours (ties), random values of every binade from the
  subnormals to 448, against torch's fp32 -> float8_e4m3fn conversion (by value: what rounds to zero is +0);
- e2m1_grid / e2m1_value: the e2m1 values, midpoints and random values in [-6, 6] against quant.float_to_e2m1;
  all 16 codes against quant.e2m1_to_float;
- e8m0_values: all 256 bytes against quant.e8m0_to_float (0: 2^-127, 255: NaN); pow2 over [-126, 127]; e8m0_pair
  (scale and inverse) over bytes 1 to 253 and 255;
- e8m0_byte: amaxes of every binade from the format's floor up, and the powers of two times the format maximum
  and one fp32 step above them, against quant.power_of_two_scale (448 and 6); inf and NaN give 255.

Each function runs in a one-line probe kernel in a spawned child that sets TRITON_INTERPRET first.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from child_pool import run_in
from dsv4c.model import quant

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
BLOCK = 1024


@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    return run_in(interpreter_pool, _probe)


def _define_probe() -> None:
    """Define the probe kernel, in the child only (Triton is imported there, after TRITON_INTERPRET is set); its
    names are module globals, where the interpreter looks them up."""
    global triton, tl, nf, _kernel
    import triton
    import triton.language as tl

    from dsv4c.codegen.kernels import number_formats as nf

    @triton.jit
    def _kernel(x_ptr, out_ptr, n, OP: tl.constexpr, ARG: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        x = tl.load(x_ptr + i, mask=ok, other=0)
        if OP == "bf16_rounded":
            y = nf.bf16_rounded(x)
        elif OP == "bf16_rounded_if":
            y = nf.bf16_rounded_if(x, ARG != 0)
        elif OP == "rounded_to_bf16":
            y = nf.rounded_to(x, tl.bfloat16)
        elif OP == "rounded_to_fp32":
            y = nf.rounded_to(x, tl.float32)
        elif OP == "e4m3_grid":
            y = nf.e4m3_grid(x)
        elif OP == "e2m1_grid":
            y = nf.e2m1_grid(x)
        elif OP == "e2m1_value":
            y = nf.e2m1_value(x)
        elif OP == "e8m0_values":
            y = nf.e8m0_values(x.to(tl.uint8))
        elif OP == "pow2":
            y = nf.pow2(x)
        elif OP == "e8m0_scale":
            y = nf.e8m0_pair(x)[0]
        elif OP == "e8m0_inverse":
            y = nf.e8m0_pair(x)[1]
        else:
            y = nf.e8m0_byte(x, ARG)
        tl.store(out_ptr + i, y, mask=ok)


def _probe(op: str, x: torch.Tensor, out_dtype: torch.dtype, arg: float = 0.0) -> torch.Tensor:
    """`op` of number_formats applied to each element of x (in the child)."""
    _define_probe()
    out = torch.empty(x.shape, dtype=out_dtype)
    _kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), OP=op, ARG=arg, BLOCK=BLOCK)
    return out


def assert_same(got: torch.Tensor, want: torch.Tensor, inputs: torch.Tensor) -> None:
    """Bit-equal (NaN where want is NaN, any NaN); on failure, the first inputs that differ."""
    nan = torch.isnan(want)
    same = torch.where(nan, torch.isnan(got), got.view(torch.int32) == want.view(torch.int32))
    bad = (~same).nonzero().flatten()[:5]
    assert same.all(), [(inputs[i].item(), got[i].item(), want[i].item()) for i in bad]


def _fp32(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def bf16_inputs() -> torch.Tensor:
    random = torch.randint(-2 ** 31, 2 ** 31 - 1, (20000,), dtype=torch.int64)
    on_grid = torch.randint(-2 ** 15, 2 ** 15 - 1, (3000,), dtype=torch.int64) << 16
    ties = torch.cat([on_grid + d for d in (0x7FFF, 0x8000, 0x8001)])
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-40, 3.4e38, -3.4e38, float("inf"), -float("inf"), float("nan")])
    gpu_nans = _fp32(torch.tensor([0x7FFFFFFF, -1]))  # a GPU's NaN, and with the sign: rounding must not carry out
    return torch.cat([_fp32(random), _fp32(ties), special, gpu_nans])


def test_bf16_rounding_is_torchs_conversion(interpreter):
    x = bf16_inputs()
    want = x.bfloat16().float()
    assert_same(interpreter("bf16_rounded", x, torch.float32), want, x)
    assert_same(interpreter("rounded_to_bf16", x, torch.float32), want, x)
    assert_same(interpreter("bf16_rounded_if", x, torch.float32, 1.0), want, x)
    assert_same(interpreter("bf16_rounded_if", x, torch.float32, 0.0), x, x)
    assert_same(interpreter("rounded_to_fp32", x, torch.float32), x, x)


def e4m3_inputs() -> torch.Tensor:
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, ascending
    midpoints = (values[1:] + values[:-1]) / 2  # exact in fp32: the ties
    binades = 2.0 ** torch.randint(-12, 9, (20000,)) * (1 + torch.rand(20000))
    magnitudes = torch.cat([values, midpoints, binades.clamp(max=448.0)])
    return torch.cat([magnitudes, -magnitudes])


def test_e4m3_grid_is_torchs_conversion(interpreter):
    x = e4m3_inputs()
    got, want = interpreter("e4m3_grid", x, torch.float32), x.to(torch.float8_e4m3fn).float()
    assert torch.equal(got, want), x[got != want][:5]  # by value: what rounds to zero comes out +0


def test_e2m1_grid_and_values_are_the_models(interpreter):
    values = quant.e2m1_to_float(torch.arange(8, dtype=torch.uint8))
    magnitudes = torch.cat([values, (values[1:] + values[:-1]) / 2, torch.rand(20000) * 6])
    x = torch.cat([magnitudes, -magnitudes])
    want = quant.e2m1_to_float(quant.float_to_e2m1(x))
    got = interpreter("e2m1_grid", x, torch.float32)
    assert torch.equal(got, want), x[got != want][:5]  # by value: a code of 0 has no sign
    codes = torch.arange(16, dtype=torch.int32)
    assert_same(interpreter("e2m1_value", codes, torch.float32), quant.e2m1_to_float(codes.to(torch.uint8)), codes)


def test_e8m0_values_and_powers_of_two_are_the_models(interpreter):
    bytes_ = torch.arange(256, dtype=torch.int32)
    assert_same(interpreter("e8m0_values", bytes_, torch.float32), quant.e8m0_to_float(bytes_.to(torch.uint8)),
                bytes_)
    exponents = torch.arange(-126, 128, dtype=torch.int32)
    assert_same(interpreter("pow2", exponents, torch.float32), quant.pow2(exponents), exponents)
    scales = torch.cat([torch.arange(1, 254), torch.tensor([255])]).to(torch.int32)  # e8m0_pair's bytes, and 255
    assert_same(interpreter("e8m0_scale", scales, torch.float32), quant.e8m0_to_float(scales.to(torch.uint8)), scales)
    inverse = torch.where(scales < 255, 1 / quant.e8m0_to_float(scales.to(torch.uint8)), torch.nan)
    assert_same(interpreter("e8m0_inverse", scales, torch.float32), inverse, scales)


@pytest.mark.parametrize("fmt_max,floor", [(quant.FP8_MAX, quant.FP8_AMAX_FLOOR),
                                           (quant.FP4_MAX, quant.FP4_AMAX_FLOOR)])
def test_e8m0_byte_is_the_models_scale(interpreter, fmt_max, floor):
    powers = fmt_max * 2.0 ** torch.arange(-20, 12, dtype=torch.float32)
    above = torch.nextafter(powers, torch.tensor(float("inf")))
    random = floor * 2.0 ** (torch.rand(20000) * 100)
    amax = torch.cat([powers, above, random, torch.tensor([floor])]).clamp(min=floor)
    want = quant.float_to_e8m0(quant.power_of_two_scale(amax, fmt_max)).view(torch.uint8).to(torch.int32)
    got = interpreter("e8m0_byte", amax, torch.int32, fmt_max)
    assert torch.equal(got, want), amax[got != want][:5]
    non_finite = torch.tensor([float("inf"), float("nan")])
    assert interpreter("e8m0_byte", non_finite, torch.int32, fmt_max).tolist() == [255, 255]  # e8m0's NaN
