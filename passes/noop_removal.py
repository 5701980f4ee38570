"""No-op removal: metadata asserts, and casts / copies / views whose result is their input unchanged.

Patterns (on FakeTensor `meta["val"]`):
- `aten._assert_tensor_metadata(x, dtype=.., ...)`: export's record of a `.to()` check, true by construction
  of the captured graph (~700 in the tiny step) -> erased.
- `to.dtype`, `to.dtype_layout`, `to.device`, `_to_copy`, `clone`, `contiguous`, `lift_fresh_copy`,
  `expand`, `view`, `reshape`, `_unsafe_view`, `alias`, `detach`, `detach_` whose output has exactly the
  input's dtype, layout, device, shape and strides (sizes compared as sympy expressions) -> uses of the
  output become uses of the input.
A copy (`clone`, `_to_copy`, `to(copy=True)`, `lift_fresh_copy`) is removed only when neither its input's
storage nor its own is written by any mutating op and it is not a graph output: otherwise the copy is what
keeps the two apart.

Before: nodes carry `meta["val"]` (capture or shape_propagation). Where: first, so that CSE keys are not
split by redundant casts and dead_code can then drop what the asserts kept alive.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, mutated_roots, same_metadata, storage_root, tensor_val

aten = torch.ops.aten

ASSERTS = frozenset({aten._assert_tensor_metadata.default})
ALIASING_NOOPS = frozenset({
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.contiguous.default, aten.expand.default,
    aten.view.default, aten.reshape.default, aten.alias.default, aten.detach.default, aten.detach_.default,
})
COPYING_NOOPS = frozenset({aten.clone.default, aten._to_copy.default, aten.lift_fresh_copy.default,
                           aten._unsafe_view.default})


def noop_removal(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Erase metadata asserts and forward no-op casts, copies and views to their input."""
    before = count_nodes(gm)
    graph = gm.graph
    written = mutated_roots(graph)
    asserts = noops = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in ASSERTS:
            graph.erase_node(node)
            asserts += 1
        elif is_noop(node, written):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            noops += 1
    gm.recompile()
    return gm, make_record("noop_removal", before, gm, asserts + noops,
                           f"erased {asserts} metadata asserts and {noops} no-op casts/copies/views",
                           asserts=asserts, noops=noops)


def is_noop(node: fx.Node, written: set[fx.Node]) -> bool:
    """The node returns its first argument's value with identical metadata (and removing it is safe)."""
    if node.op != "call_function" or node.target not in ALIASING_NOOPS | COPYING_NOOPS:
        return False
    source = node.args[0] if node.args else None
    out, inp = tensor_val(node), tensor_val(source)
    if out is None or inp is None or not same_metadata(out, inp):
        return False
    if node.target in COPYING_NOOPS or node.kwargs.get("copy", False) or _positional_copy(node):
        outputs = any(user.op == "output" for user in node.users)
        return not outputs and storage_root(source) not in written and node not in written
    return True


def _positional_copy(node: fx.Node) -> bool:
    """`to.dtype(x, dtype, non_blocking, copy)`: the copy flag may also come positionally."""
    schema = node.target._schema
    names = [a.name for a in schema.arguments]
    if "copy" not in names:
        return False
    index = names.index("copy")
    return index < len(node.args) and bool(node.args[index])
