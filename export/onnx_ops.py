"""Translation rules: each plan op (aten, SymInt arithmetic) as a few standard ONNX nodes.

`RULES` maps `namespace::name` (any overload; in-place `name_` variants use the rule of `name`) to a
function of an `OpContext` returning the ONNX names of the op's results. Arguments are read by their
schema names (`c.a["self"]`), defaults filled in. aten's implicit type promotion becomes explicit Casts
to the result's dtype (`c.as_out`), or to the operands' promoted dtype for comparisons.

Exact where ONNX allows it; the known differences (none of which the dsv4c plans rely on):
- `signbit` cannot see the sign of a NaN (ONNX has no bit cast below opset 25): NaN gives False.
- `topk`, `scatter` with duplicate indices and `index` with repeated rows follow ONNX's tie rules.
- `frexp` is exact for finite floats (scaled by powers of two in two steps, so subnormals do not overflow).
- `view.dtype` (a bit cast) is computed from the values (export/onnx_bitcast.py): a NaN becomes its format's quiet NaN.
"""

from __future__ import annotations

from typing import Callable

import torch

from dsv4c.export.onnx_bitcast import bit_cast
from dsv4c.export.onnx_graph import INT64_MAX, NotExpressible, OpContext, Value, onnx_dtype, tensor_proto

Rule = Callable[[OpContext], "list[str] | str"]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name if "::" in name else f"aten::{name}"] = fn
        return fn
    return register


def _same_dtype_node(op_type: str, **attrs) -> Rule:
    """A rule for an elementwise op whose operands take the result's dtype."""
    def translate(c: OpContext) -> str:
        operands = [c.a[k] for k in ("self", "other") if k in c.a]
        return c.g.add1(op_type, *(c.as_out(v) for v in operands), **attrs)
    return translate


for _aten, _onnx in {"add": "Add", "sub": "Sub", "mul": "Mul", "maximum": "Max", "minimum": "Min",
                     "abs": "Abs", "neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "sin": "Sin",
                     "cos": "Cos", "tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu", "floor": "Floor",
                     "ceil": "Ceil", "reciprocal": "Reciprocal", "erf": "Erf"}.items():
    RULES[f"aten::{_aten}"] = _same_dtype_node(_onnx)


@rule("add", "sub")
def _add_sub(c: OpContext) -> str:
    other = c.as_out(c.a["other"])
    if c.a.get("alpha", 1) != 1:
        other = c.g.add1("Mul", other, c.as_out(c.a["alpha"]))
    return c.g.add1("Add" if c.base == "add" else "Sub", c.as_out(c.a["self"]), other)


@rule("div")
def _div(c: OpContext) -> str:
    mode = c.a.get("rounding_mode")
    if mode is None:
        return c.g.add1("Div", c.as_out(c.a["self"]), c.as_out(c.a["other"]))
    if mode == "floor":
        return _floor_divide(c)
    dtype = c.out.dtype
    quotient = c.g.add1("Div", c.as_out(c.a["self"]), c.as_out(c.a["other"]))
    if dtype.is_floating_point:  # trunc: toward zero
        return c.g.add1("Where", c.g.add1("Less", quotient, c.as_out(0)), c.g.add1("Ceil", quotient),
                        c.g.add1("Floor", quotient))
    return quotient  # ONNX integer Div truncates


@rule("floor_divide")
def _floor_divide(c: OpContext) -> str:
    a, b = c.as_out(c.a["self"]), c.as_out(c.a["other"])
    if c.out.dtype.is_floating_point:
        return c.g.add1("Floor", c.g.add1("Div", a, b))
    # Integer Div truncates; a - (a mod b) is an exact multiple of b (Mod with fmod=0 is Python's).
    return c.g.add1("Div", c.g.add1("Sub", a, c.g.add1("Mod", a, b, fmod=0)), b)


@rule("remainder")
def _remainder(c: OpContext) -> str:
    a, b = c.as_out(c.a["self"]), c.as_out(c.a["other"])
    if not c.out.dtype.is_floating_point:
        return c.g.add1("Mod", a, b, fmod=0)
    return c.g.add1("Sub", a, c.g.add1("Mul", c.g.add1("Floor", c.g.add1("Div", a, b)), b))


