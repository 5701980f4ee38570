"""aten's `view.dtype` (a tensor's bytes read as another dtype) in ONNX opset 24, which has no bit cast (BitCast
arrives in opset 26): the bits are computed from the values, exactly.

    source --(patterns)--> int64 bit patterns, one an element --(regroup)--> patterns of the target's width --> target

- integers (uint8, int8, int16, int32): their two's complement pattern, and back (a set top bit of a signed
  target subtracts 2^bits);
- floats (float32, float16, bfloat16, float8 e4m3fn): sign, exponent and mantissa fields computed in float64, where
  every value of these formats is exact, and back; a NaN gives the format's quiet NaN pattern (`FloatFormat.nan`:
  ONNX cannot see a NaN's payload or sign, as `signbit` in export/onnx_ops.py);
- regroup: a wider source splits each pattern into its little-endian bytes (torch's layout on every device it
  runs on), a narrower source joins each run of them along the last dim (torch's own rule for a size change).
Other dtypes (64-bit, bool, other float8 and e8m0) are refused with `NotExpressible` naming them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from onnx import TensorProto

from dsv4c.export.onnx_graph import GraphBuilder, OpContext, Value, onnx_dtype

INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A binary float format's fields; without `has_inf`, only the all-ones pattern (either sign) is NaN and an
    all-ones exponent is otherwise finite (e4m3fn)."""

    exponent: int
    mantissa: int
    has_inf: bool
    nan: int  # the positive quiet NaN pattern written for any NaN

    @property
    def bits(self) -> int:
        return 1 + self.exponent + self.mantissa

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent - 1) - 1


FLOAT_FORMATS = {
    torch.float32: FloatFormat(8, 23, True, 0x7FC00000),
    torch.float16: FloatFormat(5, 10, True, 0x7E00),
    torch.bfloat16: FloatFormat(8, 7, True, 0x7FC0),
    torch.float8_e4m3fn: FloatFormat(4, 3, False, 0x7F),
}


def bit_cast(c: OpContext) -> str:
    """The rule for `aten::view.dtype(self, dtype)`: self's bytes as `dtype` (module docstring)."""
    x, target = c.a["self"], c.a["dtype"]
    for dtype in (x.dtype, target):
        if dtype not in FLOAT_FORMATS and dtype not in INT_DTYPES:
            raise c.fail(f"view as another dtype: {dtype} is not translated (allowed: "
                         f"{', '.join(str(d) for d in (*FLOAT_FORMATS, *INT_DTYPES))})")
    if x.dtype == target:
        return x.name
    patterns = _regroup(c.g, _patterns(c.g, x), x, x.dtype.itemsize, target.itemsize)
    return _from_patterns(c.g, patterns, target)


def _patterns(g: GraphBuilder, x: Value) -> str:
    """int64 bit pattern (0 .. 2^bits - 1) of each element of x."""
    if x.dtype in FLOAT_FORMATS:
        return _float_patterns(g, g.add1("Cast", x.name, to=TensorProto.DOUBLE), FLOAT_FORMATS[x.dtype])
    wide = g.add1("Cast", x.name, to=TensorProto.INT64)
    return wide if x.dtype == torch.uint8 else g.add1("Mod", wide, _int(g, 2 ** (8 * x.dtype.itemsize)), fmod=0)


def _from_patterns(g: GraphBuilder, patterns: str, dtype: torch.dtype) -> str:
    """Elements of `dtype` from int64 bit patterns of its width."""
    if dtype in FLOAT_FORMATS:
        return g.add1("Cast", _float_values(g, patterns, FLOAT_FORMATS[dtype]), to=onnx_dtype(dtype))
    bits = 8 * dtype.itemsize
    if dtype.is_signed:
        negative = g.add1("GreaterOrEqual", patterns, _int(g, 2 ** (bits - 1)))
        patterns = g.add1("Where", negative, g.add1("Sub", patterns, _int(g, 2 ** bits)), patterns)
    return g.add1("Cast", patterns, to=onnx_dtype(dtype))


