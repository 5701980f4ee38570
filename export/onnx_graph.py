"""The ONNX graph under construction while a plan is exported: values, constants, casts, shape tensors.

`GraphBuilder` owns the node list, the initializers and the value names (every name unique, as ONNX
requires); `OpContext` is what one translation rule (compiler/onnx_ops.py) sees of the plan op it
translates: its arguments with buffers bound to `Value`s, the torch meta tensors of its results, and
helpers that turn a `Value` or a Python number into an ONNX value of a given dtype.

A `Value` is one plan buffer as ONNX sees it: its ONNX name and its torch meta value (a meta tensor, or
a Python int for SymInt arithmetic, stored in ONNX as an int64 scalar) at the export's batch size.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "dsv4c"
INT64_MAX = 2**63 - 1

ONNX_DTYPES: Mapping[torch.dtype, int] = {
    torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE, torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
    torch.int16: TensorProto.INT16, torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64,
    torch.bool: TensorProto.BOOL, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
    torch.float8_e5m2: TensorProto.FLOAT8E5M2, torch.float8_e8m0fnu: TensorProto.FLOAT8E8M0,
}


class NotExpressible(ValueError):
    """A plan op (or one use of it) has no ONNX translation; the message names the op and why."""


def onnx_dtype(dtype: torch.dtype, where: str = "") -> int:
    try:
        return ONNX_DTYPES[dtype]
    except KeyError:
        raise NotExpressible(f"{where}dtype {dtype} has no ONNX element type here") from None


@dataclasses.dataclass(frozen=True)
class Value:
    """A plan buffer in the ONNX graph: its name, its torch meta value (a meta tensor, or an int for a
    SymInt) and its dims (ints, or strings such as "B" or "2*B" for sizes that follow the batch)."""

    name: str
    meta: Any
    dims: tuple[int | str | None, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        return self.meta.dtype if isinstance(self.meta, torch.Tensor) else torch.int64

    @property
    def rank(self) -> int:
        return self.meta.dim() if isinstance(self.meta, torch.Tensor) else 0

    def is_static(self, dim: int | None = None) -> bool:
        """Whether dim `dim` (every dim when None) is the same at every batch size."""
        dims = self.dims if dim is None else (self.dims[dim],)
        return all(isinstance(d, int) for d in dims)


class GraphBuilder:
    """Nodes, initializers and unique names of the graph being written."""

    def __init__(self, taken: Sequence[str] = ()):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names = set(taken)
        self._counter = itertools.count()
        self._constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        """A new value name starting with `hint`."""
        name = hint
        while name in self._names:
            name = f"{hint}__{next(self._counter)}"
        self._names.add(name)
        return name

    def claim(self, name: str) -> bool:
        """Take `name` for a new value if it is neither taken nor reserved for a plan buffer."""
        if name in self._names:
            return False
        self._names.add(name)
        return True

    def add(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, *,
            domain: str = "", hint: str | None = None, **attributes: Any) -> list[str]:
        """Append a node; `outputs` is a count (fresh names from `hint`) or the names to define."""
        if isinstance(outputs, int):
            outputs = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        attrs = {k: v for k, v in attributes.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), domain=domain, **attrs))
        return list(outputs)

    def add1(self, op_type: str, *inputs: str, hint: str | None = None, **attributes: Any) -> str:
        return self.add(op_type, inputs, 1, hint=hint, **attributes)[0]

    def constant(self, value: Any, dtype: torch.dtype) -> str:
        """An initializer holding `value` (a number or nested list) as `dtype`, shared between uses."""
        array = torch.tensor(value, dtype=dtype)
        key = (dtype, tuple(array.shape), tuple(array.flatten().tolist()))
        if key not in self._constants:
            name = self.fresh(f"const_{str(dtype).removeprefix('torch.')}")
            self.initializers.append(tensor_proto(array, name))
            self._constants[key] = name
        return self._constants[key]

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant (axes, starts, shapes)."""
        return self.constant(list(values), torch.int64)


def tensor_proto(tensor: torch.Tensor, name: str) -> onnx.TensorProto:
    """A CPU tensor as an ONNX initializer, bit for bit (narrow float types through their bytes)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu):
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()  # reshape: a 0-dim tensor has no byte view
        return helper.make_tensor(name, onnx_dtype(tensor.dtype), list(tensor.shape), raw, raw=True)
    return numpy_helper.from_array(tensor.numpy(), name)


class OpContext:
    """One plan op being translated: arguments by schema name (`a`), result `Value`s, value helpers."""

    def __init__(self, graph: GraphBuilder, op_name: str, base: str, named_args: Mapping[str, Any],
                 args: tuple, results: Sequence[Value]):
        self.g = graph
        self.op = op_name
        self.base = base
        self.a = dict(named_args)
        self.args = args
        self.results = list(results)

    @property
    def out(self) -> Any:
        """The meta value of the (first) result."""
        return self.results[0].meta

    def fail(self, why: str) -> NotExpressible:
        return NotExpressible(f"{self.op}: {why}")

    def as_dtype(self, value: Any, dtype: torch.dtype) -> str:
        """`value` (a `Value` or a Python number) as an ONNX value of `dtype` (a Cast where needed)."""
        if isinstance(value, Value):
            if value.dtype == dtype:
                return value.name
            return self.g.add1("Cast", value.name, to=onnx_dtype(dtype, f"{self.op}: "))
        if isinstance(value, (bool, int, float)):
            return self.g.constant(value, dtype)
        raise self.fail(f"expected a tensor or a number, got {value!r}")

    def as_out(self, value: Any) -> str:
        """`value` in the dtype of the op's result (aten's implicit type promotion made explicit)."""
        return self.as_dtype(value, self.out.dtype)

    def as_1d(self, value: Any) -> str:
        """An int (or SymInt `Value`) as a 1-D int64 tensor of one element."""
        if isinstance(value, Value):
            return self.g.add1("Unsqueeze", self.as_dtype(value, torch.int64), self.g.ints([0]))
        return self.g.ints([int(value)])

    def shape_tensor(self, sizes: Sequence[Any]) -> str:
        """A 1-D int64 shape from sizes that are ints or SymInt `Value`s (a constant when all are ints)."""
        if all(not isinstance(s, Value) for s in sizes):
            return self.g.ints([int(s) for s in sizes])
        return self.g.add1("Concat", *(self.as_1d(s) for s in sizes), axis=0)

    def static_out_shape(self) -> list[int] | None:
        """The result's shape when it does not depend on the batch, else None."""
        return list(self.results[0].dims) if self.results[0].is_static() else None

    def promoted(self, *values: Any) -> torch.dtype:
        """torch's result type of `values` (tensors by their metas, numbers as they are)."""
        operands = [v.meta if isinstance(v, Value) else v for v in values]
        dtype = torch.result_type(operands[0], operands[1]) if len(operands) > 1 else operands[0].dtype
        for other in operands[2:]:
            dtype = torch.result_type(torch.empty((), dtype=dtype, device="meta"), other)
        return dtype