@rule("pow")
def _pow(c: OpContext) -> str:
    return c.g.add1("Pow", c.as_out(c.a["self"]), c.as_out(c.a["exponent"]))


@rule("exp2")
def _exp2(c: OpContext) -> str:
    return c.g.add1("Pow", c.as_out(2.0), c.as_out(c.a["self"]))


@rule("rsqrt")
def _rsqrt(c: OpContext) -> str:
    return c.g.add1("Reciprocal", c.g.add1("Sqrt", c.as_out(c.a["self"])))


@rule("square")
def _square(c: OpContext) -> str:
    x = c.as_out(c.a["self"])
    return c.g.add1("Mul", x, x)


@rule("silu")
def _silu(c: OpContext) -> str:
    x = c.as_out(c.a["self"])
    return c.g.add1("Mul", x, c.g.add1("Sigmoid", x))


@rule("softplus")
def _softplus(c: OpContext) -> str:
    """torch: x where beta*x > threshold, else log1p(exp(beta*x)) / beta."""
    x = c.as_out(c.a["self"])
    scaled = c.g.add1("Mul", x, c.as_out(c.a["beta"]))
    smooth = c.g.add1("Div", c.g.add1("Log", c.g.add1("Add", c.g.add1("Exp", scaled), c.as_out(1.0))),
                      c.as_out(c.a["beta"]))
    return c.g.add1("Where", c.g.add1("Greater", scaled, c.as_out(c.a["threshold"])), x, smooth)


@rule("clamp", "clamp_min", "clamp_max")
def _clamp(c: OpContext) -> str:
    low = c.a.get("min") if c.base != "clamp_max" else None
    high = c.a.get("max") if c.base != "clamp_min" else None
    bounds = [c.as_out(v) if v is not None else "" for v in (low, high)]
    return c.g.add1("Clip", c.as_out(c.a["self"]), *bounds)


def _comparison(op_type: str, negate: bool = False) -> Rule:
    def translate(c: OpContext) -> str:
        dtype = c.promoted(c.a["self"], c.a["other"])
        out = c.g.add1(op_type, c.as_dtype(c.a["self"], dtype), c.as_dtype(c.a["other"], dtype))
        return c.g.add1("Not", out) if negate else out
    return translate


for _aten, (_onnx, _negate) in {"eq": ("Equal", False), "ne": ("Equal", True), "gt": ("Greater", False),
                                "ge": ("GreaterOrEqual", False), "lt": ("Less", False),
                                "le": ("LessOrEqual", False)}.items():
    RULES[f"aten::{_aten}"] = _comparison(_onnx, _negate)


def _bitwise(logical: str, bitwise: str) -> Rule:
    def translate(c: OpContext) -> str:
        op_type = logical if c.out.dtype == torch.bool else bitwise
        return c.g.add1(op_type, c.as_out(c.a["self"]), c.as_out(c.a["other"]))
    return translate


for _names, _ops in {("__and__", "bitwise_and", "logical_and"): ("And", "BitwiseAnd"),
                     ("__or__", "bitwise_or", "logical_or"): ("Or", "BitwiseOr"),
                     ("__xor__", "bitwise_xor", "logical_xor"): ("Xor", "BitwiseXor")}.items():
    for _name in _names:
        RULES[f"aten::{_name}"] = _bitwise(*_ops)


@rule("bitwise_not", "logical_not")
def _not(c: OpContext) -> str:
    x = c.as_out(c.a["self"])
    return c.g.add1("Not" if c.out.dtype == torch.bool else "BitwiseNot", x)


@rule("__lshift__", "__rshift__", "bitwise_left_shift", "bitwise_right_shift")
def _shift(c: OpContext) -> str:
    left = "lshift" in c.base or "left" in c.base
    x, shift = c.as_out(c.a["self"]), c.a["other"]
    if c.out.dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        return c.g.add1("BitShift", x, c.as_out(shift), direction="LEFT" if left else "RIGHT")
    if left and not isinstance(shift, Value):  # two's complement: a left shift is a wrapping multiply
        return c.g.add1("Mul", x, c.as_out(1 << int(shift)))
    raise c.fail("shifts of signed integers by a tensor, or right shifts, are not translated")


