"""A plan (runtime/plan.py) as an ONNX model, written op by op from the plan itself.

Why not `torch.onnx.export(..., dynamo=True)` on a GraphModule rebuilt from the plan: the plan is already
a flat list of aten ops, and torch.onnx re-traces it twice under symbolic shapes (torch.export, then its
decompositions: about 4 minutes for the tiny model's 2,400 ops on a 2-core machine, growing with the
model); it also has no element type for the e8m0 scales (torch.float8_e8m0fnu) and no translation of
`frexp`. Here each op is translated by a small rule (compiler/onnx_ops.py), with the dtypes and shapes a
rule needs taken from running the plan on the meta device at two batch sizes (sizes that differ between
the runs follow the batch; they are written "B", "2*B", ...): seconds for the tiny model.

The model:
- inputs: the plan's inputs in order (`weights.<name>`, `state.<name>`, `tokens`, `start`, ...), with the
  batch dimension named "B". The weights are graph inputs, not initializers: they are the artifact's
  tensors `<name>` (FP8/MXFP4 packed, e8m0 scales as FLOAT8E8M0), hundreds of GB for a real model, and
  stay in the artifact's safetensors; the file holds the graph only. The plan's constants (small lookup
  tables) are initializers.
- outputs: the plan's outputs; an output named like an input (the updated state) gets the prefix `new_`.
- nodes: standard ONNX (opset `OPSET`) plus one node in domain "dsv4c" per fused op, each defined by a
  model-local function (compiler/onnx_functions.py: written by hand, or traced from the op's PyTorch
  reference); `value_info` for every plan buffer, so ONNX's shape inference (checker `full_check`)
  compares its shapes and types with torch's, through the function bodies too.
- metadata: `dsv4c.variant`, `dsv4c.weights`, `dsv4c.opaque_ops` (dsv4c ops exported without a body).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

import onnx
import torch
from onnx import helper

from dsv4c.runtime.executor import resolve_op
from dsv4c.runtime.plan import BATCH, Plan, PlanOp, Ref, parse_op_name

from dsv4c.export.onnx_functions import FUNCTION_OPSET, FunctionLibrary, attribute_names, tensor_inputs
from dsv4c.export.onnx_graph import DOMAIN, GraphBuilder, NotExpressible, OpContext, Value, onnx_dtype, tensor_proto
from dsv4c.export.onnx_ops import functional_name, lookup
from dsv4c.export.onnx_reference import trace_reference

OPSET = FUNCTION_OPSET
TRACE_BATCHES = (3, 5)  # two sizes, so a size that follows the batch differs; 1 would hide broadcasting
WEIGHT_PREFIX = "weights."


def plan_to_onnx(plan: Plan, constants: Mapping[str, torch.Tensor], *, name: str = "dsv4c_step",
                 metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """The ONNX model of `plan`; `constants` maps the plan's constant keys to tensors.

    Raises `NotExpressible` naming the op for anything without a translation."""
    library = FunctionLibrary(lambda op, named, overload: _traced_function(library, op, named, overload))
    lowered = _lower(plan, constants, library)
    inputs = [_value_info(spec.name, lowered.env[spec.name]) for spec in plan.inputs]
    graph = helper.make_graph(lowered.g.nodes, name, inputs, lowered.output_infos, lowered.g.initializers,
                              value_info=lowered.value_infos)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]
    functions = [library.functions[key] for key in sorted(library.functions)]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions, producer_name="dsv4c",
                              ir_version=helper.find_min_ir_version_for(opsets[:1]))
    props = {"dsv4c.batch_dim": BATCH,
             "dsv4c.weights": f"graph inputs named {WEIGHT_PREFIX}<key> are the artifact's tensors <key>; "
                              "they are not stored in this file",
             "dsv4c.opaque_ops": "; ".join(f"{op} ({why})" for op, why in sorted(library.opaque.items())),
             **(metadata or {})}
    helper.set_model_props(model, props)
    if library.opaque:
        warnings.warn(f"ONNX export: dsv4c ops without a function body (opaque): {props['dsv4c.opaque_ops']}",
                      stacklevel=2)
    return model


@dataclasses.dataclass
class _Lowered:
    """A plan translated into a graph builder: buffer values, output names and value infos."""

    g: GraphBuilder
    env: dict[str, Value]
    outputs: list[str]
    output_infos: list[onnx.ValueInfoProto]
    value_infos: list[onnx.ValueInfoProto]


def _lower(plan: Plan, constants: Mapping[str, torch.Tensor], library: FunctionLibrary) -> _Lowered:
    values = trace_shapes(plan, constants)
    taken = [*plan.input_names, *plan.constants, *(o for op in plan.ops for o in op.outputs if o)]
    g = GraphBuilder(taken)
    env = {spec.name: values[spec.name] for spec in plan.inputs}
    env.update({buf: values[buf] for buf in plan.constants})
    g.initializers.extend(tensor_proto(constants[key], buf) for buf, key in plan.constants.items())
    in_place_targets = _in_place_targets(plan)
    for index, op in enumerate(plan.ops):
        try:
            _translate(g, index, op, env, values, in_place_targets.get(index), library)
        except NotExpressible as error:
            raise NotExpressible(f"op {index} ({op.op} -> {', '.join(map(str, op.outputs))}): {error}") from None
    outputs, output_infos = _outputs(g, plan, env)
    described = {*plan.input_names, *plan.constants, *outputs}
    infos = [_value_info(v.name, v) for buf, v in env.items() if v.name == buf and buf not in described]
    return _Lowered(g, env, outputs, output_infos, infos)


def _traced_function(library: FunctionLibrary, op: str, named: dict[str, Any], overload: str) -> onnx.FunctionProto:
    """The function overload of dsv4c op `op` for one call signature, from its traced reference."""
    schema = resolve_op(f"{DOMAIN}::{op}.default")._schema
    plan, constants = trace_reference(f"{DOMAIN}::{op}", named)
    lowered = _lower(plan, constants, library)
    constant_nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in lowered.g.initializers]
    tensors = tensor_inputs(schema, named)
    fixed = ", ".join(f"{a.name}={named.get(a.name)!r}" for a in schema.arguments if a.name in attribute_names(schema))
    fixed += "".join(f", {k}: {v.dtype} {list(v.dims)}" for k, v in tensors if isinstance(v, Value))
    function = helper.make_function(
        DOMAIN, op, [name for name, _ in tensors], lowered.outputs, constant_nodes + lowered.g.nodes,
        [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)], attributes=attribute_names(schema),
        doc_string=f"the PyTorch reference traced for {fixed}; generic in the batch only")
    function.overload = overload
    function.value_info.extend(lowered.value_infos)
    return function


def trace_shapes(plan: Plan, constants: Mapping[str, torch.Tensor]) -> dict[str, Value]:
    """Every buffer's meta value at `TRACE_BATCHES[0]`, with dims that follow the batch as strings."""
    first, second = (_run_meta(plan, constants, batch) for batch in TRACE_BATCHES)
    return {buf: Value(buf, meta, _dims(meta, second[buf])) for buf, meta in first.items()}


