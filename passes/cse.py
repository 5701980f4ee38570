"""Common subexpression elimination: one node per pure computation.

Pattern: two `call_function` nodes with the same target, the same arguments (nodes by identity, literals by
type and value, -0.0 apart from 0.0) and the same kwargs; the later one's uses move to the earlier one.
Only pure calls merge: aten ops that neither mutate, assert nor draw random numbers, `getitem`, SymInt
arithmetic. A node is also left alone when its storage or any argument's storage is written by some
mutating op: the same call could then read different values, or two results that must stay apart (a fresh
buffer later written in place) would become one.

Before: a flat aten graph; no metadata needed. Where: after noop_removal and dead_code (fewer, cleaner
nodes, so duplicates that differed only by a no-op cast now match) and before constant_folding (each
duplicated table is then folded once).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, is_pure, mutated_roots, storage_root


def cse(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Merge pure duplicates in one forward sweep (merged getitems of merged tuples follow naturally)."""
    before = count_nodes(gm)
    graph = gm.graph
    written = mutated_roots(graph)
    seen: dict[Any, fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if not _candidate(node, written):
            continue
        key = (node.target, _key(node.args), _key(node.kwargs))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            merged += 1
    gm.recompile()
    return gm, make_record("cse", before, gm, merged, f"merged {merged} duplicate pure nodes")


def _candidate(node: fx.Node, written: set[fx.Node]) -> bool:
    if node.op != "call_function" or not is_pure(node):
        return False
    if storage_root(node) in written:
        return False
    return all(storage_root(arg) not in written for arg in node.all_input_nodes)


def _key(value: Any) -> Any:
    """A hashable, exact rendering of an argument: nodes by identity, floats by bit-exact repr."""
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__ in ("list", "immutable_list"), tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, bool) or value is None:
        return ("lit", type(value).__name__, value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format, str)):
        return ("lit", type(value).__name__, str(value))
    return ("obj", type(value).__name__, repr(value))