@rule("isfinite")
def _isfinite(c: OpContext) -> str:
    x = c.a["self"]
    if not x.dtype.is_floating_point:
        return c.g.add1("ConstantOfShape", c.g.add1("Shape", x.name), value=_scalar_tensor(True, torch.bool))
    return c.g.add1("Not", c.g.add1("Or", c.g.add1("IsInf", x.name), c.g.add1("IsNaN", x.name)))


@rule("signbit")
def _signbit(c: OpContext) -> str:
    """x < 0, or 1/x < 0 for -0.0 (1/-0 = -inf); a NaN's sign bit is not visible (False)."""
    x = c.as_dtype(c.a["self"], torch.float32 if not c.a["self"].dtype.is_floating_point else c.a["self"].dtype)
    zero = c.g.constant(0.0, c.a["self"].dtype if c.a["self"].dtype.is_floating_point else torch.float32)
    return c.g.add1("Or", c.g.add1("Less", x, zero), c.g.add1("Less", c.g.add1("Reciprocal", x), zero))


@rule("frexp")
def _frexp(c: OpContext) -> list[str]:
    """mantissa in [0.5, 1) and int32 exponent with x = m * 2^e; (x, 0) for 0, inf and NaN.

    e starts at floor(log2|x|) + 1, is corrected by one where rounding of the log moved it, and x is
    divided by 2^e in two power-of-two steps so that no factor overflows for subnormal x."""
    x = c.a["self"]
    dtype = x.dtype
    g, f = c.g, lambda v: g.constant(v, dtype)
    magnitude = g.add1("Abs", x.name)
    regular = g.add1("And", g.add1("Not", g.add1("Equal", x.name, f(0.0))),
                     g.add1("Not", g.add1("Or", g.add1("IsInf", x.name), g.add1("IsNaN", x.name))))
    safe = g.add1("Where", regular, magnitude, f(1.0))
    exponent = g.add1("Add", g.add1("Floor", g.add1("Div", g.add1("Log", safe), f(0.6931471805599453))), f(1.0))
    for fix in ("down", "up"):
        scaled = _times_pow2(c, safe, g.add1("Neg", exponent), dtype)
        if fix == "down":  # the log rounded up: |x| / 2^e < 0.5
            exponent = g.add1("Where", g.add1("Less", scaled, f(0.5)), g.add1("Sub", exponent, f(1.0)), exponent)
        else:  # the log rounded down: |x| / 2^e >= 1
            exponent = g.add1("Where", g.add1("GreaterOrEqual", scaled, f(1.0)), g.add1("Add", exponent, f(1.0)),
                              exponent)
    mantissa = _times_pow2(c, x.name, g.add1("Neg", exponent), dtype)
    exp_out = c.results[1].dtype
    return [g.add1("Where", regular, mantissa, x.name),
            g.add1("Where", regular, g.add1("Cast", exponent, to=onnx_dtype(exp_out)), g.constant(0, exp_out))]


def _times_pow2(c: OpContext, x: str, power: str, dtype: torch.dtype) -> str:
    """x * 2^power with power an integral float tensor, in two halves so neither factor overflows."""
    g = c.g
    half = g.add1("Floor", g.add1("Div", power, g.constant(2.0, dtype)))
    rest = g.add1("Sub", power, half)
    two = g.constant(2.0, dtype)
    return g.add1("Mul", g.add1("Mul", x, g.add1("Pow", two, half)), g.add1("Pow", two, rest))


@rule("where")
def _where(c: OpContext) -> str:
    return c.g.add1("Where", c.as_dtype(c.a["condition"], torch.bool), c.as_out(c.a["self"]), c.as_out(c.a["other"]))


@rule("masked_fill")
def _masked_fill(c: OpContext) -> str:
    return c.g.add1("Where", c.as_dtype(c.a["mask"], torch.bool), c.as_out(c.a["value"]), c.as_out(c.a["self"]))


@rule("to", "_to_copy", "contiguous", "clone", "alias", "detach")
def _cast(c: OpContext) -> str:
    return c.as_out(c.a["self"])


def _reduce(op_type: str) -> Rule:
    def translate(c: OpContext) -> str:
        dims = c.a.get("dim")
        axes = [c.g.ints(dims)] if dims else []
        return c.g.add1(op_type, c.as_out(c.a["self"]), *axes, keepdims=int(bool(c.a.get("keepdim"))))
    return translate


