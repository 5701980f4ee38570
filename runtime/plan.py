"""A lowered step as data: a straight-line list of registered ops over named buffers, stored as JSON.

A `Plan` is what the runtime executes; it never needs torch.fx or the compiler to read one.
- `inputs`: the step's named inputs in call order (`weights.*`, `state.*`, `tokens`, `start`, `hidden`),
  each with a shape whose symbolic batch dimension is the string "B", and a dtype name.
- `constants`: buffer name -> key of a tensor in the artifact's weights (graph constants such as lookup
  tables; the key is `constants.<attribute>`).
- `ops`: in execution order. Each `PlanOp` names a registered op (`aten::add.Tensor`; namespaces `aten`,
  `prims`, `dsv4c`) or a whitelisted Python operator for SymInt arithmetic (`operator::mul`), its
  arguments with buffers as `Ref`s, the buffers it defines and the buffers whose last use it is (`free`).
- `outputs`: (output name, buffer name) pairs in output order.

JSON encoding of an argument (`encode_value` / `decode_value`): null, bools, ints, strings and finite
floats are plain JSON; everything else is a one-key object: {"buf": name}, {"float": "inf" | "-inf" |
"nan"}, {"tuple": [...]}, {"dtype": "float32"}, {"device": "cpu"}, {"layout": "strided"},
{"memory_format": "contiguous_format"}. Lists stay JSON lists. `Plan.from_json` checks the structure
(every buffer defined before use and not used after it is freed, op names well formed); whether each op
exists is checked when an `Executor` resolves it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import re
import types
from typing import Any, Iterator, Mapping

import torch

PLAN_FORMAT_VERSION = 1
BATCH = "B"
OP_NAMESPACES = ("aten", "prims", "dsv4c")

# SymInt arithmetic and indexing into list results: the only Python callables a plan may name.
OPERATORS: Mapping[str, Any] = types.MappingProxyType({
    name: getattr(operator, name)
    for name in ("add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne", "lt", "le",
                 "gt", "ge", "and_", "or_", "not_", "getitem")
})

_OP_NAME = re.compile(r"^([A-Za-z_]\w*)::([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?$")
_TAGS = ("buf", "float", "tuple", "dtype", "device", "layout", "memory_format")
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class PlanError(ValueError):
    """A plan (or the graph it is built from) is malformed; the message names the op, buffer or field."""


@dataclasses.dataclass(frozen=True)
class Ref:
    """A reference to a named buffer inside an op's arguments."""

    name: str


