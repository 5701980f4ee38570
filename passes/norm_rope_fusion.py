"""RMSNorm and RoPE fusion: model/layers.py's `rms_norm` and `apply_rope` chains -> one dsv4c op each, or one
`rms_norm_rope` where a norm feeds only a rope (the query and the KV row of every attention layer).

Patterns, read from the math in the graph (casts to fp32 are lossless; the ops upcast inside):
- norm: `out = (xf * rsqrt(mean(xf^2, -1, keepdim) + eps)) [* wf]`, cast to x's dtype where x is bf16, with
  xf = x.float() (x itself when fp32), wf an upcast of a rank-1 weight of x's width, eps a literal, the mean
  whole or `sum / D` (graph_match.rms_factor), commuted muls
  -> `dsv4c::rms_norm(x, w | None, eps)`.
- rope: `cat([x[..., :D-R], to(flatten(stack([e*c - o*s, e*s + o*c], -1), -2), x.dtype)], -1)` with
  r = x[..., D-R:].float(), e = r[..., 0::2], o = r[..., 1::2], c = cos(a), s = sin(a) or -sin(a) (inverse),
  a = unsqueeze(p.float(), -1) * inv_freq, inv_freq fp32 [R/2], commuted muls and add
  -> `dsv4c::rope(x, p, inv_freq, inverse)`: p is whatever node the angles cast (`start.unsqueeze(1) +
  arange(T)`, its unsqueeze for a query's heads, ...), which must broadcast into x's leading dims.
- a rope whose x is a matched norm's output that nothing else reads -> `dsv4c::rms_norm_rope(x, w, eps, p,
  inv_freq, inverse)`.
Each op's reference is the model's own function (codegen/rms_norm.py, codegen/rope.py), so the graph after this
pass equals the graph before it bit for bit on CPU. Left alone (near misses): an eps that is not a literal, a
mean over another dim or without keepdim, a weight that is not one value per column, halves that are not
interleaved pairs (slices of step 1, a stack on another dim), cos and sin of different angles, x neither bf16 nor
fp32, an odd D - R (the kernel pairs the whole row), positions that would broadcast x. A norm whose fp32 result is
cast to another dtype than x's is the fp32 norm of x.float(): that fuses, the cast stays.

Before: a flat aten graph with FakeTensor `meta["val"]`; for the captured step, after cleanup and every other
fusion (the compressor, indexer and attention passes match norms and ropes inside their own patterns and must see
them unfused). Where: just before constant_folding (which then folds each inv_freq table into a buffer). What only
the replaced nodes read (the angles, cos and sin no other rope reads) is erased here.

On the captured tiny step, one layer's query (~30 nodes -> 1):
    to(mul(to(q), rsqrt(add(mean(square(to(q)), [-1], True), 1e-6))), bf16) -> slice x2, to, slice x2 (step 2),
    cos/sin(mul(unsqueeze(to(unsqueeze(pos, -1)), -1), inv)), mul x4, sub, add, stack, flatten, to, cat
  becomes
    rms_norm_rope(q, None, 1e-6, unsqueeze(pos, -1), inv, False)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.fx as fx

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops this pass emits)
from dsv4c.codegen import rms_norm, rope
from dsv4c.passes.graph_match import (MUL, VIEWS, arg, cast_input, dim, downcast_source, dtype,
                                      erase_dead_ancestors, is_, is_call, is_topological, operands, rank,
                                      replace_with_op, rms_factor, same_sizes, shape, span, stable_toposort,
                                      static_size, upcast_source, value_of)
from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, tensor_val
from dsv4c.passes.shape_propagation import nodes_without_val, refresh_fake_values

aten = torch.ops.aten
dsv4c = torch.ops.dsv4c


class Norm(NamedTuple):
    """One RMSNorm: `output` (the cast to x's dtype, or the fp32 product) is `rms_norm(x, weight, eps)`."""

    output: fx.Node
    x: fx.Node
    weight: fx.Node | None
    eps: float
    products: tuple[fx.Node, ...]  # the muls inside it (not norm outputs themselves)


class Rope(NamedTuple):
    """One RoPE: `output` (the cat) is `apply_rope(x, positions, inv_freq, inverse)`; `reads` are the two column
    slices of x it reads."""

    output: fx.Node
    x: fx.Node
    positions: fx.Node
    inv_freq: fx.Node
    inverse: bool
    reads: tuple[fx.Node, fx.Node]


# ---- RMSNorm -----------------------------------------------------------------------------------------------
def _scaled(product: Any) -> tuple[fx.Node, float] | None:
    """(xf, eps) of `xf * rsqrt(mean(xf^2, -1, keepdim) + eps)`, muls commuted."""
    if not is_call(product, MUL):
        return None
    for xf, factor in operands(product):
        rms = rms_factor(factor)
        if rms is not None and rms[0] is xf and dtype(xf) == torch.float32:
            return xf, rms[1]
    return None


def _weighted(product: fx.Node) -> tuple[fx.Node, float, fx.Node, tuple[fx.Node, ...]] | None:
    """(xf, eps, weight, products) of `scaled * wf`, wf an fp32 upcast (or fp32 value) of rank 1."""
    for scaled, weight in operands(product):
        inner = _scaled(scaled)
        if inner is not None and dtype(weight) == torch.float32 and rank(upcast_source(weight)) == 1:
            return *inner, upcast_source(weight), (product, scaled)
    return None


def match_norm(node: fx.Node) -> Norm | None:
    """node as the output of model/layers.py rms_norm: weighted or not, with its cast down to bf16 where x is
    bf16."""
    out_dtype = dtype(node)
    if out_dtype not in rms_norm.DTYPES:
        return None
    product = node if out_dtype == torch.float32 else downcast_source(node)
    if not is_call(product, MUL):
        return None
    if (weighted := _weighted(product)) is not None:
        xf, eps, weight, products = weighted
    elif (plain := _scaled(product)) is not None:
        (xf, eps), weight, products = plain, None, (product,)
    else:
        return None
    x = xf if out_dtype == torch.float32 else cast_input(xf)
    if x is None or dtype(x) != out_dtype or not _fits(rms_norm.check, x, weight):
        return None
    return Norm(node, x, weight, eps, products)


def find_norms(graph: fx.Graph) -> list[Norm]:
    """Every RMSNorm, outermost first reading backwards: the product inside a weighted norm is not a norm too."""
    found, inside = [], set()
    for node in reversed(graph.nodes):
        if node.op != "call_function" or node in inside:
            continue
        norm = match_norm(node)
        if norm is not None:
            found.append(norm)
            inside.update(norm.products)
    return found[::-1]


# ---- RoPE ----------------------------------------------------------------------------------------------------
def _columns(node: Any) -> tuple[fx.Node, int, int, int] | None:
    """(x, start, stop, step) of a slice along the last dim with literal bounds."""
    if not is_(node, aten.slice.Tensor) or dim(node.args[0], arg(node, 1, "dim", 0)) != -1:
        return None
    step = arg(node, 4, "step", 1)
    bounds = span(arg(node, 2, "start"), arg(node, 3, "end"), static_size(node.args[0], -1))
    return (node.args[0], *bounds, step) if bounds is not None and isinstance(step, int) else None


def _half(node: Any) -> tuple[fx.Node, int] | None:
    """(r, parity) of `r[..., parity::2]` over all of r's columns (r fp32, an even number of them)."""
    cols = _columns(node)
    if cols is None or dtype(node) != torch.float32:
        return None
    r, start, stop, step = cols
    width = static_size(r, -1)
    return (r, start) if step == 2 and start in (0, 1) and stop == width and width % 2 == 0 else None


def _trig(node: Any) -> tuple[str, fx.Node] | None:
    """("cos" | "sin" | "-sin", angles) of cos(a), sin(a) or neg(sin(a))."""
    if is_(node, aten.neg.default):
        inner = _trig(node.args[0])
        return ("-sin", inner[1]) if inner is not None and inner[0] == "sin" else None
    if is_(node, aten.cos.default) or is_(node, aten.sin.default):
        return ("cos" if is_(node, aten.cos.default) else "sin"), node.args[0]
    return None


def _product(node: Any) -> tuple[fx.Node, int, str, fx.Node] | None:
    """(r, parity, trig kind, angles) of `half * trig`, commuted."""
    if not is_call(node, MUL):
        return None
    for half, trig in operands(node):
        h, t = _half(half), _trig(trig)
        if h is not None and t is not None:
            return (*h, *t)
    return None


def _rotation(first: Any, second: Any) -> tuple[fx.Node, bool, fx.Node] | None:
    """(r, inverse, angles) of `stack([e*c - o*s, e*s + o*c], -1)`'s operands, e/o the even/odd halves of r."""
    if not (is_(first, aten.sub.Tensor) and is_(second, aten.add.Tensor)) \
            or first.kwargs.get("alpha", 1) != 1 or second.kwargs.get("alpha", 1) != 1:
        return None
    even_cos, odd_sin = _product(first.args[0]), _product(first.args[1])
    if even_cos is None or odd_sin is None:
        return None
    r, parity, kind, angles = even_cos
    sin = odd_sin[2]
    if (parity, kind) != (0, "cos") or odd_sin != (r, 1, sin, angles) or sin not in ("sin", "-sin"):
        return None
    if {_product(term) for term in second.args} != {(r, 0, sin, angles), (r, 1, "cos", angles)}:
        return None
    return r, sin == "-sin", angles


def _angles(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(positions, inv_freq) of `unsqueeze(positions.float(), -1) * inv_freq`, inv_freq fp32 rank 1."""
    if not is_call(node, MUL):
        return None
    for column, inv_freq in operands(node):
        if is_(column, aten.unsqueeze.default) and dim(column, column.args[1]) == -1 \
                and dtype(column) == torch.float32 and rank(inv_freq) == 1 and dtype(inv_freq) == torch.float32:
            source = cast_input(column.args[0])  # the op casts positions to fp32 itself, as the model does
            return column.args[0] if source is None else source, inv_freq
    return None


def _pairs_flattened(node: Any) -> fx.Node | None:
    """The `[..., k, 2]` stack that node flattens back to `[..., 2k]` (flatten(-2) or a view merging them)."""
    if is_(node, aten.flatten.using_ints):
        inner = node.args[0]
        if dim(inner, arg(node, 1, "start_dim", 0)) == -2 and dim(inner, arg(node, 2, "end_dim", -1)) == -1:
            return inner
        return None
    if is_call(node, VIEWS) and static_size(node.args[0], -1) == 2:
        inner, outer = shape(node.args[0]), shape(node)
        return node.args[0] if same_sizes(inner[:-2], outer[:-1]) and inner[-2] * 2 == outer[-1] else None
    return None


def match_rope(node: fx.Node) -> Rope | None:
    """node as the output of model/layers.py apply_rope: the cat of x's unrotated columns and its rotated ones."""
    if not is_(node, aten.cat.default) or dim(node, arg(node, 1, "dim", 0)) != -1 or len(node.args[0]) != 2:
        return None
    nope, rotated = node.args[0]
    out_dtype = dtype(node)
    flat = rotated if out_dtype == torch.float32 else downcast_source(rotated)
    if out_dtype not in rms_norm.DTYPES or dtype(rotated) != out_dtype or flat is None:
        return None
    stacked = _pairs_flattened(flat)
    if not is_(stacked, aten.stack.default) or dim(stacked, arg(stacked, 1, "dim", 0)) != -1 \
            or len(stacked.args[0]) != 2:
        return None
    rotation = _rotation(*stacked.args[0])
    angles = _angles(rotation[2]) if rotation is not None else None
    if angles is None:
        return None
    r, inverse, _ = rotation
    part = value_of(r) if out_dtype == torch.float32 else cast_input(r)
    unrotated, rotated_part = _columns(nope), _columns(part)
    if unrotated is None or rotated_part is None:
        return None
    x, width, rope_dim = unrotated[0], static_size(unrotated[0], -1), static_size(r, -1)
    if rotated_part[0] is not x or dtype(x) != out_dtype or unrotated[1:] != (0, width - rope_dim, 1) \
            or rotated_part[1:] != (width - rope_dim, width, 1) or not same_sizes(shape(node), shape(x)) \
            or static_size(angles[1], 0) != rope_dim // 2 or not _fits(rope.check, x, *angles):
        return None
    return Rope(node, x, *angles, inverse, (nope, part))


def find_ropes(graph: fx.Graph) -> list[Rope]:
    """Every RoPE, in graph order."""
    return [r for r in map(match_rope, graph.nodes) if r is not None]


def _fits(check, *nodes: fx.Node | None) -> bool:
    """The op's own check accepts the operands' FakeTensor values."""
    vals = [None if n is None else tensor_val(n) for n in nodes]
    if any(v is None for n, v in zip(nodes, vals) if n is not None):
        return False
    try:
        check(*vals)
    except ValueError:
        return False
    return True


# ---- the pass --------------------------------------------------------------------------------------------------
class Fusion(NamedTuple):
    """`output` becomes `op(*args)`."""

    output: fx.Node
    op: Any
    args: tuple


def plan_fusions(graph: fx.Graph, norms: list[Norm], ropes: list[Rope]) -> list[Fusion]:
    """One op a rope (with its norm where the norm's only readers are the rope's two slices) and one a remaining
    norm, in graph order."""
    norm_of = {n.output: n for n in norms}
    absorbed, fusions = set(), []
    for r in ropes:
        norm = norm_of.get(r.x)
        if norm is not None and set(r.x.users) <= set(r.reads):
            absorbed.add(norm.output)
            fusions.append(Fusion(r.output, dsv4c.rms_norm_rope.default,
                                  (norm.x, norm.weight, norm.eps, r.positions, r.inv_freq, r.inverse)))
        else:
            fusions.append(Fusion(r.output, dsv4c.rope.default, (r.x, r.positions, r.inv_freq, r.inverse)))
    fusions += [Fusion(n.output, dsv4c.rms_norm.default, (n.x, n.weight, n.eps))
                for n in norms if n.output not in absorbed]
    position = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(fusions, key=lambda f: position[f.output])


def norm_rope_fusion(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Replace every RMSNorm and RoPE chain by its op (norm -> rope by one op); erase what only they read."""
    before = count_nodes(gm)
    if nodes_without_val(gm):  # dtypes and sizes are read from meta["val"]
        refresh_fake_values(gm)
    fusions = plan_fusions(gm.graph, find_norms(gm.graph), find_ropes(gm.graph))
    if fusions:
        _rewrite(gm.graph, fusions)
        gm.recompile()
    counts = {name: sum(f.op is getattr(dsv4c, name).default for f in fusions)
              for name in ("rms_norm", "rope", "rms_norm_rope")}
    inverse = sum(1 for f in fusions if f.op is not dsv4c.rms_norm.default and f.args[-1])
    description = (f"fused {counts['rms_norm_rope']} norm+rope, {counts['rms_norm']} RMSNorms, {counts['rope']} "
                   f"RoPEs ({inverse} inverse)")
    return gm, make_record("norm_rope_fusion", before, gm, len(fusions), description, inverse=inverse, **counts)


def _rewrite(graph: fx.Graph, fusions: list[Fusion]) -> None:
    """Each fusion in graph order, its inputs the new ops of earlier fusions where they were their outputs."""
    replaced: dict[fx.Node, fx.Node] = {}
    for fusion in fusions:
        args = tuple(replaced.get(a, a) if isinstance(a, fx.Node) else a for a in fusion.args)
        (new,) = replace_with_op(graph, fusion.op, args, (fusion.output,))
        replaced[fusion.output] = new
    erase_dead_ancestors(graph, replaced)
    if not is_topological(graph):
        stable_toposort(graph)