RULES.update({"aten::sum": _reduce("ReduceSum"), "aten::mean": _reduce("ReduceMean"),
              "aten::amax": _reduce("ReduceMax"), "aten::amin": _reduce("ReduceMin")})


@rule("softmax", "_softmax")
def _softmax(c: OpContext) -> str:
    return c.g.add1("Softmax", c.as_out(c.a["self"]), axis=c.a["dim"])


@rule("matmul", "mm", "bmm")
def _matmul(c: OpContext) -> str:
    return c.g.add1("MatMul", c.as_out(c.a["self"]), c.as_out(c.a.get("other", c.a.get("mat2"))))


@rule("einsum")
def _einsum(c: OpContext) -> str:
    return c.g.add1("Einsum", *(c.as_out(t) for t in c.a["tensors"]), equation=c.a["equation"].replace(" ", ""))


@rule("topk")
def _topk(c: OpContext) -> list[str]:
    return c.g.add("TopK", [c.a["self"].name, c.as_1d(c.a["k"])], 2, axis=c.a["dim"],
                   largest=int(c.a["largest"]), sorted=int(c.a["sorted"]))


# ---- shapes and indexing ----------------------------------------------------------------------------
@rule("numpy_T", "t")
def _numpy_t(c: OpContext) -> str:
    return c.g.add1("Transpose", c.a["self"].name, perm=list(reversed(range(c.a["self"].rank))))


@rule("transpose")
def _transpose(c: OpContext) -> str:
    rank = c.a["self"].rank
    perm = list(range(rank))
    d0, d1 = c.a["dim0"] % rank, c.a["dim1"] % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return c.g.add1("Transpose", c.a["self"].name, perm=perm)


@rule("permute")
def _permute(c: OpContext) -> str:
    rank = c.a["self"].rank
    return c.g.add1("Transpose", c.a["self"].name, perm=[d % rank for d in c.a["dims"]])


@rule("unsqueeze")
def _unsqueeze(c: OpContext) -> str:
    return c.g.add1("Unsqueeze", c.a["self"].name, c.g.ints([c.a["dim"]]))


@rule("squeeze")
def _squeeze(c: OpContext) -> str:
    dims = c.a.get("dim")
    dims = [dims] if isinstance(dims, int) else dims
    x = c.a["self"]
    dims = [d for d in (dims if dims is not None else range(x.rank)) if x.meta.shape[d] == 1]
    return c.g.add1("Squeeze", x.name, c.g.ints(dims)) if dims else x.name


@rule("select")
def _select(c: OpContext) -> str:
    return c.g.add1("Gather", c.a["self"].name, c.as_dtype(c.a["index"], torch.int64), axis=c.a["dim"])


SLICE_THROUGH_FLOAT = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu)  # types Slice-13 lacks


@rule("slice")
def _slice(c: OpContext) -> str:
    """Slice; a packed FP8 weight's or e8m0 scale's rows (the grouped output projection) go through float32 and
    back, exact both ways (every such value is a float32)."""
    start = c.a["start"] if c.a["start"] is not None else 0
    end = c.a["end"] if c.a["end"] is not None else INT64_MAX
    x = c.a["self"]
    through_float = x.dtype in SLICE_THROUGH_FLOAT
    source = c.as_dtype(x, torch.float32) if through_float else x.name
    sliced = c.g.add1("Slice", source, c.as_1d(start), c.as_1d(end), c.g.ints([c.a["dim"]]), c.as_1d(c.a["step"]))
    return c.g.add1("Cast", sliced, to=onnx_dtype(x.dtype)) if through_float else sliced


def _reshape_to(c: OpContext, x: Value, sizes: list | None) -> str:
    """Reshape to the result's shape: a constant when it does not depend on the batch, else `sizes`
    (ints and SymInts as the op gives them)."""
    static = c.static_out_shape()
    if static is not None:
        shape = c.g.ints(static)
    elif sizes is not None:
        shape = c.shape_tensor(sizes)
    else:
        raise c.fail("result shape depends on the batch and the op gives no sizes")
    literal = static if static is not None else [s for s in sizes if not isinstance(s, Value)]
    zero = 0 in literal  # ONNX reads 0 as "copy the input's size" unless allowzero
    return c.g.add1("Reshape", x.name, shape, allowzero=1 if zero else None)


