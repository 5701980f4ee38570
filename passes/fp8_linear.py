"""FP8 linears: decode + (rounded) activation + fp32 matmul + cast -> one `dsv4c::fp8_linear` on the packed weight.

Pattern (model/layers.py `linear` on a weight that compiler/capture.py decodes in the graph), with
`a = dsv4c::fake_quant_fp8(x, 128)` (act_quant) or `a = x` (no activation rounding):
    W   = dsv4c::dequant_fp8_weight(w, s, float32 | bfloat16)      # [N, K], e4m3 w, e8m0 s
    y   = a.float() @ W.to(bf16 | fp32).float().T                 # matmul, linear, or view(mm(view)) pieces
    out = y.to(bfloat16)                                          # the final cast, when y's only reader
  becomes
    out = dsv4c::fp8_linear(x, w, s, act_quant, out_dtype)         # out_dtype bf16, or fp32 without the cast
What is looked through, and why it is exact (the op computes `fake_quant_rows(x) @ dequant(w, s).T` in fp32):
- upcasts to fp32 (lossless) of the activation and of the weight;
- a bf16 rounding of the decoded weight (capture casts every decoded weight to the activation dtype): an
  e4m3 value (4 significant bits) times a power-of-two scale is exact in bf16 for every scale >= 2^-124 (e8m0
  byte >= 3; quantize_fp8_weight's amax floor gives >= 2^-22). An fp16 rounding is not exact: no match;
- the rounding's own cast back to x's dtype (e4m3 times its scale, a power of two >= 2^-22 by the amax floor,
  is exact in bf16);
- a row slice of the decoded weight that starts on a 128-row scale block or lies inside one block (the
  grouped output projection: each group times its rows of `wo_a`, model/attention.py): the slice's row i
  has the scale of the source's row start + i, which is row i // 128 of the sliced scales, so the op reads
  the same rows of the packed weight and of its scales, as views.
The activation rounding is recognised only as the `dsv4c::fake_quant_fp8` node with block 128 that
model/layers.py emits (model/rounding_ops.py says why it is one node); any other activation, a rounding by
another block or a hand-written chain included, is x itself with act_quant False (the op then computes
exactly the graph's `x.float() @ W.T`). The operands must fit the op (its own `check_operands`): x fp32 or
bf16, w `float8_e4m3fn [N, K]`, s `[ceil(N/128), ceil(K/128)]` (a larger scale the decode would crop: no
match). Left alone: matmuls on any other weight (bf16, fp32, MXFP4 decodes), a weight not transposed, an
fp16 weight path, a row slice that starts inside one scale block and ends in another. A decode or rounding that other nodes still read stays for them; the rest is erased.

Before: a flat aten graph with FakeTensor `meta["val"]`; for the captured step, after noop_removal /
dead_code / cse (one node per value, so one decode per weight and one rounding per activation).
Where: after cse (and mhc_fusion), before constant_folding and shape_propagation (which gives the new nodes
their sympy shapes). What only the replaced nodes read (decodes, roundings, casts) is erased here.

On the captured tiny step (faithful numerics), one linear (~8 nodes -> 1):
    to(matmul(to(to(fake_quant_fp8(x, 128), bf16), f32), numpy_T(to(to(dequant_fp8_weight(w, s, f32), bf16),
    f32))), bf16)   becomes   fp8_linear(x, w, s, True, bf16)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.fx as fx

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops the captured graph calls)
from dsv4c.codegen.fp8_linear import check_operands
from dsv4c.model import rounding_ops  # noqa: F401  (registers dsv4c::fake_quant_fp8, which this pass reads)
from dsv4c.passes.graph_match import (VIEWS, arg, downcast_source, dtype, erase_dead_ancestors, is_, is_call,
                                      is_topological, linear, linear_product, operands_fit, replace_with_op, shape,
                                      stable_toposort, upcast_source)
from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, tensor_val
from dsv4c.passes.shape_propagation import nodes_without_val, refresh_fake_values

aten = torch.ops.aten
dsv4c = torch.ops.dsv4c
SCALE_BLOCK = 128  # rows of an FP8 weight one e8m0 scale covers
ACT_QUANT_BLOCK = 128  # the block model/layers.py rounds activations in before an FP8/FP4 weight
EXACT_WEIGHT_ROUNDINGS = (torch.float32, torch.bfloat16)  # dtypes a decoded FP8 weight passes through exactly


class Fp8Linear(NamedTuple):
    """One match: `output` (the final cast, or the fp32 product) becomes `fp8_linear(*args)`."""

    output: fx.Node
    product_nodes: tuple[fx.Node, ...]  # the matmul (and the view around an mm) it replaces
    args: tuple  # (x, weight, scale, act_quant, out_dtype)


class RowBlock(NamedTuple):
    """Rows [start, stop) of a packed weight whose scales are rows of its scales: the slice starts on a 128-row
    scale block, or lies inside one block. The grouped output projection multiplies each group by its own
    rows of `wo_a`."""

    weight: fx.Node
    scale: fx.Node
    start: int
    stop: int

    def scale_rows(self) -> tuple[int, int]:
        return self.start // SCALE_BLOCK, -(-self.stop // SCALE_BLOCK)


# ---- the pieces ------------------------------------------------------------------------------------------
def packed_weight(node: Any) -> tuple[fx.Node, fx.Node] | RowBlock | None:
    """(e4m3 weight, e8m0 scale) of `dequant_fp8_weight(w, s, f32 | bf16)`, read through exact casts; a
    `RowBlock` where the decoded weight is read through a row slice of whole scale blocks."""
    node = upcast_source(node)
    rows = _row_slice(node)
    if rows is not None:
        node = upcast_source(node.args[0])
    if dtype(node) == torch.bfloat16 and downcast_source(node) is not None:
        node = downcast_source(node)
    if not is_(node, dsv4c.dequant_fp8_weight.default) or arg(node, 2, "dtype") not in EXACT_WEIGHT_ROUNDINGS:
        return None
    if rows is None:
        return node.args[0], node.args[1]
    start, stop = rows
    if start % SCALE_BLOCK and start // SCALE_BLOCK != (stop - 1) // SCALE_BLOCK:
        return None
    return RowBlock(node.args[0], node.args[1], start, stop)


def _row_slice(node: Any) -> tuple[int, int] | None:
    """(start, stop) of `slice(t, 0, start, stop, 1)` with constant bounds, else None."""
    if not is_(node, aten.slice.Tensor) or arg(node, 1, "dim", 0) != 0 or arg(node, 4, "step", 1) != 1:
        return None
    start, stop, size = arg(node, 2, "start", 0), arg(node, 3, "end", None), shape(node.args[0])
    if not isinstance(start, int) or not isinstance(stop, int) or size is None or not size[0].is_Integer:
        return None
    return max(start, 0), min(stop, int(size[0]))


def activation(node: Any) -> tuple[fx.Node, bool]:
    """(x, act_quant) of the fp32 activation operand: x of a block-128 `fake_quant_fp8`, else the operand."""
    source = upcast_source(node)
    if is_(source, dsv4c.fake_quant_fp8.default) and arg(source, 1, "block") == ACT_QUANT_BLOCK:
        return source.args[0], True
    return source, False


def product_nodes(product: fx.Node) -> tuple[fx.Node, ...]:
    """The nodes that compute one `x @ W.T`: the op itself, or a view and the mm inside it."""
    if is_call(product, VIEWS):
        return product, product.args[0]
    return (product,)


def fits(x: fx.Node, weight: fx.Node | RowBlock, scale: fx.Node | None, out_dtype: torch.dtype) -> bool:
    """The op accepts these operands (the same check its fake function makes)."""
    if isinstance(weight, RowBlock):
        first, last = weight.scale_rows()
        vals = [tensor_val(x), _rows(tensor_val(weight.weight), weight.start, weight.stop),
                _rows(tensor_val(weight.scale), first, last)]
    else:
        vals = [tensor_val(n) for n in (x, weight, scale)]
    return operands_fit(check_operands, vals, out_dtype)


def match(node: fx.Node) -> Fp8Linear | None:
    """node as the output of an FP8 linear: a bf16 cast of its fp32 product (the product's only reader), or
    the fp32 product itself."""
    product = linear_product(node)
    if product is None:
        return None
    operands = linear(product)
    packed = packed_weight(operands[1]) if operands is not None else None
    if packed is None:
        return None
    x, act_quant = activation(operands[0])
    weight = packed if isinstance(packed, RowBlock) else packed[0]
    scale = None if isinstance(packed, RowBlock) else packed[1]
    if not fits(x, weight, scale, dtype(node)):
        return None
    return Fp8Linear(node, product_nodes(product), (x, weight, scale, act_quant, dtype(node)))


def _rows(val: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if val is None else val[start:stop]


def find_fp8_linears(graph: fx.Graph) -> list[Fp8Linear]:
    """Every FP8 linear, in graph order; a product inside a match (under its cast or view) is not matched again."""
    found, inside = [], set()
    for node in reversed(graph.nodes):
        if node.op != "call_function" or node in inside:
            continue
        fused = match(node)
        if fused is not None:
            found.append(fused)
            inside.update(fused.product_nodes)
    return found[::-1]


# ---- the pass ------------------------------------------------------------------------------------------
def fp8_linear(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Replace every FP8 linear by `dsv4c::fp8_linear` on its packed weight; erase what only it read."""
    before = count_nodes(gm)
    if nodes_without_val(gm):  # dtypes and sizes are read from meta["val"]
        refresh_fake_values(gm)
    found = find_fp8_linears(gm.graph)
    if found:
        _rewrite(gm.graph, found)
        gm.recompile()
    act_quant = sum(f.args[3] for f in found)
    decodes = sum(is_(n, dsv4c.dequant_fp8_weight.default) for n in gm.graph.nodes)
    description = (f"fused {len(found)} FP8 linears ({act_quant} with activation rounding); "
                   f"{decodes} FP8 decodes left for other readers")
    return gm, make_record("fp8_linear", before, gm, len(found), description, act_quant=act_quant,
                           plain=len(found) - act_quant, decodes_left=decodes)


def _rewrite(graph: fx.Graph, found: list[Fp8Linear]) -> None:
    """Each match in graph order, its x the new op of an earlier match where it was that match's output."""
    replaced: dict[fx.Node, fx.Node] = {}
    for fused in found:
        x, weight, scale, *rest = fused.args
        if isinstance(weight, RowBlock):
            weight, scale = _sliced(graph, weight)
        args = (replaced.get(x, x), weight, scale, *rest)
        (new,) = replace_with_op(graph, dsv4c.fp8_linear.default, args, (fused.output,))
        replaced[fused.output] = new
    erase_dead_ancestors(graph, replaced)
    if not is_topological(graph):
        stable_toposort(graph)


def _sliced(graph: fx.Graph, block: RowBlock) -> tuple[fx.Node, fx.Node]:
    """Row slices of the packed weight and of its scales (views: nothing is copied)."""
    first, last = block.scale_rows()
    nodes = []
    for source, start, stop in ((block.weight, block.start, block.stop), (block.scale, first, last)):
        with graph.inserting_after(source):
            node = graph.call_function(aten.slice.Tensor, (source, 0, start, stop))
        val = tensor_val(source)
        if val is not None:
            node.meta["val"] = val[start:stop]
        nodes.append(node)
    return nodes[0], nodes[1]
