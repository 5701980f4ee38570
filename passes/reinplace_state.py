"""Reinplace state: a step writes only the cache slots it fills, into the state buffers it was given.

Pattern: a graph output named `state.<name>` computed by `aten.scatter.src(P, dim, index, src)` where `P` is a
placeholder (the step's state input). The model expresses every state update this way (model/attention.py:
tokens into ring slots, completed entries into cache rows), so the new state is the old one with some slots
replaced. The pass turns that scatter into `aten.scatter_.src` on `P`: the step then updates its state input in
place and returns it, and no step ever copies a cache.

It is safe when nothing reads the old value after the write: every other reader of `P` (directly or through a
view of it) comes before the scatter in graph order, no other output is `P` or a view of it, and no other write
targets `P`. A scatter that fails any of these stays functional (a near miss, counted in the record's details).
The contract for callers changes accordingly: after a call, each reinplaced state input holds the new state,
and the `state.<name>` output is that same tensor.

Before: cleanup and CSE (one node per value), and every pass that rewrites the state's readers (mhc fusion).
Where: after the rewrites, before shape propagation and memory planning (which see the in-place op as an alias).
Graphs without output names (the torch.compile backend's) are left alone.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import alias_source, count_nodes, mutated_args

aten = torch.ops.aten
STATE_PREFIX = "state."
FUNCTIONAL_WRITES = {aten.scatter.src: aten.scatter_.src}


def reinplace_state(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    before = count_nodes(gm)
    names = ctx.output_names
    if names is None:
        return gm, make_record("reinplace_state", before, gm, 0, "no output names: not a captured step")
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = list(output.args[0])
    order = {node: i for i, node in enumerate(graph.nodes)}
    matched, refused = [], []
    for name, node in zip(names, values):
        if not name.startswith(STATE_PREFIX) or not _is_state_write(node):
            continue
        if _safe_in_place(node, values, order):
            matched.append(name)
            _make_in_place(graph, node)
        else:
            refused.append(name)
    gm.recompile()
    description = f"{len(matched)} state updates written in place" + (
        f"; {len(refused)} left functional (the old value is read after the write)" if refused else "")
    return gm, make_record("reinplace_state", before, gm, len(matched), description, in_place=matched,
                           left_functional=refused)


def _is_state_write(node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in FUNCTIONAL_WRITES
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder")


def _aliases_of(root: fx.Node) -> set[fx.Node]:
    """`root` and every node that may share its storage (views, may-alias ops, in-place results)."""
    found, frontier = {root}, [root]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user not in found and alias_source(user) is node:
                found.add(user)
                frontier.append(user)
    return found


def _safe_in_place(write: fx.Node, outputs: list, order: dict[fx.Node, int]) -> bool:
    state = write.args[0]
    aliases = _aliases_of(state)
    readers = {user for alias in aliases for user in alias.users} - aliases - {write}
    output_node = next(iter(n for n in readers if n.op == "output"), None)
    readers.discard(output_node)
    if any(order[r] > order[write] for r in readers):
        return False
    if any(isinstance(v, fx.Node) and v in aliases for v in outputs):
        return False
    other_writes = [n for n in order if n is not write and any(a in aliases for a in mutated_args(n))]
    return not other_writes


def _make_in_place(graph: fx.Graph, write: fx.Node) -> None:
    with graph.inserting_before(write):
        in_place = graph.call_function(FUNCTIONAL_WRITES[write.target], write.args, write.kwargs)
    in_place.meta = dict(write.meta)
    write.replace_all_uses_with(in_place)
    graph.erase_node(write)