@rule("view", "reshape", "_unsafe_view")
def _view(c: OpContext) -> str:
    if "dtype" in c.a:  # view.dtype: the same bytes as another dtype
        return bit_cast(c)
    return _reshape_to(c, c.a["self"], list(c.a.get("size", c.a.get("shape"))))


@rule("flatten")
def _flatten(c: OpContext) -> str:
    x = c.a["self"]
    if x.rank == 0:
        return c.g.add1("Reshape", x.name, c.g.ints([1]))
    start, end = c.a["start_dim"] % x.rank, c.a["end_dim"] % x.rank
    return _reshape_to(c, x, _kept_dims(c, x, 0, start) + [-1] + _kept_dims(c, x, end + 1, x.rank))


@rule("unflatten")
def _unflatten(c: OpContext) -> str:
    x = c.a["self"]
    dim = c.a["dim"] % x.rank
    return _reshape_to(c, x, _kept_dims(c, x, 0, dim) + list(c.a["sizes"]) + _kept_dims(c, x, dim + 1, x.rank))


def _kept_dims(c: OpContext, x: Value, start: int, stop: int) -> list:
    """Sizes of x[start:stop]: ints where static, else read from the tensor's ONNX shape."""
    return [x.dims[d] if x.is_static(d) else _dim_value(c, x, d) for d in range(start, stop)]


def _dim_value(c: OpContext, x: Value, d: int) -> Value:
    """Size `d` of `x` as an int64 scalar `Value` (for sizes that follow the batch)."""
    return Value(c.g.add1("Gather", c.g.add1("Shape", x.name), c.g.constant(d, torch.int64)), 0)


@rule("expand")
def _expand(c: OpContext) -> str:
    """torch's -1 keeps a dim: ONNX Expand broadcasts, so 1 does the same."""
    static = c.static_out_shape()
    sizes = static if static is not None else [1 if (isinstance(s, int) and s == -1) else s for s in c.a["size"]]
    return c.g.add1("Expand", c.a["self"].name, c.shape_tensor(sizes))


@rule("arange")
def _arange(c: OpContext) -> str:
    """Range over start (default 0), end and step (default 1), each a number or a SymInt, in the result's dtype."""
    bounds = (c.a.get("start", 0), c.a["end"], c.a.get("step", 1))
    return c.g.add1("Range", *(c.as_out(v) for v in bounds))


@rule("zeros", "new_zeros", "zeros_like", "new_empty", "empty", "empty_like")
def _zeros(c: OpContext) -> str:
    """empty* are filled with zeros: ONNX has no uninitialised tensors."""
    static = c.static_out_shape()
    if static is not None:
        shape = c.g.ints(static)
    elif "size" in c.a:
        shape = c.shape_tensor(list(c.a["size"]))
    else:
        shape = c.g.add1("Shape", c.a["self"].name)
    return c.g.add1("ConstantOfShape", shape, value=_scalar_tensor(0, c.out.dtype))


def _scalar_tensor(value, dtype: torch.dtype):
    return tensor_proto(torch.tensor([value], dtype=dtype), "value")


@rule("cat", "concat")
def _cat(c: OpContext) -> str:
    return c.g.add1("Concat", *(c.as_out(t) for t in c.a["tensors"]), axis=c.a["dim"])


@rule("stack")
def _stack(c: OpContext) -> str:
    dim = c.a["dim"] % c.out.dim()
    parts = [c.g.add1("Unsqueeze", c.as_out(t), c.g.ints([dim])) for t in c.a["tensors"]]
    return c.g.add1("Concat", *parts, axis=dim)


@rule("gather")
def _gather(c: OpContext) -> str:
    """torch reads the index-shaped corner of self off the gathered axis; ONNX wants them equal there."""
    x, index = c.a["self"], c.a["index"]
    dim = c.a["dim"] % max(x.rank, 1)
    axes = [d for d in range(x.rank) if d != dim and x.meta.shape[d] != index.meta.shape[d]]
    source = x.name
    if axes:
        ends = [index.dims[d] if index.is_static(d) else _dim_value(c, index, d) for d in axes]
        source = c.g.add1("Slice", x.name, c.g.ints([0] * len(axes)), c.shape_tensor(ends), c.g.ints(axes))
    return c.g.add1("GatherElements", source, c.as_dtype(index, torch.int64), axis=dim)


