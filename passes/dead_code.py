"""Dead code elimination: drop calls whose results nobody reads, and constant buffers nobody fetches.

Pattern: a `call_function` node with no users that has no side effect, or a `get_attr` node with no users;
then every tensor attribute of the GraphModule that no `get_attr` names any more.
Side effects: assertion ops and the other targets fx calls side-effectful are kept. A mutating op
(`add_`, `index_put_`, ...) is kept unless the buffer it writes is a fresh intermediate (not an input, a
constant or an output) that nothing reads after the write - then the write is unobservable.
Placeholders and the output are never removed: the input list is part of the capture contract.

Before: any flat aten graph. Where: after noop_removal (which orphans the nodes asserts and casts kept
alive), again after constant_folding (which orphans the folded subgraphs); it is cheap and idempotent.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, mutated_args, side_effect_targets, storage_root


def dead_code(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Remove dead nodes (latest first, so whole dead chains go in one sweep) and unused buffers."""
    before = count_nodes(gm)
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    roots = {n: storage_root(n) for n in graph.nodes}
    removed = 0
    for node in reversed(list(graph.nodes)):
        if not node.users and _removable(node, order, roots):
            graph.erase_node(node)
            removed += 1
    buffers = remove_unused_attributes(gm)
    gm.recompile()
    return gm, make_record("dead_code", before, gm, removed + len(buffers),
                           f"removed {removed} dead nodes and {len(buffers)} unused buffers")


def _removable(node: fx.Node, order: dict[fx.Node, int], roots: dict[fx.Node, fx.Node]) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or node.target in side_effect_targets():
        return False
    return all(_unobservable_write(node, arg, order, roots) for arg in mutated_args(node))


def _unobservable_write(node: fx.Node, arg: fx.Node, order: dict[fx.Node, int],
                        roots: dict[fx.Node, fx.Node]) -> bool:
    """Writing into `arg` is invisible if its storage is a fresh intermediate nobody reads afterwards."""
    root = roots.get(arg, storage_root(arg))
    if root.op != "call_function":
        return False
    family = [n for n, r in roots.items() if r is root]
    return all(user is node or (user.op != "output" and order[user] < order[node])
               for member in family for user in member.users)


def remove_unused_attributes(gm: fx.GraphModule) -> list[str]:
    """Delete tensor attributes (buffers, parameters, plain tensors) no `get_attr` node fetches."""
    fetched = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [name for name, _ in list(gm.named_buffers(recurse=False)) + list(gm.named_parameters(recurse=False))]
    names += [name for name, value in vars(gm).items() if isinstance(value, torch.Tensor)]
    unused = sorted({name for name in names if name not in fetched})
    for name in unused:
        delattr(gm, name)
    return unused
