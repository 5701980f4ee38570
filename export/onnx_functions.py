"""dsv4c's fused ops in ONNX: one node in domain "dsv4c" each, defined by a model-local function.

A dsv4c op is exported as a single node `dsv4c.<name>` (op type = the op's name, e.g. `dequant_fp8_weight`):
tensor arguments are its inputs in schema order (an absent optional tensor is "", a tensor list one input per
element: `w1` of routed_moe gives `w1_0`, `w1_1`, ... in its function), every other argument an attribute of
the same name (a dtype as its ONNX element type). The model also carries an ONNX function
(a `FunctionProto` in domain "dsv4c") whose body is the op's reference implementation in standard ops, so
ONNX's shape inference checks everything downstream, and a runtime without a dsv4c kernel can run the
graph by inlining the body while one with a kernel keeps the node. Bodies come from two places:
- `FUNCTION_BODIES`: written here, generic in every size and attribute (the dequant ops, fp8_linear,
  fp8_grouped_linear and bf16_linear: one body serves every weight shape);
- otherwise the op's PyTorch reference traced for the call's signature (compiler/onnx_reference.py): one
  function overload per distinct (dtypes, sizes, non-tensor arguments), generic only in the batch, its
  attributes declared for the node's sake but already fixed in the body (the overload name says which).
An op whose body cannot be made is exported opaque (the node alone) and named, with the reason, in the
model's metadata; ONNX's checker then cannot check past it.
"""

from __future__ import annotations

from typing import Any, Callable

import onnx
import torch
from onnx import TensorProto, helper

from dsv4c.model import quant
from dsv4c.export.onnx_graph import DOMAIN, NotExpressible, Value, onnx_dtype, tensor_proto

FUNCTION_OPSET = 24  # Cast from FLOAT8E8M0 (the scales) is in opset 24


TracedBody = Callable[[str, dict[str, Any], str], onnx.FunctionProto]