@rule("scatter")
def _scatter(c: OpContext) -> str:
    x, index, src = c.a["self"], c.a["index"], c.a.get("src", c.a.get("value"))
    if c.a.get("reduce") is not None:
        raise c.fail("scatter with a reduction is not translated")
    if not isinstance(src, Value):
        updates = c.g.add1("Expand", c.as_out(src), c.g.add1("Shape", index.name))
    elif tuple(src.meta.shape) != tuple(index.meta.shape):  # torch reads the index-shaped corner of src
        updates = c.g.add1("Slice", c.as_out(src), c.g.ints([0] * index.rank), c.g.add1("Shape", index.name),
                           c.g.ints(range(index.rank)))
    else:
        updates = c.as_out(src)
    return c.g.add1("ScatterElements", c.as_out(x), c.as_dtype(index, torch.int64), updates, axis=c.a["dim"])


@rule("index")
def _index(c: OpContext) -> str:
    """One integer index tensor (others None) is a Gather on that axis; anything else is refused."""
    indices = list(c.a["indices"])
    used = [i for i, t in enumerate(indices) if t is not None]
    if len(used) != 1 or indices[used[0]].dtype in (torch.bool, torch.uint8):
        raise c.fail("only indexing with one integer index tensor is translated")
    return c.g.add1("Gather", c.a["self"].name, c.as_dtype(indices[used[0]], torch.int64), axis=used[0])


@rule("unfold")
def _unfold(c: OpContext) -> str:
    """Windows of `size` every `step` along `dimension`, the window as a new last dim: a Gather with a
    constant [n, size] index (the dim's length is static), then the window axis moved to the end."""
    x, dim, size, step = c.a["self"], c.a["dimension"] % max(c.a["self"].rank, 1), c.a["size"], c.a["step"]
    if not x.is_static(dim):
        raise c.fail("unfold along the batch dimension is not translated")
    count = (x.meta.shape[dim] - size) // step + 1
    index = [[w * step + k for k in range(size)] for w in range(count)]
    gathered = c.g.add1("Gather", x.name, c.g.constant(index, torch.int64), axis=dim)
    perm = list(range(dim + 1)) + list(range(dim + 2, x.rank + 1)) + [dim + 1]
    return c.g.add1("Transpose", gathered, perm=perm)


@rule("_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
      "sym_constrain_range_for_size")
def _assertion(c: OpContext) -> list[str]:
    """Checks torch.export leaves in a graph (dtype, shape and range asserts) have no ONNX form: dropped."""
    return []


# ---- SymInt arithmetic (int64 scalars) ------------------------------------------------------------
@rule("sym_size")
def _sym_size(c: OpContext) -> str:
    return c.g.add1("Gather", c.g.add1("Shape", c.a["self"].name), c.g.constant(c.a["dim"], torch.int64))


def _sym_binary(op_type: str) -> Rule:
    def translate(c: OpContext) -> str:
        a, b = (c.as_dtype(v, torch.int64) for v in c.args)
        if op_type == "FloorDiv":
            return c.g.add1("Div", c.g.add1("Sub", a, c.g.add1("Mod", a, b, fmod=0)), b)
        return c.g.add1(op_type, a, b, **({"fmod": 0} if op_type == "Mod" else {}))
    return translate


RULES.update({f"operator::{name}": _sym_binary(op) for name, op in
              {"add": "Add", "sub": "Sub", "mul": "Mul", "floordiv": "FloorDiv", "mod": "Mod"}.items()})


@rule("operator::neg")
def _sym_neg(c: OpContext) -> str:
    return c.g.add1("Neg", c.as_dtype(c.args[0], torch.int64))


def functional_name(base: str) -> str:
    """`add_` -> `add`: an in-place op translates as its functional twin (`__and__` stays)."""
    return base[:-1] if base.endswith("_") and not base.startswith("__") else base


def lookup(namespace: str, base: str) -> Rule:
    """The rule for an op's base name (in-place `name_` uses `name`); NotExpressible when there is none."""
    try:
        return RULES[f"{namespace}::{functional_name(base)}"]
    except KeyError:
        raise NotExpressible(f"{namespace}::{base}: no ONNX translation rule") from None
