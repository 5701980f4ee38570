"""Facts about the ops of a captured graph that several passes ask: purity, mutation, aliasing, sizes.

Everything here reads an op's schema (`OpOverload._schema`) or a node's FakeTensor (`meta["val"]`), so it
holds for any aten graph, not only the captured step. Passes use it to stay correct around the few
mutating ops a captured graph has (`add_` chains on fresh buffers, `detach_` on lifted constants).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable

import sympy
import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops that change only autograd metadata: in an inference graph they neither mutate nor compute.
METADATA_ONLY = frozenset({aten.detach_.default, aten.detach.default})

# Ops whose schema says "may alias": they return their input when they can and copy otherwise, so only the
# FakeTensor storages tell which happened. Every other aliasing op is a view (or writes in place).
MAY_ALIAS_OR_COPY = frozenset({
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.reshape.default,
    aten.reshape_as.default, aten.flatten.using_ints, aten.contiguous.default,
})

# Plain Python / torch functions that export leaves in a graph to compute sizes (SymInt arithmetic).
SYM_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
    operator.pow, operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.and_, operator.or_, operator.not_, operator.abs,
    torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_float, torch.sym_int, torch.sym_ite,
    math.ceil, math.floor, math.trunc,
} | ({torch.sym_sum} if hasattr(torch, "sym_sum") else set()))

_EXTRA_SIDE_EFFECTS = frozenset({
    aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten._assert_async.default,
    aten._assert_async.msg, aten.sym_constrain_range.default, aten.sym_constrain_range_for_size.default,
})


def side_effect_targets() -> frozenset:
    """Targets fx itself treats as side-effecting, plus the assertion ops export emits."""
    from torch.fx import node as fx_node
    return _EXTRA_SIDE_EFFECTS | frozenset(getattr(fx_node, "_side_effectful_functions", ()))


def is_op(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def is_sym_op(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SYM_FUNCTIONS


def mutated_args(node: fx.Node) -> list[fx.Node]:
    """The node arguments an op writes into (schema `Tensor(a!)`); metadata-only ops write nothing."""
    if not is_op(node) or node.target in METADATA_ONLY:
        return []
    schema = node.target._schema
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        written.extend(v for v in _flat(value) if isinstance(v, fx.Node))
    return written


def alias_source(node: fx.Node) -> fx.Node | None:
    """The input whose storage the output may share: views, may-alias ops (`to`, `reshape`), in-place
    ops, and getitem of an aliasing multi-output op. None for fresh results."""
    if is_getitem(node):
        parent = node.args[0]
        return alias_source(parent) if isinstance(parent, fx.Node) else None
    if not is_op(node):
        return None
    schema = node.target._schema
    if not schema.returns or all(r.alias_info is None for r in schema.returns):
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, fx.Node):
                return value
    return None


def storage_root(node: fx.Node) -> fx.Node:
    """Follow `alias_source` back to the node that owns the storage (conservative: may-alias = alias)."""
    while (source := alias_source(node)) is not None:
        node = source
    return node


def mutated_roots(graph: fx.Graph) -> set[fx.Node]:
    """Storage owners written by some op anywhere in the graph."""
    return {storage_root(arg) for node in graph.nodes for arg in mutated_args(node)}


def is_random(node: fx.Node) -> bool:
    return is_op(node) and torch.Tag.nondeterministic_seeded in node.target.tags


def is_side_effecting(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in side_effect_targets() or bool(mutated_args(node)))


def is_pure(node: fx.Node) -> bool:
    """A call whose result depends only on its arguments and which changes nothing else."""
    if is_getitem(node) or is_sym_op(node):
        return True
    return is_op(node) and not is_random(node) and not is_side_effecting(node)


def tensor_val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def to_sympy(value: Any) -> sympy.Expr:
    """An int or SymInt as a sympy expression."""
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    return sympy.Integer(int(value))


def sym_tuple(values: Iterable[Any]) -> tuple[sympy.Expr, ...]:
    return tuple(to_sympy(v) for v in values)


def same_metadata(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, layout, device, shape and strides (symbolic sizes compared as expressions)."""
    return (a.dtype == b.dtype and a.layout == b.layout and a.device == b.device
            and sym_tuple(a.shape) == sym_tuple(b.shape) and sym_tuple(a.stride()) == sym_tuple(b.stride()))


def count_nodes(gm: fx.GraphModule) -> int:
    return len(gm.graph.nodes)


def erase_dead(graph: fx.Graph, nodes: Iterable[fx.Node]) -> int:
    """Erase the given nodes that have no users, latest first; returns how many went."""
    erased = 0
    for node in sorted(nodes, key=_position(graph), reverse=True):
        if not node.users:
            graph.erase_node(node)
            erased += 1
    return erased


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


def _flat(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flat(item)]
    return [value]


def graph_fake_mode(graph: fx.Graph) -> Any:
    """The FakeTensorMode of the first FakeTensor in the graph's `meta["val"]`s, or None."""
    for node in graph.nodes:
        mode = getattr(tensor_val(node), "fake_mode", None)
        if mode is not None:
            return mode
    return None
