"""mHC fusion: each layer boundary's mHC math -> one dsv4c op (hc_pre, hc_post_pre, hc_post, hc_head).

Pattern, read from the math in the graph (never from module names), spec section 2:
- pre:  `mixes = rms_factor(x) * (x @ fn^T)`, x the streams `[..., n, D]` flattened (or transformers' form
  `F.linear(x * rms_factor(x), fn)`); `pre = sigmoid(mixes[:n] * scale[0] + base[:n]) + hc_eps`,
  `post = 2 * sigmoid(mixes[n:2n] * scale[1] + base[n:2n])`, `comb = sinkhorn(mixes[2n:] * scale[2] +
  base[2n:])` (softmax(-1) + eps, a column norm, then alternating row/column norms: `iters` and eps are
  read from the chain and checked), then `RMSNorm(sum_j pre[j] * streams[j], norm_weight)`
  -> `dsv4c::hc_pre(streams, fn, base, scale, norm_weight, rms_eps, hc_eps, iters)`.
- post: `post[..., None] * out[..., None, :] + comb^T @ streams` (matmul, or bmm between views)
  -> `dsv4c::hc_post`; when its result is the streams of a matched pre -> `dsv4c::hc_post_pre`.
- head: the same collapse with `fn [n, nD]`, `scale [1]` and no post/comb, then the final RMSNorm
  -> `dsv4c::hc_head`.
Looked through (passes/graph_match.py): upcasts to fp32 (lossless; the ops upcast inside), views that only
merge or split dims, identity expands, split/slice/select/unbind of the parameters, positive or negative
dims, commuted adds and muls, softmax whole or decomposed. A cast down (transformers' `post.to(bf16)`)
changes the math: no match. The mixes' and the norm's eps must agree (one `rms_eps`), as must the pre's and
the Sinkhorn's (one `hc_eps`); a pre fuses only with its post and comb found, a post only after a fused pre.

Before: a flat aten graph with FakeTensor `meta["val"]` (dims and dtypes are read from it); for the
captured step, after noop_removal / dead_code / cse (no metadata asserts between ops, one node per value).
Where: right after cse, before constant_folding: nothing folded yet into the weights the ops take.
Matched nodes that something else still reads stay; the rest are erased. The new nodes get `meta["val"]`
from the ops' fake functions. Constants must be literals: `torch.compile(dynamic=True)` lifts module floats
(the eps) to graph inputs, and such a graph is left alone.

Before and after, one boundary of the captured tiny step (~160 nodes -> 5):
    matmul(flatten(s), numpy_T(fn)) * rsqrt(mean(square(flatten(s)), -1) + 1e-6) -> slice x3 -> sigmoid ...
    softmax -> 39 x (sum, add, div) -> unsqueeze * s -> sum(-2) -> square, mean, rsqrt, mul, mul(attn_norm)
  becomes
    hc_post_pre(out, s, post, comb, fn, base, scale, attn_norm, 1e-6, 1e-6, 20) -> getitem x4
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import sympy
import torch
import torch.fx as fx

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops this pass emits)
from dsv4c.codegen import targets as target_table
from dsv4c.passes.graph_match import (ADD, MUL, SUM, VIEWS, arg, batched_matmul, columns, dim, downcast_source, dtype,
                          erase_dead_ancestors, is_, is_call, is_topological, linear, number, operands,
                          param_part, replace_with_op, rms_factor, rows_source, same_sizes, shape,
                          softmax_input, stable_toposort, transposed_last2, upcast_source, value_of, weighted_rms)
from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes
from dsv4c.passes.shape_propagation import nodes_without_val, refresh_fake_values

aten = torch.ops.aten
FUSED = ("hc_pre", "hc_post_pre", "hc_post", "hc_head")


# ---- the pieces of one boundary ------------------------------------------------------------------------
class Mixes(NamedTuple):
    """`mixes [..., width]` of `streams [..., n, D]` with `fn [width, n*D]`, normalised with `eps`."""

    node: fx.Node
    streams: fx.Node
    n: int
    fn: fx.Node
    eps: float
    width: int


def _unflattened(node: Any) -> tuple[fx.Node, int] | None:
    """(streams `[..., n, D]`, n) that node `[..., n*D]` flattens (upcasts looked through on both sides)."""
    node = upcast_source(node)
    if not is_call(node, VIEWS):
        return None
    inner, outer = shape(node.args[0]), shape(node)
    if inner is None or outer is None or len(inner) != len(outer) + 1 or not inner[-2].is_Integer:
        return None
    if not same_sizes(inner[:-2], outer[:-1]) or sympy.simplify(inner[-2] * inner[-1] - outer[-1]) != 0:
        return None
    return upcast_source(node.args[0]), int(inner[-2])


def _mixes(node: Any) -> Mixes | None:
    """`(x @ fn.T) * rms_factor(x)` (ours) or `linear(x * rms_factor(x), fn)` (transformers')."""
    candidates = []
    if is_call(node, MUL):
        candidates += [(linear(p), rms_factor(r)) for p, r in operands(node)]
    product = linear(node)
    if product is not None and is_call(product[0], MUL):
        candidates += [((x, product[1]), rms_factor(r)) for x, r in operands(product[0])]
    for product, factor in candidates:
        if product is None or factor is None or rows_source(product[0]) is not factor[0]:
            continue
        flat, fn = _unflattened(factor[0]), upcast_source(product[1])
        width = (shape(fn) or (None,))[0]
        if flat is not None and width is not None and width.is_Integer:
            return Mixes(node, flat[0], flat[1], fn, factor[1], int(width))
    return None


class Affine(NamedTuple):
    """`mixes[..., cols] * scale[scale_at] + base[base_cols]`."""

    mixes: Mixes
    cols: tuple[int, int]
    scale: fx.Node
    scale_at: int
    base: fx.Node
    base_cols: tuple[int, int]


def _affine(node: Any) -> Affine | None:
    for product, bias in operands(node) if is_call(node, ADD) else []:
        base = param_part(bias)
        for cols, factor in operands(product) if base is not None and is_call(product, MUL) else []:
            scale = param_part(factor)
            if scale is None or scale[2] - scale[1] != 1 or not isinstance(cols, fx.Node):
                continue
            source, start, stop = columns(cols)
            mixes = _mixes(source)
            if mixes is not None:
                return Affine(mixes, (start, stop), scale[0], scale[1], base[0], (base[1], base[2]))
    return None


class Gate(NamedTuple):
    kind: str  # "pre": sigmoid(affine) + eps; "post": 2 * sigmoid(affine)
    affine: Affine
    eps: float | None


def _gate(node: Any) -> Gate | None:
    for inner, literal in operands(node) if is_call(node, ADD | MUL) else []:
        if not is_(inner, aten.sigmoid.default) or number(literal) is None:
            continue
        affine = _affine(inner.args[0])
        if affine is not None and is_call(node, ADD):
            return Gate("pre", affine, float(literal))
        if affine is not None and number(literal) == 2:
            return Gate("post", affine, None)
    return None


def _norm_step(node: Any) -> tuple[fx.Node, int, float] | None:
    """`c / (c.sum(dim, keepdim) + eps)` -> (c, dim, eps)."""
    if not is_(node, aten.div.Tensor) or not is_call(node.args[1], ADD):
        return None
    c = node.args[0]
    for total, eps in operands(node.args[1]):
        if is_call(total, SUM) and total.args[0] is c and arg(total, 2, "keepdim") and number(eps) is not None:
            return c, dim(c, total.args[1]), float(eps)
    return None


class Sinkhorn(NamedTuple):
    affine: Affine
    iters: int
    eps: float


def _sinkhorn(node: Any) -> Sinkhorn | None:
    """The chain ending at node: `softmax(logits) + eps`, a column norm, then (row, column) norm pairs."""
    dims, epsilons, c = [], set(), node
    while (step := _norm_step(c)) is not None:
        c, d, eps = step
        dims.append(d)
        epsilons.add(eps)
    if not dims or dims[::-1] != [-2] + [-1, -2] * (len(dims) // 2):
        return None
    for soft, eps in operands(c) if is_call(c, ADD) else []:
        logits = softmax_input(soft)
        affine = _affine(logits) if logits is not None else None
        if affine is not None and number(eps) is not None and epsilons == {float(eps)}:
            return Sinkhorn(affine, (len(dims) + 1) // 2, float(eps))
    return None


def _chain_end(node: fx.Node) -> bool:
    """No user continues node's normalisation chain (a chain read from its middle would count short)."""
    return not any(_norm_step(user) is not None and user.args[0] is node for user in node.users)


def _collapse(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """`(sum_j pre[j] * streams.float()[j]).to(streams.dtype)` -> (pre, streams)."""
    total = node if dtype(node) == torch.float32 else downcast_source(node)
    if not is_call(total, SUM) or dim(total.args[0], total.args[1]) != -2 or arg(total, 2, "keepdim"):
        return None
    for column, streams in operands(total.args[0]) if is_call(total.args[0], MUL) else []:
        if is_(column, aten.unsqueeze.default) and dim(column, column.args[1]) == -1 \
                and dtype(upcast_source(streams)) == dtype(node):
            return column.args[0], upcast_source(streams)
    return None


class Post(NamedTuple):
    new: fx.Node
    block_out: fx.Node
    streams: fx.Node
    post: fx.Node
    comb: fx.Node


def _post(node: fx.Node) -> Post | None:
    """`(post[..., None] * out.float()[..., None, :] + comb^T @ streams.float()).to(streams.dtype)`."""
    total = node if dtype(node) == torch.float32 else downcast_source(node)
    for scaled, mixed in operands(total) if is_call(total, ADD) else []:
        product, matmul = _post_product(scaled), batched_matmul(mixed)
        comb = transposed_last2(matmul[0]) if matmul is not None else None
        if product is None or comb is None:
            continue
        streams = upcast_source(matmul[1])
        if dtype(streams) == dtype(node) and same_sizes((shape(product[1]) or ())[:-1], (shape(streams) or ())[:-2]):
            return Post(node, product[1], streams, product[0], comb)
    return None


def _post_product(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """`post.unsqueeze(-1) * out.unsqueeze(-2)` -> (post, out)."""
    for column, row in operands(node) if is_call(node, MUL) else []:
        if is_(column, aten.unsqueeze.default) and dim(column, column.args[1]) == -1 \
                and is_(row, aten.unsqueeze.default) and dim(row, row.args[1]) == -2:
            return column.args[0], upcast_source(row.args[0])
    return None


# ---- whole boundaries ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pre:
    """A matched pre (+ norm): where its three outputs are and what the fused op needs."""

    mixes: Mixes
    normed: fx.Node
    post: fx.Node
    comb: fx.Node
    base: fx.Node
    scale: fx.Node
    weight: fx.Node
    hc_eps: float
    iters: int

    def args(self) -> tuple:
        m = self.mixes
        return m.streams, m.fn, self.base, self.scale, self.weight, m.eps, self.hc_eps, self.iters


class Fusion(NamedTuple):
    kind: str  # one of FUSED
    args: tuple
    outputs: tuple  # the nodes the op's outputs replace, in its output order


def _is_part(affine: Affine, cols: tuple[int, int], scale_at: int, like: Affine) -> bool:
    """affine reads these columns of like's mixes, the same columns of like's base, like's scale[scale_at]."""
    return (affine.mixes.node is like.mixes.node and affine.cols == cols and affine.base_cols == cols
            and affine.scale_at == scale_at and affine.scale is like.scale and affine.base is like.base)


def _params_fit(affine: Affine, scales: int) -> bool:
    return shape(affine.base) == (affine.mixes.width,) and shape(affine.scale) == (scales,)


def _unique(items: list) -> Any:
    return items[0] if len(items) == 1 else None


def _pre(normed: fx.Node, weight: fx.Node, eps: float, gate: Gate, posts: dict, sinks: dict) -> Pre | None:
    a, m = gate.affine, gate.affine.mixes
    if m.width != (2 + m.n) * m.n or eps != m.eps or not _is_part(a, (0, m.n), 0, a) or not _params_fit(a, 3):
        return None
    post = _unique([n for n, g in posts.get(m.node, []) if _is_part(g.affine, (m.n, 2 * m.n), 1, a)])
    comb = _unique([(n, s) for n, s in sinks.get(m.node, []) if _is_part(s.affine, (2 * m.n, m.width), 2, a)])
    if post is None or comb is None or comb[1].eps != gate.eps:
        return None
    return Pre(m, normed, post, comb[0], a.base, a.scale, weight, gate.eps, comb[1].iters)


def _head(normed: fx.Node, weight: fx.Node, eps: float, gate: Gate) -> Fusion | None:
    a, m = gate.affine, gate.affine.mixes
    if m.width != m.n or eps != m.eps or not _is_part(a, (0, m.n), 0, a) or not _params_fit(a, 1):
        return None
    return Fusion("hc_head", (m.streams, m.fn, a.base, a.scale, weight, m.eps, gate.eps), (normed,))


def _survey(graph: fx.Graph) -> tuple[list, dict, dict, list]:
    """One sweep: normed collapses (with their pre gates), post gates and Sinkhorn ends by mixes, posts."""
    normed, posts, sinks, merges = [], {}, {}, []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        gate = _gate(node)
        if gate is not None and gate.kind == "post":
            posts.setdefault(gate.affine.mixes.node, []).append((node, gate))
        sink = _sinkhorn(node) if is_(node, aten.div.Tensor) and _chain_end(node) else None
        if sink is not None:
            sinks.setdefault(sink.affine.mixes.node, []).append((node, sink))
        rms = weighted_rms(node)
        collapse = _collapse(rms[0]) if rms is not None else None
        gate = _gate(collapse[0]) if collapse is not None else None
        if gate is not None and gate.kind == "pre" and value_of(gate.affine.mixes.streams) is value_of(collapse[1]):
            normed.append((node, rms[1], rms[2], gate))
        merge = _post(node)
        merges += [merge] if merge is not None else []
    return normed, posts, sinks, merges


def find_fusions(graph: fx.Graph) -> list[Fusion]:
    """Every mHC boundary of the graph as the fused op that replaces it (a post and the next pre joined)."""
    normed, posts, sinks, merges = _survey(graph)
    pres, fusions = [], []
    for node, weight, eps, gate in normed:
        pre = _pre(node, weight, eps, gate, posts, sinks)
        head = _head(node, weight, eps, gate) if pre is None else None
        pres += [pre] if pre is not None else []
        fusions += [head] if head is not None else []
    produced = {(p.post, p.comb, value_of(p.mixes.streams)) for p in pres}
    next_pre: dict[fx.Node, Pre] = {}
    for pre in pres:
        next_pre.setdefault(value_of(pre.mixes.streams), pre)
    joined: set[int] = set()
    for merge in merges:
        if (merge.post, merge.comb, value_of(merge.streams)) not in produced:
            continue
        args, pre = (merge.block_out, merge.streams, merge.post, merge.comb), next_pre.get(value_of(merge.new))
        if pre is not None and id(pre) not in joined:
            joined.add(id(pre))
            fusions.append(Fusion("hc_post_pre", args + pre.args()[1:], (merge.new, pre.normed, pre.post, pre.comb)))
        else:
            fusions.append(Fusion("hc_post", args, (merge.new,)))
    fusions += [Fusion("hc_pre", p.args(), (p.normed, p.post, p.comb)) for p in pres if id(p) not in joined]
    return fusions


# ---- the pass --------------------------------------------------------------------------------------------
def mhc_fusion(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Replace every matched mHC boundary by its dsv4c op; erase what only the old math read."""
    before = count_nodes(gm)
    if nodes_without_val(gm):  # dims and dtypes are read from meta["val"]
        refresh_fake_values(gm)
    fusions = find_fusions(gm.graph)
    if fusions:
        _rewrite(gm.graph, fusions)
        gm.recompile()
    counts = {kind: sum(f.kind == kind for f in fusions) for kind in FUSED}
    lowering = target_table.mhc_lowering(target_table.target(ctx.target))
    summary = ", ".join(f"{counts[k]} {k}" for k in FUSED)
    return gm, make_record("mhc_fusion", before, gm, len(fusions), f"fused {summary} ({lowering} lowering)",
                           **counts, lowering=lowering)


def _rewrite(graph: fx.Graph, fusions: list[Fusion]) -> None:
    """Fusions in graph order, each reading the outputs of those before it where it read their old nodes."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    replaced: dict[fx.Node, fx.Node] = {}
    for fusion in sorted(fusions, key=lambda f: min(order[o] for o in f.outputs)):
        args = tuple(replaced.get(a, a) if isinstance(a, fx.Node) else a for a in fusion.args)
        op = getattr(torch.ops.dsv4c, fusion.kind).default
        replaced.update(zip(fusion.outputs, replace_with_op(graph, op, args, fusion.outputs)))
    erase_dead_ancestors(graph, replaced)
    if not is_topological(graph):
        stable_toposort(graph)