class FunctionLibrary:
    """The dsv4c functions one model uses, and the ops left opaque with the reason."""

    def __init__(self, traced_body: TracedBody):
        """`traced_body(op, named_args, overload)` makes a body from the op's traced reference."""
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}
        self.opaque: dict[str, str] = {}
        self._overloads: dict[tuple[str, str], str] = {}
        self._traced_body = traced_body

    def call(self, graph, base: str, schema: torch.FunctionSchema, named: dict[str, Any],
             outputs: list[str]) -> list[str]:
        """Emit the op's node, with the overload of its function (made on first use)."""
        overload = self._function_for(base, schema, named)
        names = emit_custom_node(graph, base, schema, named, outputs)
        graph.nodes[-1].overload = overload
        return names

    def _function_for(self, base: str, schema: torch.FunctionSchema, named: dict[str, Any]) -> str:
        if base in FUNCTION_BODIES:
            if (base, "") not in self.functions:
                self.functions[(base, "")] = FUNCTION_BODIES[base]()
            return ""
        key = (base, _signature(schema, named))
        if key not in self._overloads:
            overload = f"s{sum(1 for other, _ in self._overloads if other == base)}"
            try:
                self.functions[(base, overload)] = self._traced_body(base, named, overload)
            except Exception as error:  # any failure to trace or translate leaves the op opaque, with why
                self.opaque.setdefault(base, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
                overload = ""
            self._overloads[key] = overload
        return self._overloads[key]


def _signature(schema: torch.FunctionSchema, named: dict[str, Any]) -> str:
    return ";".join(_describe(named.get(argument.name)) for argument in schema.arguments)


def _describe(value: Any) -> str:
    if isinstance(value, Value):
        return f"{value.dtype}{list(value.dims)}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, Value) for v in value):
        return f"[{','.join(_describe(v) for v in value)}]"
    return repr(value)


def tensor_inputs(schema: torch.FunctionSchema, named: dict[str, Any]) -> list[tuple[str, Any]]:
    """The op's tensor inputs in schema order as (input name, value): its node's (and function's) inputs. A
    tensor-list argument `w` gives one input per element, named `w_0`, `w_1`, ...; an absent optional tensor
    gives (its name, None)."""
    inputs = []
    for argument in schema.arguments:
        if "Tensor" not in str(argument.type):
            continue
        value = named.get(argument.name)
        if isinstance(value, (list, tuple)):
            inputs.extend((f"{argument.name}_{i}", v) for i, v in enumerate(value))
        else:
            inputs.append((argument.name, value))
    return inputs


def attribute_names(schema: torch.FunctionSchema) -> list[str]:
    return [a.name for a in schema.arguments if "Tensor" not in str(a.type)]


def emit_custom_node(graph, base: str, schema: torch.FunctionSchema, named: dict[str, Any],
                     outputs: list[str]) -> list[str]:
    """One dsv4c-domain node for the op: tensors as inputs, everything else as attributes."""
    inputs = [value.name if isinstance(value, Value) else "" for _, value in tensor_inputs(schema, named)]
    attributes = {}
    for argument in schema.arguments:
        value = named.get(argument.name)
        if "Tensor" not in str(argument.type) and value is not None:
            attributes[argument.name] = _attribute(value, f"dsv4c::{base} argument {argument.name!r}")
    while inputs and inputs[-1] == "":
        inputs.pop()
    return graph.add(base, inputs, outputs, domain=DOMAIN, **attributes)


def _attribute(value: Any, where: str) -> Any:
    if isinstance(value, torch.dtype):
        return onnx_dtype(value, f"{where}: ")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return list(value)
    raise NotExpressible(f"{where}: {value!r} cannot be an ONNX attribute")


def _function(name: str, inputs: list[str], nodes: list[onnx.NodeProto], attributes: list[str],
              doc: str) -> onnx.FunctionProto:
    return helper.make_function(DOMAIN, name, inputs, ["output"], nodes,
                                [helper.make_opsetid("", FUNCTION_OPSET)], attributes=attributes, doc_string=doc)


class _Body:
    """Nodes of a function body with generated value names."""

    def __init__(self, prefix: str = "t") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix  # a branch's names must differ from its function's

    def __call__(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        name = out or f"{self.prefix}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def const(self, value: Any, dtype: torch.dtype) -> str:
        return self("Constant", value=tensor_proto(torch.tensor(value, dtype=dtype), "value"))

    def f32(self, value: float) -> str:
        return self.const(value, torch.float32)

    def cast_to_attr(self, x: str, attr: str, out: str) -> str:
        node = helper.make_node("Cast", [x], [out])
        ref = helper.make_attribute_ref("to", onnx.AttributeProto.INT)
        ref.ref_attr_name = attr
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    def attr_const(self, attr: str) -> str:
        """The function's int attribute `attr` as an int64 scalar tensor."""
        node = helper.make_node("Constant", [], [f"{self.prefix}{len(self.nodes)}"])
        ref = helper.make_attribute_ref("value_int", onnx.AttributeProto.INT)
        ref.ref_attr_name = attr
        node.attribute.append(ref)
        self.nodes.append(node)
        return node.output[0]

    def block_index(self, length: str, block: int) -> str:
        """[0, 1, ..., length-1] // block: which scale each row or column reads."""
        steps = self("Range", self.const(0, torch.int64), length, self.const(1, torch.int64))
        return self("Div", steps, self.const(block, torch.int64))

    def dim(self, x: str, axis: int) -> str:
        return self("Gather", self("Shape", x), self.const(axis, torch.int64))


def _fp8_weight_values(b: _Body) -> str:
    """The fp32 values of the function inputs `weight` (e4m3 [out, in]) and `scale` (e8m0, 128x128 blocks)."""
    scale = b("Cast", "scale", to=TensorProto.FLOAT)
    rows = b("Gather", scale, b.block_index(b.dim("weight", 0), 128), axis=0)
    full = b("Gather", rows, b.block_index(b.dim("weight", 1), 128), axis=1)
    return b("Mul", b("Cast", "weight", to=TensorProto.FLOAT), full)


def _dequant_fp8_weight() -> onnx.FunctionProto:
    b = _Body()
    b.cast_to_attr(_fp8_weight_values(b), "dtype", "output")
    return _function("dequant_fp8_weight", ["weight", "scale"], b.nodes, ["dtype"],
                     "weight e4m3 [out, in] times its e8m0 scale per 128x128 block, as `dtype`")


def _power_of_two_ceil(b: _Body, ratio: str) -> str:
    """quant.power_of_two_scale: the smallest power of two >= ratio (ratio itself when not finite). The
    log's estimate is off by at most one either way; one step each way makes it exact."""
    power = b("Pow", b.f32(2.0), b("Ceil", b("Div", b("Log", ratio), b.f32(0.6931471805599453))))
    power = b("Where", b("Less", power, ratio), b("Mul", power, b.f32(2.0)), power)
    half = b("Mul", power, b.f32(0.5))
    return b("Where", b("GreaterOrEqual", half, ratio), half, power)


def _rounded_rows(x: str) -> onnx.GraphProto:
    """The branch computing `quant.fake_quant_fp8(x, 128)` of fp32 x [..., K] (any K: zeros pad the last
    block, as codegen/fp8_linear.py's `fake_quant_rows`), in fp32."""
    b = _Body("q")
    k = b("Unsqueeze", b.dim(x, -1), b.const([0], torch.int64))
    rows = b("Reshape", x, b("Concat", b.const([-1], torch.int64), k, axis=0))
    padded_k = b("Mul", b("Div", b("Add", k, b.const([127], torch.int64)), b.const([128], torch.int64)),
                 b.const([128], torch.int64))
    pads = b("Concat", b.const([0, 0, 0], torch.int64), b("Sub", padded_k, k), axis=0)
    blocks = b("Reshape", b("Pad", rows, pads), b.const([0, -1, 128], torch.int64))
    amax = b("ReduceMax", b("Abs", blocks), b.const([-1], torch.int64), keepdims=1)
    scale = _power_of_two_ceil(b, b("Div", b("Max", amax, b.f32(quant.FP8_AMAX_FLOOR)), b.f32(quant.FP8_MAX)))
    scaled = b("Clip", b("Div", blocks, scale), b.f32(-quant.FP8_MAX), b.f32(quant.FP8_MAX))
    codes = b("Cast", b("Cast", scaled, to=TensorProto.FLOAT8E4M3FN), to=TensorProto.FLOAT)
    flat = b("Reshape", b("Mul", codes, scale), b.const([0, -1], torch.int64))
    kept = b("Slice", flat, b.const([0], torch.int64), k, b.const([1], torch.int64))
    b("Reshape", kept, b("Shape", x), out="rounded")
    return helper.make_graph(b.nodes, "rounded_rows", [],
                             [helper.make_tensor_value_info("rounded", TensorProto.FLOAT, None)])


def _activation_values(b: _Body) -> str:
    """The fp32 values the function input `x` [..., K] is multiplied as: rounded per 128 values when the
    `act_quant` attribute is set, else x itself."""
    x = b("Cast", "x", to=TensorProto.FLOAT)
    unchanged = helper.make_graph([helper.make_node("Identity", [x], ["plain"])], "plain_rows", [],
                                  [helper.make_tensor_value_info("plain", TensorProto.FLOAT, None)])
    act_quant = b("Cast", b.attr_const("act_quant"), to=TensorProto.BOOL)
    return b("If", act_quant, then_branch=_rounded_rows(x), else_branch=unchanged)


def _fp8_linear() -> onnx.FunctionProto:
    b = _Body()
    values = _activation_values(b)
    product = b("MatMul", values, b("Transpose", _fp8_weight_values(b), perm=[1, 0]))
    b.cast_to_attr(product, "out_dtype", "output")
    return _function("fp8_linear", ["x", "weight", "scale"], b.nodes, ["act_quant", "out_dtype"],
                     "x [..., K] (rounded to e4m3 per 128 values with power-of-two scales when act_quant) "
                     "@ the e4m3 weight [N, K] times its 128x128 e8m0 scales, transposed, in fp32; as out_dtype")


def _fp8_grouped_linear() -> onnx.FunctionProto:
    b = _Body()
    values = b("Unsqueeze", _activation_values(b), b.const([-2], torch.int64))  # [..., G, 1, K]
    first = b.const([0], torch.int64)
    groups, k = (b("Unsqueeze", b.dim("x", axis), first) for axis in (-2, -1))
    per_group = b("Reshape", _fp8_weight_values(b), b("Concat", groups, b.const([-1], torch.int64), k, axis=0))
    product = b("MatMul", values, b("Transpose", per_group, perm=[0, 2, 1]))  # [..., G, 1, N]
    lead = b("Slice", b("Shape", "x"), first, b.const([-2], torch.int64))
    flat = b("Reshape", product, b("Concat", lead, b.const([-1], torch.int64), axis=0))
    b.cast_to_attr(flat, "out_dtype", "output")
    return _function("fp8_grouped_linear", ["x", "weight", "scale"], b.nodes, ["act_quant", "out_dtype"],
                     "x [..., G, K] (rounded as fp8_linear's when act_quant), group g times rows [g*N, (g+1)*N) of "
                     "the e4m3 weight [G*N, K] times its 128x128 e8m0 scales, transposed, in fp32; [..., G*N] as "
                     "out_dtype")


def _bf16_linear() -> onnx.FunctionProto:
    b = _Body()
    weight = b("Transpose", b("Cast", "weight", to=TensorProto.FLOAT), perm=[1, 0])
    b.cast_to_attr(b("MatMul", b("Cast", "x", to=TensorProto.FLOAT), weight), "out_dtype", "output")
    return _function("bf16_linear", ["x", "weight"], b.nodes, ["out_dtype"],
                     "x [..., K] (bf16 or fp32) @ the bf16 weight [N, K] transposed, in fp32; as out_dtype")


def _dequant_fp4_weight() -> onnx.FunctionProto:
    b = _Body()
    raw = b("Mod", b("Cast", "weight", to=TensorProto.INT32), b.const(256, torch.int32), fmod=0)  # the byte
    sixteen = b.const(16, torch.int32)
    low, high = b("Mod", raw, sixteen, fmod=0), b("Div", raw, sixteen)
    axis = b.const([-1], torch.int64)
    pairs = b("Concat", b("Unsqueeze", low, axis), b("Unsqueeze", high, axis), axis=-1)  # low nibble first
    shape = b("Concat", b("Unsqueeze", b.dim("weight", 0), b.const([0], torch.int64)),
              b.const([-1], torch.int64), axis=0)
    codes = b("Reshape", pairs, shape)
    table = list(quant.E2M1_MAGNITUDES) + [-v for v in quant.E2M1_MAGNITUDES]
    values = b("Gather", b.const(table, torch.float32), codes, axis=0)
    scale = b("Cast", "scale", to=TensorProto.FLOAT)
    full = b("Gather", scale, b.block_index(b.dim(codes, 1), 32), axis=1)
    b.cast_to_attr(b("Mul", values, full), "dtype", "output")
    return _function("dequant_fp4_weight", ["weight", "scale"], b.nodes, ["dtype"],
                     "MXFP4 int8 [out, in/2] (two e2m1 codes a byte, low nibble first) times its e8m0 "
                     "scale per 32 values, as `dtype` [out, in]")


FUNCTION_BODIES: dict[str, Callable[[], onnx.FunctionProto]] = {
    "dequant_fp8_weight": _dequant_fp8_weight,
    "dequant_fp4_weight": _dequant_fp4_weight,
    "fp8_linear": _fp8_linear,
    "fp8_grouped_linear": _fp8_grouped_linear,
    "bf16_linear": _bf16_linear,
}
