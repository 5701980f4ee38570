"""bf16-weight linears: fp32 product of upcasts (+ cast) -> one `dsv4c::bf16_linear` that reads the weight as bf16.

Pattern (model/layers.py `linear`, the LM head of model/step.py, the compressor and indexer projections of
model/attention.py, on weights released in bf16, which the captured graph widens to fp32 every step):
    y   = a @ W.to(float32).T          # matmul, linear, or view(mm(view)) pieces; W bfloat16 [N, K]
    out = y.to(bfloat16)               # the final cast, when y's only reader
  becomes
    out = dsv4c::bf16_linear(x, W, out_dtype)   # out_dtype bf16, or fp32 without the cast
where x is the bf16 value that `a` upcasts exactly, or `a` itself (fp32) otherwise; the op widens x again.
Exact: the op's value is `(x.float() @ W.float().T).to(out_dtype)`, the graph's own math, and on CPU its
reference computes it with the same aten matmul (bit-equal); its Triton kernel (codegen/bf16_linear.py) sums
the same exact products in another order. What is looked through: upcasts to fp32 (lossless) of x and of W,
and the views around an mm. W is any 2-D bf16 node: a weight input, or a value computed in the step (a decoded
FP8 weight rounded to bf16 that fp8_linear, which runs first, left). Left alone: a weight that is not the exact
upcast of a 2-D bf16 tensor (fp16, fp32, a batched operand), a weight not transposed, a product not in fp32, a
cast of the product to another dtype than bf16 (the product is matched, the cast stays). A weight upcast that
other nodes still read stays for them; the rest is erased.

Before: a flat aten graph with FakeTensor `meta["val"]`, after cse (one upcast per weight). Where: after the
fusions whose patterns may hold these products (fp8_linear; moe_fp4, whose op reads the router's bf16 weight
itself; lightning_indexer and compressor_fusion, whose ops take the projections' fp32 outputs), before
norm_rope_fusion, constant_folding and shape_propagation (which gives the new nodes their sympy shapes).

On the captured tiny step (faithful numerics), the LM head (4 nodes -> 1):
    matmul(to(hc_head(...), f32), numpy_T(to(head.weight, f32)))
  becomes
    bf16_linear(hc_head(...), head.weight, f32)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.fx as fx

from dsv4c.codegen.bf16_linear import check_operands
from dsv4c.passes.fp8_linear import product_nodes
from dsv4c.passes.graph_match import (CASTS, cast_input, dtype, erase_dead_ancestors, is_call, is_topological, linear,
                                      linear_product, operands_fit, rank, replace_with_op, stable_toposort,
                                      upcast_source)
from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, tensor_val
from dsv4c.passes.shape_propagation import nodes_without_val, refresh_fake_values

dsv4c = torch.ops.dsv4c


class Bf16Linear(NamedTuple):
    """One match: `output` (the final cast, or the fp32 product) becomes `bf16_linear(*args)`."""

    output: fx.Node
    product_nodes: tuple[fx.Node, ...]  # the matmul (and the view around an mm) it replaces
    args: tuple  # (x, weight, out_dtype)


def bf16_weight(operand: Any) -> fx.Node | None:
    """The bf16 [N, K] tensor that the fp32 weight operand upcasts exactly, else None."""
    source = upcast_source(operand)
    return source if dtype(source) == torch.bfloat16 and rank(source) == 2 else None


def activation(operand: Any) -> fx.Node:
    """x for the op: the bf16 value the fp32 operand upcasts exactly, else the operand itself."""
    source = upcast_source(operand)
    return source if dtype(source) == torch.bfloat16 else operand


def fits(x: fx.Node, weight: fx.Node, out_dtype: torch.dtype) -> bool:
    """The op accepts these operands (the same check its fake function makes)."""
    return operands_fit(check_operands, (tensor_val(x), tensor_val(weight)), out_dtype)


def match(node: fx.Node) -> Bf16Linear | None:
    """node as the output of a bf16-weight linear: a bf16 cast of its fp32 product (the product's only
    reader), or the fp32 product itself."""
    product = linear_product(node)
    if product is None:
        return None
    operands = linear(product)
    weight = bf16_weight(operands[1]) if operands is not None else None
    if weight is None:
        return None
    x = activation(operands[0])
    if not fits(x, weight, dtype(node)):
        return None
    return Bf16Linear(node, product_nodes(product), (x, weight, dtype(node)))


def find_bf16_linears(graph: fx.Graph) -> list[Bf16Linear]:
    """Every bf16-weight linear, in graph order; a product inside a match (under its cast or view) is not
    matched again."""
    found, inside = [], set()
    for node in reversed(graph.nodes):
        if node.op != "call_function" or node in inside:
            continue
        fused = match(node)
        if fused is not None:
            found.append(fused)
            inside.update(fused.product_nodes)
    return found[::-1]


def widened_weights(graph: fx.Graph) -> int:
    """Upcasts of 2-D bf16 inputs (placeholders, buffers) to fp32 left in the graph: per-step weight copies."""
    return sum(1 for n in graph.nodes if is_call(n, CASTS) and dtype(n) == torch.float32
               and cast_input(n) is not None and n.args[0].op in ("placeholder", "get_attr")
               and dtype(n.args[0]) == torch.bfloat16 and rank(n.args[0]) == 2)


# ---- the pass ------------------------------------------------------------------------------------------
def bf16_linear(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Replace every bf16-weight linear by `dsv4c::bf16_linear`; erase the weight upcasts only it read."""
    before = count_nodes(gm)
    if nodes_without_val(gm):  # dtypes and sizes are read from meta["val"]
        refresh_fake_values(gm)
    found = find_bf16_linears(gm.graph)
    bf16_x = sum(dtype(f.args[0]) == torch.bfloat16 for f in found)
    if found:
        _rewrite(gm.graph, found)
        gm.recompile()
    widened = widened_weights(gm.graph)
    description = (f"fused {len(found)} bf16-weight linears ({bf16_x} on bf16 activations); "
                   f"{widened} bf16 weights still widened to fp32 for other readers")
    return gm, make_record("bf16_linear", before, gm, len(found), description, bf16_x=bf16_x,
                           fp32_x=len(found) - bf16_x, widened_left=widened)


def _rewrite(graph: fx.Graph, found: list[Bf16Linear]) -> None:
    """Each match in graph order, its x the new op of an earlier match where it was that match's output."""
    replaced: dict[fx.Node, fx.Node] = {}
    for fused in found:
        x, weight, out_dtype = fused.args
        args = (replaced.get(x, x), replaced.get(weight, weight), out_dtype)
        (new,) = replace_with_op(graph, dsv4c.bf16_linear.default, args, (fused.output,))
        replaced[fused.output] = new
    erase_dead_ancestors(graph, replaced)
    if not is_topological(graph):
        stable_toposort(graph)
