"""Grouped FP8 linears: G `dsv4c::fp8_linear` calls on the groups of one activation and the row blocks of one
packed weight, concatenated -> one `dsv4c::fp8_grouped_linear` (one GEMM launch over the whole weight).

Pattern (model/attention.py's grouped output projection `wo_a` once fp8_linear has fused each group's linear),
for g = 0 .. G-1, every group once and in order, G >= 2:
    part_g = dsv4c::fp8_linear(select(X, -2, g), slice(W, 0, g*N, (g+1)*N),
                               slice(S, 0, g*N // 128, ceil((g+1)*N / 128)), act_quant, out_dtype)
    out    = cat([part_0, ..., part_{G-1}], -1)
  becomes
    out    = dsv4c::fp8_grouped_linear(X, W, S, act_quant, out_dtype)
where X [..., G, K] is one node (its dim -2 has exactly G groups), W [G*N, K] and S [ceil(G*N/128), ...] are
the whole packed weight and scales (each part's slices its rows, in order), N is a multiple of 128 (Flash: 1024)
or a divisor of 128 of at least 16 (tiny: 64), so no group straddles a scale block boundary (as fp8_linear's
row slices), every part has the same act_quant and out_dtype and the cat is each part's only reader.
Exact: the op's reference is fp8_linear's reference on the same views, group by group, concatenated.
Left alone: a missing, repeated or out-of-order group, parts with different act_quant or dtype, a row slice
that is not the group's (N not a multiple of 128, a gap, a weight with rows beyond the groups), a part that
another node also reads, a cat along another dim.

Before: a flat aten graph with FakeTensor `meta["val"]`, after fp8_linear (which makes the parts and their
row slices of the packed weight). Where: right after fp8_linear, before folding and shape_propagation (which
gives the new node its sympy shapes). What only the replaced nodes read (the parts, the selects, the slices)
is erased here.

On the captured tiny step (G = 2, N = 64), one grouped projection a layer (5 nodes -> 1):
    cat([fp8_linear(select(X, 2, 0), slice(W, 0, 0, 64), slice(S, 0, 0, 1), False, bf16),
         fp8_linear(select(X, 2, 1), slice(W, 0, 64, 128), slice(S, 0, 0, 1), False, bf16)], -1)
    becomes   fp8_grouped_linear(X, W, S, False, bf16)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.fx as fx

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops this pass reads and writes)
from dsv4c.codegen.fp8_operands import check_grouped_operands, fits_scale_blocks, group_scale_rows
from dsv4c.passes.graph_match import (arg, dim, erase_dead_ancestors, is_, operands_fit, rank, replace_with_op,
                                      span, static_size)
from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, tensor_val
from dsv4c.passes.shape_propagation import nodes_without_val, refresh_fake_values

aten = torch.ops.aten
dsv4c = torch.ops.dsv4c


class GroupPart(NamedTuple):
    """One part: `fp8_linear(select(x, -2, group), weight[rows], scale[scale_rows], act_quant, out_dtype)`."""

    x: fx.Node
    group: int
    weight: fx.Node
    rows: tuple[int, int]
    scale: fx.Node
    scale_rows: tuple[int, int]
    act_quant: bool
    out_dtype: torch.dtype

    def shared(self) -> tuple:
        """What every part of one grouped linear has in common."""
        return self.x, self.weight, self.scale, self.act_quant, self.out_dtype


class GroupedLinear(NamedTuple):
    """One match: `cat` becomes `fp8_grouped_linear(*args)`."""

    cat: fx.Node
    args: tuple  # (x, weight, scale, act_quant, out_dtype)


# ---- the pieces ------------------------------------------------------------------------------------------
def selected_group(node: Any) -> tuple[fx.Node, int] | None:
    """(X, g) of `select(X, -2, g)` with a literal index (a negative one counted from the end)."""
    if not is_(node, aten.select.int) or dim(node.args[0], arg(node, 1, "dim")) != -2:
        return None
    index, size = arg(node, 2, "index"), static_size(node.args[0], -2)
    if not isinstance(index, int) or size is None or not -size <= index < size:
        return None
    return node.args[0], index % size


def row_slice(node: Any) -> tuple[fx.Node, tuple[int, int]] | None:
    """(T, (start, stop)) of a unit-step slice of T's rows (dim 0) with literal bounds."""
    if not is_(node, aten.slice.Tensor) or arg(node, 4, "step", 1) != 1:
        return None
    source = node.args[0]
    if dim(source, arg(node, 1, "dim", 0)) != -rank(source):
        return None
    bounds = span(arg(node, 2, "start"), arg(node, 3, "end"), static_size(source, 0))
    return (source, bounds) if bounds is not None else None


