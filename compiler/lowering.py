"""Lower a captured (or pass-transformed) flat fx graph to a runtime `Plan`.

This is the only place that reads torch.fx for the runtime: the runtime executes the `Plan` data and
never imports this module. The graph must follow the capture contract (compiler/capture.py): placeholders
are the named inputs in `input_names` order, constants are `get_attr` tensors, the output is a flat tuple
in `output_names` order, and every placeholder carries `meta["val"]` with at most one symbolic size (the
batch, written "B" in the plan).

Every `call_function` must target a registered op overload (`torch.ops.<ns>.<name>.<overload>` with ns
in aten, prims, dsv4c) or a whitelisted Python operator (SymInt arithmetic); a call to any other Python
callable is refused with the node named, so a plan never has a Python-only hole. `operator.getitem` on a
multi-output op is folded into that op's output list; on a list result it stays an `operator::getitem` op.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx

from dsv4c.runtime.plan import (BATCH, OP_NAMESPACES, OPERATORS, Plan, PlanError, PlanInput, PlanOp, Ref,
                                encode_value, validate)

CONSTANT_PREFIX = "constants."
_OPERATOR_NAMES = {fn: name for name, fn in OPERATORS.items()}


def plan_from_graph(gm: torch.fx.GraphModule, input_names: Sequence[str], output_names: Sequence[str]) -> Plan:
    """The plan that computes `gm(*inputs)` with the same ops in the same order.

    Buffer names are the fx node names, except placeholders, which are named by `input_names`.
    Raises `PlanError` naming the node for anything the runtime could not execute.
    """
    nodes = list(gm.graph.nodes)
    name_of: dict[torch.fx.Node, str] = {}
    inputs = _inputs(nodes, list(input_names), name_of)
    constants = _constants(gm, nodes, name_of)
    slots = _multi_output_slots(nodes, name_of)
    ops = []
    for node in nodes:
        if node.op in ("call_method", "call_module"):
            raise PlanError(f"node {node.name}: {node.op} {node.target!r} is not allowed; lower it to an op")
        if node.op == "call_function" and not _is_folded_getitem(node):
            ops.append(_lower_call(node, name_of, slots))
    outputs = _outputs(nodes, list(output_names), name_of)
    plan = Plan(tuple(inputs), constants, tuple(_with_free_lists(ops, outputs)), tuple(outputs))
    validate(plan, "graph")
    return plan


def graph_constants(gm: torch.fx.GraphModule, plan: Plan) -> dict[str, torch.Tensor]:
    """Weight key -> tensor for every constant of `plan` (the `get_attr` buffers of `gm`)."""
    out = {}
    for key in set(plan.constants.values()):
        target = key[len(CONSTANT_PREFIX):]
        out[key] = _attribute(gm, target, f"constant {key!r}").detach()
    return out


def op_name(target: Any) -> str | None:
    """The plan name of a call target (`aten::add.Tensor`, `operator::mul`), or None if it has none."""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace not in OP_NAMESPACES:
            return None
        return f"{target._schema.name}.{target._overloadname}"
    try:
        return f"operator::{_OPERATOR_NAMES[target]}"
    except (KeyError, TypeError):  # not whitelisted, or unhashable
        return None


def _inputs(nodes: list[torch.fx.Node], input_names: list[str], name_of: dict) -> list[PlanInput]:
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != len(input_names):
        raise PlanError(f"graph has {len(placeholders)} placeholders but {len(input_names)} input names")
    symbols: set[Any] = set()
    specs = []
    for node, name in zip(placeholders, input_names):
        name_of[node] = name
        specs.append(_input_spec(node, name, symbols))
    return specs


def _input_spec(node: torch.fx.Node, name: str, symbols: set[Any]) -> PlanInput:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise PlanError(f"input {name!r} (node {node.name}): needs a tensor meta['val'] for its shape and dtype")
    shape: list[int | str] = []
    for dim in value.shape:
        if isinstance(dim, int):
            shape.append(dim)
            continue
        expr = dim.node.expr
        if not expr.is_Symbol:
            raise PlanError(f"input {name!r}: size {expr} is not a plain symbol; only the batch may be symbolic")
        symbols.add(expr)
        if len(symbols) > 1:
            raise PlanError(f"input {name!r}: a second symbolic size {expr}; only the batch may be symbolic")
        shape.append(BATCH)
    return PlanInput(name, tuple(shape), str(value.dtype).removeprefix("torch."))


def _constants(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], name_of: dict) -> dict[str, str]:
    constants = {}
    for node in nodes:
        if node.op == "get_attr":
            _attribute(gm, node.target, f"node {node.name}")
            name_of[node] = node.name
            constants[node.name] = CONSTANT_PREFIX + node.target
    return constants


def _attribute(gm: torch.fx.GraphModule, target: str, where: str) -> torch.Tensor:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    if not isinstance(value, torch.Tensor):
        raise PlanError(f"{where}: get_attr {target!r} is not a tensor of the graph module")
    return value


def _returns(target: Any) -> int:
    """How many values a call target returns (Python operators return one)."""
    if isinstance(target, torch._ops.OpOverload):
        return len(target._schema.returns)
    return 1


def _is_folded_getitem(node: torch.fx.Node) -> bool:
    if node.target is not operator.getitem or not isinstance(node.args[0], torch.fx.Node):
        return False
    source = node.args[0]
    return source.op == "call_function" and _returns(source.target) > 1


def _multi_output_slots(nodes: list[torch.fx.Node], name_of: dict) -> dict[torch.fx.Node, list[str | None]]:
    """For each multi-output op, the buffer name of each returned value (named after its getitem)."""
    slots: dict[torch.fx.Node, list[str | None]] = {}
    for node in nodes:
        if node.op != "call_function" or _returns(node.target) <= 1:
            continue
        names: list[str | None] = [None] * _returns(node.target)
        for user in node.users:
            if user.target is not operator.getitem or not isinstance(user.args[1], int):
                raise PlanError(f"node {user.name}: uses the tuple result of {node.name} other than by index")
            index = user.args[1]
            names[index] = names[index] or user.name
            name_of[user] = names[index]
        slots[node] = names
    return slots


def _lower_call(node: torch.fx.Node, name_of: dict, slots: dict) -> PlanOp:
    name = op_name(node.target)
    if name is None:
        what = getattr(node.target, "__qualname__", None) or repr(node.target)
        raise PlanError(f"node {node.name}: calls {what!r}, which is not a registered op in {OP_NAMESPACES} "
                        f"nor an allowed operator {sorted(OPERATORS)}; a plan cannot call Python functions")
    args = tuple(_lower_value(a, name_of, node) for a in node.args)
    kwargs = {k: _lower_value(v, name_of, node) for k, v in node.kwargs.items()}
    if node in slots:
        outputs: tuple[str | None, ...] = tuple(slots[node])
    elif _returns(node.target) == 0:
        outputs = ()
    else:
        outputs = (node.name,)
        name_of[node] = node.name
    return PlanOp(name, args, kwargs, outputs)


def _lower_value(value: Any, name_of: dict, node: torch.fx.Node) -> Any:
    if isinstance(value, torch.fx.Node):
        if value not in name_of:
            raise PlanError(f"node {node.name}: argument {value.name} has no value in the plan")
        return Ref(name_of[value])
    if isinstance(value, list):
        return [_lower_value(v, name_of, node) for v in value]
    if isinstance(value, tuple):
        return tuple(_lower_value(v, name_of, node) for v in value)
    encode_value(value, f"node {node.name}")  # refuse what the plan cannot store, naming the node
    return value


def _outputs(nodes: list[torch.fx.Node], output_names: list[str], name_of: dict) -> list[tuple[str, str]]:
    node = next(n for n in reversed(nodes) if n.op == "output")
    values = node.args[0]
    values = values if isinstance(values, (list, tuple)) else (values,)
    if len(values) != len(output_names):
        raise PlanError(f"graph returns {len(values)} values but {len(output_names)} output names")
    outputs = []
    for name, value in zip(output_names, values):
        if not isinstance(value, torch.fx.Node) or value not in name_of:
            raise PlanError(f"output {name!r}: {value!r} is not a buffer of the graph")
        outputs.append((name, name_of[value]))
    return outputs


def _with_free_lists(ops: list[PlanOp], outputs: list[tuple[str, str]]) -> list[PlanOp]:
    """Each op with `free` = buffers (not outputs) whose last use it is, or that it defines unused."""
    kept = {buf for _, buf in outputs}
    last: dict[str, int] = {}
    for index, op in enumerate(ops):
        for name in [*op.outputs, *op.refs()]:
            if name is not None:
                last[name] = index
    free: list[list[str]] = [[] for _ in ops]
    for name, index in last.items():
        if name not in kept:
            free[index].append(name)
    return [PlanOp(op.op, op.args, op.kwargs, op.outputs, tuple(f)) for op, f in zip(ops, free)]