@dataclasses.dataclass(frozen=True)
class PlanInput:
    """A step input: `shape` holds ints and `BATCH` for the symbolic batch dimension."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def torch_dtype(self) -> torch.dtype:
        return decode_dtype(self.dtype, f"input {self.name!r}")


@dataclasses.dataclass(frozen=True)
class PlanOp:
    """One call: `op` qualified name, arguments (buffers as `Ref`), defined buffers, buffers to free after.

    `outputs` has one entry per value the op returns (`None` for an unused one of several; empty when the
    op returns nothing); a single-output op's result is bound as is, a multi-output op's is unpacked.
    """

    op: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    outputs: tuple[str | None, ...]
    free: tuple[str, ...] = ()

    def refs(self) -> Iterator[str]:
        """Names of the buffers this op reads, in argument order (with repeats)."""
        yield from _refs_in(self.args)
        yield from _refs_in(tuple(self.kwargs.values()))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A lowered step; see the module docstring for the meaning of each field."""

    inputs: tuple[PlanInput, ...]
    constants: Mapping[str, str]
    ops: tuple[PlanOp, ...]
    outputs: tuple[tuple[str, str], ...]

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.outputs]

    @property
    def tensor_keys(self) -> set[str]:
        """The stored tensors the plan reads: its constants' keys and its `weights.<key>` inputs' keys."""
        weights = {spec.name[len("weights."):] for spec in self.inputs if spec.name.startswith("weights.")}
        return set(self.constants.values()) | weights

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (strict JSON: no NaN or infinity literals)."""
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self.inputs],
            "constants": dict(self.constants),
            "ops": [_op_to_dict(op) for op in self.ops],
            "outputs": [{"name": name, "buf": buf} for name, buf in self.outputs],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "plan") -> "Plan":
        """Parse and check a plan; `source` (a file name) starts every error message."""
        try:
            plan = _plan_from_dict(raw)
        except PlanError as error:
            raise PlanError(f"{source}: {error}") from None
        validate(plan, source)
        return plan

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "plan") -> "Plan":
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PlanError(f"{source}: not valid JSON ({error})") from None
        return cls.from_dict(raw, source)


def validate(plan: Plan, source: str = "plan") -> None:
    """Check that buffers are defined once, before use, never used after being freed, and that the
    outputs exist at the end; raise `PlanError` naming the op and buffer otherwise."""
    _unique(plan.input_names, f"{source}: input")
    _unique(plan.output_names, f"{source}: output")
    live = set(plan.input_names)
    defined = set(live)
    for name in plan.constants:
        _define(name, defined, live, f"{source}: constant")
    for index, op in enumerate(plan.ops):
        where = f"{source}: op {index} ({op.op})"
        for name in op.refs():
            if name not in live:
                state = "freed before" if name in defined else "not defined before"
                raise PlanError(f"{where}: buffer {name!r} is {state} this op")
        for name in op.outputs:
            if name is not None:
                _define(name, defined, live, where)
        for name in op.free:
            if name not in live:
                raise PlanError(f"{where}: frees buffer {name!r}, which is not live")
            live.discard(name)
    for name, buf in plan.outputs:
        if buf not in live:
            raise PlanError(f"{source}: output {name!r} reads buffer {buf!r}, which is not live at the end")


def parse_op_name(name: str) -> tuple[str, str, str]:
    """`aten::add.Tensor` -> ("aten", "add", "Tensor"); `operator::mul` -> ("operator", "mul", "")."""
    match = _OP_NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise PlanError(f"op name {name!r} is not of the form namespace::name.overload")
    namespace, base, overload = match.group(1), match.group(2), match.group(3) or ""
    if namespace == "operator":
        if base not in OPERATORS or overload:
            raise PlanError(f"op {name!r}: allowed Python operators are {sorted(OPERATORS)}")
    elif namespace not in OP_NAMESPACES or not overload:
        raise PlanError(f"op {name!r}: namespace must be one of {OP_NAMESPACES} with an explicit overload")
    return namespace, base, overload


def encode_value(value: Any, where: str = "argument") -> Any:
    """An argument as JSON data (see the module docstring); anything else raises `PlanError`."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, Ref):
        return {"buf": value.name}
    if isinstance(value, list):
        return [encode_value(v, where) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [encode_value(v, where) for v in value]}
    for tag, kind in (("dtype", torch.dtype), ("layout", torch.layout), ("memory_format", torch.memory_format)):
        if isinstance(value, kind):
            return {tag: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise PlanError(f"{where}: cannot encode a value of type {type(value).__name__} ({value!r})")


def decode_value(raw: Any, where: str = "argument") -> Any:
    """Inverse of `encode_value`; an unknown tag or a malformed value raises `PlanError`."""
    if raw is None or isinstance(raw, (bool, int, float, str)):
        return raw
    if isinstance(raw, list):
        return [decode_value(v, where) for v in raw]
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in _TAGS:
        raise PlanError(f"{where}: {raw!r} is not an encoded value (tags: {_TAGS})")
    tag, body = next(iter(raw.items()))
    if tag == "tuple":
        if not isinstance(body, list):
            raise PlanError(f"{where}: tuple body must be a list, got {body!r}")
        return tuple(decode_value(v, where) for v in body)
    if not isinstance(body, str):
        raise PlanError(f"{where}: {tag} must be a string, got {body!r}")
    return _decode_tagged(tag, body, where)


def decode_dtype(name: str, where: str) -> torch.dtype:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise PlanError(f"{where}: unknown dtype {name!r}")
    return value


def _decode_tagged(tag: str, body: str, where: str) -> Any:
    if tag == "buf":
        return Ref(body)
    if tag == "float":
        if body not in _NONFINITE:
            raise PlanError(f"{where}: float tag must be one of {sorted(_NONFINITE)}, got {body!r}")
        return _NONFINITE[body]
    if tag == "dtype":
        return decode_dtype(body, where)
    if tag == "device":
        try:
            return torch.device(body)
        except (RuntimeError, ValueError):
            raise PlanError(f"{where}: unknown device {body!r}") from None
    kind = torch.layout if tag == "layout" else torch.memory_format
    value = getattr(torch, body, None)
    if not isinstance(value, kind):
        raise PlanError(f"{where}: unknown {tag} {body!r}")
    return value


def _refs_in(values: Any) -> Iterator[str]:
    for value in values:
        if isinstance(value, Ref):
            yield value.name
        elif isinstance(value, (list, tuple)):
            yield from _refs_in(value)


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise PlanError(f"{what} name {name!r} appears twice")
        seen.add(name)


def _define(name: str, defined: set[str], live: set[str], where: str) -> None:
    if name in defined:
        raise PlanError(f"{where}: buffer {name!r} is defined twice")
    defined.add(name)
    live.add(name)


def _op_to_dict(op: PlanOp) -> dict[str, Any]:
    where = f"op {op.op} -> {list(op.outputs)}"
    return {
        "op": op.op,
        "args": [encode_value(a, where) for a in op.args],
        "kwargs": {k: encode_value(v, where) for k, v in op.kwargs.items()},
        "outputs": list(op.outputs),
        "free": list(op.free),
    }


def _plan_from_dict(raw: Any) -> Plan:
    _require_keys(raw, {"format_version", "inputs", "constants", "ops", "outputs"}, "plan")
    version = raw["format_version"]
    if version != PLAN_FORMAT_VERSION:
        raise PlanError(f"field 'format_version' is {version!r}; this dsv4c reads {PLAN_FORMAT_VERSION}")
    constants = raw["constants"]
    if not isinstance(constants, dict) or not all(isinstance(v, str) for v in constants.values()):
        raise PlanError("field 'constants' must map buffer names to weight keys (strings)")
    inputs = tuple(_input_from_dict(i, item) for i, item in enumerate(_list(raw, "inputs")))
    ops = tuple(_op_from_dict(i, item) for i, item in enumerate(_list(raw, "ops")))
    outputs = tuple(_output_from_dict(i, item) for i, item in enumerate(_list(raw, "outputs")))
    return Plan(inputs, dict(constants), ops, outputs)


def _input_from_dict(index: int, raw: Any) -> PlanInput:
    _require_keys(raw, {"name", "shape", "dtype"}, f"inputs[{index}]")
    name, shape = raw["name"], raw["shape"]
    ok = isinstance(shape, list) and all(d == BATCH or (isinstance(d, int) and d >= 0) for d in shape)
    if not isinstance(name, str) or not ok:
        raise PlanError(f"inputs[{index}]: needs a string name and a shape of ints and {BATCH!r}")
    decode_dtype(raw["dtype"], f"input {name!r}")
    return PlanInput(name, tuple(shape), raw["dtype"])


def _op_from_dict(index: int, raw: Any) -> PlanOp:
    _require_keys(raw, {"op", "args", "kwargs", "outputs", "free"}, f"ops[{index}]")
    where = f"op {index} ({raw['op']!r})"
    parse_op_name(raw["op"])
    args, kwargs, outputs, free = raw["args"], raw["kwargs"], raw["outputs"], raw["free"]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise PlanError(f"{where}: args must be a list and kwargs an object")
    if not isinstance(outputs, list) or not all(o is None or isinstance(o, str) for o in outputs):
        raise PlanError(f"{where}: outputs must be a list of buffer names or nulls")
    if not isinstance(free, list) or not all(isinstance(f, str) for f in free):
        raise PlanError(f"{where}: free must be a list of buffer names")
    return PlanOp(raw["op"], tuple(decode_value(a, where) for a in args),
                  {k: decode_value(v, where) for k, v in kwargs.items()}, tuple(outputs), tuple(free))


def _output_from_dict(index: int, raw: Any) -> tuple[str, str]:
    _require_keys(raw, {"name", "buf"}, f"outputs[{index}]")
    if not isinstance(raw["name"], str) or not isinstance(raw["buf"], str):
        raise PlanError(f"outputs[{index}]: name and buf must be strings")
    return raw["name"], raw["buf"]


def _list(raw: dict[str, Any], field: str) -> list[Any]:
    if not isinstance(raw[field], list):
        raise PlanError(f"field {field!r} must be a list")
    return raw[field]


def _require_keys(raw: Any, keys: set[str], where: str) -> None:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected an object, got {type(raw).__name__}")
    missing, extra = keys - raw.keys(), raw.keys() - keys
    if missing or extra:
        raise PlanError(f"{where}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")