def group_part(node: Any) -> GroupPart | None:
    """node as one group's `fp8_linear` on a selected group and row slices, read by one node only."""
    if not is_(node, dsv4c.fp8_linear.default) or len(node.users) != 1 or len(node.args) != 5:
        return None
    x, weight, scale, act_quant, out_dtype = node.args
    group, weight_rows, scale_rows = selected_group(x), row_slice(weight), row_slice(scale)
    if group is None or weight_rows is None or scale_rows is None:
        return None
    return GroupPart(group[0], group[1], weight_rows[0], weight_rows[1], scale_rows[0], scale_rows[1], act_quant,
                     out_dtype)


def in_order(parts: list[GroupPart]) -> bool:
    """Part g is group g and takes rows [g*N, (g+1)*N) of the weight (N whole 128-row scale blocks, or inside
    one: `fits_scale_blocks`) and the scale rows those read; the groups cover the weight, the scales and X's
    dim -2 exactly."""
    groups, first = len(parts), parts[0]
    rows = first.rows[1] - first.rows[0]
    if not fits_scale_blocks(rows) or static_size(first.x, -2) != groups:
        return False
    if static_size(first.weight, 0) != groups * rows or \
            static_size(first.scale, 0) != group_scale_rows(groups - 1, rows)[1]:
        return False
    return all(p.group == g and p.rows == (g * rows, (g + 1) * rows) and p.scale_rows == group_scale_rows(g, rows)
               for g, p in enumerate(parts))


def match(node: fx.Node) -> GroupedLinear | None:
    """node as the cat, along the last dim, of the G >= 2 parts of one grouped FP8 linear."""
    if not is_(node, aten.cat.default) or dim(node, arg(node, 1, "dim", 0)) != -1:
        return None
    inputs = node.args[0]
    parts = [group_part(n) for n in inputs]
    if len(parts) < 2 or any(p is None for p in parts) or len(set(inputs)) != len(inputs):
        return None
    if any(p.shared() != parts[0].shared() for p in parts) or not in_order(parts):
        return None
    x, weight, scale, act_quant, out_dtype = parts[0].shared()
    if not operands_fit(check_grouped_operands, [tensor_val(n) for n in (x, weight, scale)], out_dtype):
        return None
    return GroupedLinear(node, parts[0].shared())


def find_grouped_linears(graph: fx.Graph) -> list[GroupedLinear]:
    """Every grouped FP8 linear, in graph order."""
    return [found for found in map(match, graph.nodes) if found is not None]


# ---- the pass ------------------------------------------------------------------------------------------
def fp8_grouped_linear(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Replace every grouped FP8 linear by one `dsv4c::fp8_grouped_linear`; erase the parts it replaces."""
    before = count_nodes(gm)
    if nodes_without_val(gm):  # sizes and dtypes are read from meta["val"]
        refresh_fake_values(gm)
    found = find_grouped_linears(gm.graph)
    groups = [static_size(f.args[0], -2) for f in found]
    for fused in found:
        replace_with_op(gm.graph, dsv4c.fp8_grouped_linear.default, fused.args, (fused.cat,))
        erase_dead_ancestors(gm.graph, [fused.cat])
    if found:
        gm.recompile()
    description = f"fused {len(found)} grouped FP8 linears ({sum(groups)} fp8_linear calls)"
    return gm, make_record("fp8_grouped_linear", before, gm, len(found), description, linears=sum(groups))