def _regroup(g: GraphBuilder, patterns: str, x: Value, source: int, target: int) -> str:
    """Patterns of `source` bytes -> patterns of `target` bytes along the last dim, little-endian."""
    if source == target:
        return patterns
    leading = g.add1("Slice", g.add1("Shape", x.name), g.ints([0]), g.ints([-1]))
    if source > target:
        width = 2 ** (8 * target)
        parts = [g.add1("Unsqueeze", g.add1("Mod", g.add1("Div", patterns, _int(g, width ** i)), _int(g, width),
                                            fmod=0), g.ints([-1])) for i in range(source // target)]
        return g.add1("Reshape", g.add1("Concat", *parts, axis=-1), g.add1("Concat", leading, g.ints([-1]), axis=0))
    count, width = target // source, 2 ** (8 * source)
    runs = g.add1("Reshape", patterns, g.add1("Concat", leading, g.ints([-1, count]), axis=0))
    weights = g.constant([width ** i for i in range(count)], torch.int64)
    return g.add1("ReduceSum", g.add1("Mul", runs, weights), g.ints([-1]), keepdims=0)


def _float_patterns(g: GraphBuilder, x: str, fmt: FloatFormat) -> str:
    """int64 patterns of float64 values x, each a value of `fmt`."""
    def f(value: float) -> str:
        return g.constant(value, torch.float64)
    magnitude = g.add1("Abs", x)
    special = g.add1("Or", g.add1("IsNaN", x), g.add1("IsInf", x))
    regular = g.add1("And", g.add1("Not", special), g.add1("Greater", magnitude, f(0.0)))
    safe = g.add1("Where", regular, magnitude, f(1.0))
    exponent = _floor_log2(g, safe)
    kept = g.add1("Max", exponent, f(1 - fmt.bias))  # subnormals: the smallest normal exponent, field 0
    significand = g.add1("Div", safe, g.add1("Pow", f(2.0), g.add1("Sub", kept, f(fmt.mantissa))))
    # a normal value's pattern is (e + bias) * 2^M + (significand - 2^M); a subnormal's is its significand
    pattern = g.add1("Add", significand, g.add1("Mul", g.add1("Add", kept, f(fmt.bias - 1)), f(2 ** fmt.mantissa)))
    infinity = (2 ** fmt.exponent - 1) * 2 ** fmt.mantissa if fmt.has_inf else fmt.nan
    other = g.add1("Where", g.add1("IsNaN", x), f(fmt.nan), g.add1("Where", g.add1("IsInf", x), f(infinity), f(0.0)))
    pattern = g.add1("Where", regular, pattern, other)
    negative = g.add1("Or", g.add1("Less", x, f(0.0)), g.add1("Less", g.add1("Reciprocal", x), f(0.0)))  # -0.0 too
    negative = g.add1("And", negative, g.add1("Not", g.add1("IsNaN", x)))
    sign = g.add1("Where", negative, f(2 ** (fmt.bits - 1)), f(0.0))
    return g.add1("Cast", g.add1("Add", pattern, sign), to=TensorProto.INT64)


def _floor_log2(g: GraphBuilder, x: str) -> str:
    """floor(log2 x) of positive finite float64 x: the log's estimate, moved by one where it rounded across."""
    two = g.constant(2.0, torch.float64)
    one = g.constant(1.0, torch.float64)
    exponent = g.add1("Floor", g.add1("Div", g.add1("Log", x), g.constant(LN2, torch.float64)))
    low = g.add1("Less", g.add1("Div", x, g.add1("Pow", two, exponent)), one)
    exponent = g.add1("Where", low, g.add1("Sub", exponent, one), exponent)
    high = g.add1("GreaterOrEqual", g.add1("Div", x, g.add1("Pow", two, exponent)), two)
    return g.add1("Where", high, g.add1("Add", exponent, one), exponent)


def _float_values(g: GraphBuilder, patterns: str, fmt: FloatFormat) -> str:
    """float64 values of `fmt`'s int64 bit patterns."""
    top = _int(g, 2 ** (fmt.bits - 1))
    negative = g.add1("GreaterOrEqual", patterns, top)
    rest = g.add1("Mod", patterns, top, fmod=0)
    field = g.add1("Div", rest, _int(g, 2 ** fmt.mantissa))
    mantissa = g.add1("Mod", rest, _int(g, 2 ** fmt.mantissa), fmod=0)
    normal = g.add1("Greater", field, _int(g, 0))
    significand = g.add1("Where", normal, g.add1("Add", mantissa, _int(g, 2 ** fmt.mantissa)), mantissa)
    power = g.add1("Sub", g.add1("Max", field, _int(g, 1)), _int(g, fmt.bias + fmt.mantissa))
    value = g.add1("Mul", g.add1("Cast", significand, to=TensorProto.DOUBLE),
                   g.add1("Pow", g.constant(2.0, torch.float64), g.add1("Cast", power, to=TensorProto.DOUBLE)))
    nan, inf = g.constant(math.nan, torch.float64), g.constant(math.inf, torch.float64)
    if fmt.has_inf:
        infinite = g.add1("Where", g.add1("Equal", mantissa, _int(g, 0)), inf, nan)
        value = g.add1("Where", g.add1("Equal", field, _int(g, 2 ** fmt.exponent - 1)), infinite, value)
    else:
        value = g.add1("Where", g.add1("Equal", rest, _int(g, 2 ** (fmt.bits - 1) - 1)), nan, value)
    return g.add1("Where", negative, g.add1("Neg", value), value)


def _int(g: GraphBuilder, value: int) -> str:
    return g.constant(value, torch.int64)