def _run_meta(plan: Plan, constants: Mapping[str, torch.Tensor], batch: int) -> dict[str, Any]:
    meta = torch.device("meta")
    env: dict[str, Any] = {}
    for spec in plan.inputs:
        shape = [batch if d == BATCH else d for d in spec.shape]
        env[spec.name] = torch.empty(shape, dtype=spec.torch_dtype(), device=meta)
    env.update({buf: constants[key].to(meta) for buf, key in plan.constants.items()})
    for index, op in enumerate(plan.ops):
        try:
            result = resolve_op(op.op)(*_bind_meta(op.args, env), **_bind_meta(op.kwargs, env))
        except Exception as error:
            raise NotExpressible(f"op {index} ({op.op}) cannot run on the meta device: {error}") from error
        for position, (buf, value) in enumerate(_results(op, result)):
            env[buf if buf is not None else _unused_key(index, position)] = value
    return env


def _unused_key(index: int, position: int) -> str:
    """Where the trace keeps an unused result of a multi-output op (rules may read its dtype)."""
    return f"#{index}.{position}"


def _bind_meta(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, dict):
        return {k: _bind_meta(v, env) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_bind_meta(v, env) for v in value)
    return value


def _results(op: PlanOp, result: Any) -> list[tuple[str | None, Any]]:
    if not op.outputs:
        return []
    if len(op.outputs) == 1:
        return [(op.outputs[0], result)]
    return list(zip(op.outputs, result))


def _dims(first: Any, second: Any) -> tuple[int | str | None, ...]:
    """Sizes at the two trace batches -> ints, `a*B+c` strings for sizes linear in the batch, or None
    (an unnamed ONNX dim) for any other dependence."""
    if not isinstance(first, torch.Tensor):
        return ()
    (b1, b2), out = TRACE_BATCHES, []
    for d1, d2 in zip(first.shape, second.shape):
        slope, rem = divmod(int(d2) - int(d1), b2 - b1)
        offset = int(d1) - slope * b1
        if slope == 0 or rem:
            out.append(int(d1) if d1 == d2 else None)
            continue
        term = BATCH if slope == 1 else f"{slope}*{BATCH}"
        out.append(term if offset == 0 else f"{term}{offset:+d}")
    return tuple(out)


def _translate(g: GraphBuilder, index: int, op: PlanOp, env: dict[str, Value], values: dict[str, Value],
               in_place_target: list[str] | None, library: FunctionLibrary) -> None:
    namespace, base, _ = parse_op_name(op.op)
    args = _bind(op.args, env)
    kwargs = {k: _bind(v, env) for k, v in op.kwargs.items()}
    results = [values[buf if buf is not None else _unused_key(index, i)] for i, buf in enumerate(op.outputs)]
    start = len(g.nodes)
    written = in_place_target or []
    if namespace == DOMAIN:  # an op that writes k arguments returns their k new values (its body: the writes)
        schema = resolve_op(op.op)._schema
        names = library.call(g, base, schema, _by_schema(schema, args, kwargs),
                             [g.fresh(f"{base}_out") for _ in range(max(len(op.outputs), len(written)))])
        for target, name in list(zip(written, names))[1:]:
            env[target] = Value(name, values[target].meta, values[target].dims)
        names = names[:len(op.outputs)]
    else:
        named = _by_schema(resolve_op(op.op)._schema, args, kwargs) if namespace != "operator" else {}
        context = OpContext(g, op.op, functional_name(base), named, args, results)
        names = lookup(namespace, base)(context)
        names = [names] if isinstance(names, str) else list(names)
    if len(names) != len(op.outputs):
        raise NotExpressible(f"rule gave {len(names)} results for {len(op.outputs)} outputs")
    for buf, name in zip(op.outputs, names):
        if buf is not None:
            env[buf] = Value(_rename(g, start, name, buf), values[buf].meta, values[buf].dims)
    if written:
        env[written[0]] = env[op.outputs[0]]


def _bind(value: Any, env: dict[str, Value]) -> Any:
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, (list, tuple)):
        return type(value)(_bind(v, env) for v in value)
    return value


def _by_schema(schema: torch.FunctionSchema, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments by schema name, with the schema's defaults for those not given."""
    named = {}
    for position, argument in enumerate(schema.arguments):
        if position < len(args) and not argument.kwarg_only:
            named[argument.name] = args[position]
        elif argument.name in kwargs:
            named[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            named[argument.name] = argument.default_value
        else:
            named[argument.name] = None
    return named


def _rename(g: GraphBuilder, start: int, name: str, buf: str) -> str:
    """Give the value a rule made for `buf` the buffer's own name (values that alias an earlier one keep
    theirs): readable graphs whose value names are the plan's buffer names."""
    new_nodes = g.nodes[start:]
    if not any(name in node.output for node in new_nodes):
        return name
    for node in new_nodes:
        for field in (node.input, node.output):
            for i, existing in enumerate(field):
                if existing == name:
                    field[i] = buf
    return buf


def _in_place_targets(plan: Plan) -> dict[int, list[str]]:
    """Op index -> the buffers an in-place op (`add_`, `dsv4c::compress_step_`) writes. ONNX is functional, so
    each write becomes a new value; refused when an old one could still be observed (read later, a view of it
    read later, or a graph input or constant other than a `state.*` input, which the step updates and returns as
    its new state)."""
    last_read = {}
    for index, op in enumerate(plan.ops):
        for name in op.refs():
            last_read[name] = index
    producer = {o: i for i, op in enumerate(plan.ops) for o in op.outputs if o}
    targets = {}
    for index, op in enumerate(plan.ops):
        _, base, _ = parse_op_name(op.op)
        if not base.endswith("_") or base.startswith("__") or not op.args or not isinstance(op.args[0], Ref):
            continue
        written = _written_arguments(op)
        if not all(isinstance(a, Ref) for a in written):
            raise NotExpressible(f"op {index} ({op.op}) writes an argument that is not a buffer")
        for target in (a.name for a in written):
            views = [o for i, prior in enumerate(plan.ops[:index]) if target in prior.refs() and _is_view(prior)
                     for o in prior.outputs if o]
            observed = last_read.get(target, -1) > index or any(last_read.get(v, -1) > index for v in views)
            state_input = target.startswith("state.") and target in plan.input_names  # a step's own state update
            fresh = target in producer and not _is_view(plan.ops[producer[target]])
            if observed or not (fresh or state_input):
                raise NotExpressible(f"op {index} ({op.op}) writes {target!r} in place, and the old value can "
                                     "still be observed; ONNX values are immutable")
        targets[index] = [a.name for a in written]
    return targets


def _written_arguments(op: PlanOp) -> list[Any]:
    """The arguments an in-place op writes (`Tensor(a!)` in its schema; the first for an aten `name_` op), in
    schema order."""
    schema = resolve_op(op.op)._schema
    named = _by_schema(schema, op.args, op.kwargs)
    written = [named[a.name] for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    return written or [op.args[0]]


def _is_view(op: PlanOp) -> bool:
    """Whether the op may return a view of an argument (an in-place op's result is its own write)."""
    if op.op.startswith("operator::"):
        return False
    returns = resolve_op(op.op)._schema.returns
    return any(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _outputs(g: GraphBuilder, plan: Plan, env: dict[str, Value]) -> tuple[list[str], list[onnx.ValueInfoProto]]:
    """Graph outputs by the plan's output names (`new_state.*` where the name is an input's); a value
    already called so is the output itself, others go through an Identity."""
    inputs = set(plan.input_names)
    names, infos = [], []
    for out_name, buf in plan.outputs:
        value = env[buf]
        wanted = out_name if out_name not in inputs else (
            f"new_{out_name}" if out_name.startswith("state.") else f"{out_name}.out")
        name = wanted
        if value.name != wanted or wanted in names:
            name = wanted if g.claim(wanted) else g.fresh(wanted)
            g.add("Identity", [value.name], [name])
        names.append(name)
        infos.append(_value_info(name, value))
    return names, infos


def _value_info(name: str, value: Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(value.dtype, f"{name}: "), list(value.dims))
