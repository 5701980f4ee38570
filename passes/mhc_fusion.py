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
Looked through: upcasts to fp32 (lossless; the ops upcast inside), views that only merge or split dims,
identity expands, split/slice/select/unbind of the parameters, positive or negative dims, commuted adds and
muls, softmax whole or decomposed. Casts down (transformers' `post.to(bf16)`) change the math: no match.
Both epsilons of the mixes and the norm must agree (one `rms_eps`), as must the pre's and Sinkhorn's.

Before: a flat aten graph with FakeTensor `meta["val"]` (dims and dtypes are read from it); for the
captured step, after noop_removal / dead_code / cse (no metadata asserts between ops, one node per value).
Where: right after cse, before constant_folding: nothing folded yet into the weights the ops take.
Matched nodes that something else still reads stay; the rest are erased. The new nodes get `meta["val"]`
from the ops' fake functions.
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
from typing import Any, NamedTuple

import sympy
import torch
import torch.fx as fx

from ..codegen import ops  # noqa: F401  (registers the dsv4c ops this pass emits)
from ..codegen import targets as target_table
from .manager import PassContext, PassRecord, make_record
from .op_facts import count_nodes, graph_fake_mode, is_pure, sym_tuple, tensor_val
from .shape_propagation import nodes_without_val, refresh_fake_values

aten, prims = torch.ops.aten, torch.ops.prims

CASTS = frozenset({aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, prims.convert_element_type.default})
VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                   aten.unflatten.int})
COPIES = frozenset({aten.clone.default, aten.contiguous.default, aten.alias.default})
TRANSPOSES = frozenset({aten.numpy_T.default, aten.t.default, aten.permute.default, aten.transpose.int})
SOFTMAX = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
FUSED = ("hc_pre", "hc_post_pre", "hc_post", "hc_head")


# ---- reading nodes -----------------------------------------------------------------------------------
def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)


def _shape(node: Any) -> tuple[sympy.Expr, ...] | None:
    val = tensor_val(node)
    return sym_tuple(val.shape) if val is not None else None


def _dtype(node: Any) -> torch.dtype | None:
    val = tensor_val(node)
    return val.dtype if val is not None else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _dim(node: fx.Node, dim: Any) -> int | None:
    """`dim` as a negative index into node's value (None unless it is one int)."""
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(dim) == 1 else None
    shape = _shape(node)
    if not isinstance(dim, int) or shape is None:
        return None
    return dim - len(shape) if dim >= 0 else dim


def _operands(node: fx.Node) -> list[tuple[Any, Any]]:
    """Both orders of a commutative binary op's operands."""
    a, b = node.args[:2]
    return [(a, b), (b, a)]


def _cast_input(node: Any) -> fx.Node | None:
    """The input of a dtype cast that stays on its device, else None."""
    if _is(node, *CASTS) and isinstance(node.args[0], fx.Node) and tensor_val(node.args[0]) is not None \
            and tensor_val(node) is not None and tensor_val(node).device == tensor_val(node.args[0]).device:
        return node.args[0]
    return None


def _upcast_source(node: Any) -> Any:
    """Look through casts that lose nothing: float16/bfloat16/float32 -> float32, same-dtype copies."""
    while (source := _cast_input(node)) is not None and _dtype(node) == torch.float32 \
            and _dtype(source) in (torch.float32, torch.bfloat16, torch.float16):
        node = source
    return node


def _downcast_source(node: fx.Node) -> fx.Node | None:
    """The fp32 input of a cast of node's dtype (a rounding the fused ops also make), else None."""
    source = _cast_input(node)
    return source if source is not None and _dtype(source) == torch.float32 else None


def _strip(node: Any, targets: frozenset) -> Any:
    while _is(node, *targets) and _shape(node) == _shape(node.args[0]):
        node = node.args[0]
    return node


def _value(node: Any) -> Any:
    """The node whose value node is, copies and identity expands looked through (for identity tests)."""
    while True:
        inner = _strip(node, COPIES | {aten.expand.default})
        if _cast_input(inner) is not None and _dtype(inner) == _dtype(inner.args[0]):
            inner = inner.args[0]
        if inner is node:
            return node
        node = inner


def _same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(sympy.simplify(x - y) == 0
                                                                        for x, y in zip(a, b))


def _span(start: Any, stop: Any, size: int) -> tuple[int, int]:
    """Python slice bounds (None, negative, past the end) as a [start, stop) range."""
    return slice(start, stop).indices(size)[:2]


def _numel(shape: tuple[sympy.Expr, ...]) -> sympy.Expr:
    return sympy.Mul(*shape) if shape else sympy.Integer(1)


# ---- pieces of the math -----------------------------------------------------------------------------
def _rms_factor(node: Any) -> tuple[fx.Node, float] | None:
    """`rsqrt(mean(x^2, -1, keepdim) + eps)` -> (x, eps)."""
    node = _upcast_source(node)
    if not _is(node, aten.rsqrt.default) or not _is(node.args[0], aten.add.Tensor):
        return None
    for mean, eps in _operands(node.args[0]):
        x = _mean_square_input(mean)
        if x is not None and _number(eps) is not None:
            return x, float(eps)
    return None


def _mean_square_input(node: Any) -> fx.Node | None:
    if _is(node, aten.mean.dim) and _dim(node.args[0], node.args[1]) == -1 and _arg(node, 2, "keepdim"):
        return _square_input(node.args[0])
    if _is(node, aten.div.Tensor) and _is(node.args[0], aten.sum.dim_IntList):
        total = node.args[0]
        size = _shape(total.args[0])
        if _dim(total.args[0], total.args[1]) == -1 and _arg(total, 2, "keepdim") and size \
                and _number(node.args[1]) == size[-1]:
            return _square_input(total.args[0])
    return None


def _square_input(node: Any) -> fx.Node | None:
    if _is(node, aten.square.default) or _is(node, aten.pow.Tensor_Scalar) and _number(node.args[1]) == 2:
        return node.args[0]
    if _is(node, aten.mul.Tensor) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _rows_source(node: Any) -> Any:
    """The `[..., K]` tensor a 2-D `[N, K]` view flattens (for mm), else node."""
    if _is(node, *VIEWS) and len(_shape(node) or ()) == 2:
        inner, outer = _shape(node.args[0]), _shape(node)
        if inner and inner[-1] == outer[-1] and sympy.simplify(_numel(inner) - _numel(outer)) == 0:
            return node.args[0]
    return node


def _transposed(node: Any) -> fx.Node | None:
    """The 2-D weight a `w.T` reads."""
    if not _is(node, *TRANSPOSES) or len(_shape(node.args[0]) or ()) != 2:
        return None
    if _is(node, aten.permute.default) and list(node.args[1]) not in ([1, 0], [-1, -2]):
        return None
    if _is(node, aten.transpose.int) and {_dim(node.args[0], node.args[1]), _dim(node.args[0], node.args[2])} \
            != {-1, -2}:
        return None
    return node.args[0]


def _linear(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """`x @ w.T` as linear, matmul or mm between views -> (x `[..., K]`, w `[M, K]`)."""
    if _is(node, aten.linear.default) and _arg(node, 2, "bias") is None:
        return node.args[0], node.args[1]
    if _is(node, *VIEWS) and _is(node.args[0], aten.mm.default):
        x, w = _rows_source(node.args[0].args[0]), _transposed(node.args[0].args[1])
        return (x, w) if w is not None and _same(_shape(x)[:-1], _shape(node)[:-1]) else None
    if _is(node, aten.matmul.default, aten.mm.default):
        w = _transposed(node.args[1])
        return (node.args[0], w) if w is not None else None
    return None


def _unflattened(node: Any) -> tuple[fx.Node, int] | None:
    """(streams `[..., n, D]`, n) that node `[..., n*D]` flattens (upcasts looked through on both sides)."""
    node = _upcast_source(node)
    if not _is(node, *VIEWS):
        return None
    inner, outer = _shape(node.args[0]), _shape(node)
    if inner is None or outer is None or len(inner) != len(outer) + 1 or not inner[-2].is_Integer:
        return None
    if not _same(inner[:-2], outer[:-1]) or sympy.simplify(inner[-2] * inner[-1] - outer[-1]) != 0:
        return None
    return _upcast_source(node.args[0]), int(inner[-2])


class Mixes(NamedTuple):
    node: fx.Node
    streams: fx.Node
    n: int
    fn: fx.Node
    eps: float
    width: int


def _mixes(node: Any) -> Mixes | None:
    """`(x @ fn.T) * rms_factor(x)` (ours) or `linear(x * rms_factor(x), fn)` (transformers')."""
    candidates = []
    if _is(node, aten.mul.Tensor):
        candidates += [(_linear(p), _rms_factor(r)) for p, r in _operands(node)]
    product = _linear(node)
    if product is not None and _is(product[0], aten.mul.Tensor):
        candidates += [((x, product[1]), _rms_factor(r)) for x, r in _operands(product[0])]
    for product, factor in candidates:
        if product is None or factor is None or _rows_source(product[0]) is not factor[0]:
            continue
        flat, fn = _unflattened(factor[0]), _upcast_source(product[1])
        width = (_shape(fn) or (None,))[0]
        if flat is not None and width is not None and width.is_Integer:
            return Mixes(node, flat[0], flat[1], fn, factor[1], int(width))
    return None


def _columns(node: Any) -> tuple[fx.Node, int, int]:
    """(tensor, start, stop): which last-dim columns node takes (views splitting the last dim looked through)."""
    inner, outer = _shape(node.args[0]) if _is(node, *VIEWS) else None, _shape(node)
    if inner and outer and len(outer) == len(inner) + 1 and _same(inner[:-1], outer[:-2]):
        node = node.args[0]
    if _is(node, aten.slice.Tensor) and _dim(node.args[0], _arg(node, 1, "dim", 0)) == -1 \
            and _arg(node, 4, "step", 1) == 1:
        return (node.args[0], *_span(_arg(node, 2, "start"), _arg(node, 3, "end"), int(_shape(node.args[0])[-1])))
    part = _split_part(node, last=True)
    if part is not None:
        return part
    return node, 0, int(_shape(node)[-1]) if _shape(node) and _shape(node)[-1].is_Integer else -1


def _split_part(node: Any, last: bool) -> tuple[fx.Node, int, int] | None:
    """getitem of split_with_sizes / split / unbind along dim 0 (or the last dim) -> (tensor, start, stop)."""
    if not (isinstance(node, fx.Node) and node.target is operator.getitem):
        return None
    split, index = node.args
    if not _is(split, aten.split_with_sizes.default, aten.split.Tensor, aten.unbind.int):
        return None
    source = split.args[0]
    dim = _dim(source, _arg(split, 1 if _is(split, aten.unbind.int) else 2, "dim", 0))
    if dim != (-1 if last else -len(_shape(source) or ())):
        return None
    if _is(split, aten.unbind.int):
        return source, index, index + 1
    sizes = split.args[1]
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes] * (index + 1)
    return source, sum(sizes[:index]), sum(sizes[:index + 1])


def _param_part(node: Any) -> tuple[fx.Node, int, int] | None:
    """(1-D parameter, start, stop) that node reads: its slice, split part, element or the whole of it."""
    node = _upcast_source(node)
    if _is(node, *VIEWS) and _same((_numel(_shape(node) or ()),), (_numel(_shape(node.args[0]) or ()),)):
        node = _upcast_source(node.args[0])
    part = _split_part(node, last=False)
    if part is None and _is(node, aten.slice.Tensor) and _arg(node, 1, "dim", 0) in (0, -1):
        part = (node.args[0], *_span(_arg(node, 2, "start"), _arg(node, 3, "end"), int(_shape(node.args[0])[0])))
    if part is None and _is(node, aten.select.int) and node.args[1] in (0, -1):
        index = node.args[2] % int(_shape(node.args[0])[0])
        part = node.args[0], index, index + 1
    if part is None:
        part = node, 0, int(_shape(node)[0]) if len(_shape(node) or ()) == 1 else -1
    param = _upcast_source(part[0])
    return (param, part[1], part[2]) if len(_shape(param) or ()) == 1 else None


class Affine(NamedTuple):
    """`mixes[..., cols] * scale[scale_at] + base[base_cols]`."""

    mixes: Mixes
    cols: tuple[int, int]
    scale: fx.Node
    scale_at: int
    base: fx.Node
    base_cols: tuple[int, int]


def _affine(node: Any) -> Affine | None:
    if not _is(node, aten.add.Tensor):
        return None
    for product, bias in _operands(node):
        base = _param_part(bias)
        if base is None or not _is(product, aten.mul.Tensor):
            continue
        for cols, factor in _operands(product):
            scale = _param_part(factor)
            if scale is None or scale[2] - scale[1] != 1 or not isinstance(cols, fx.Node):
                continue
            source, start, stop = _columns(cols)
            mixes = _mixes(source)
            if mixes is not None:
                return Affine(mixes, (start, stop), scale[0], scale[1], base[0], (base[1], base[2]))
    return None


class Gate(NamedTuple):
    kind: str  # "pre": sigmoid(affine) + eps; "post": 2 * sigmoid(affine)
    affine: Affine
    eps: float | None


def _gate(node: Any) -> Gate | None:
    if not _is(node, aten.add.Tensor, aten.mul.Tensor):
        return None
    for inner, literal in _operands(node):
        if not _is(inner, aten.sigmoid.default) or _number(literal) is None:
            continue
        affine = _affine(inner.args[0])
        if affine is not None and _is(node, aten.add.Tensor):
            return Gate("pre", affine, float(literal))
        if affine is not None and _number(literal) == 2:
            return Gate("post", affine, None)
    return None


def _norm_step(node: Any) -> tuple[fx.Node, int, float] | None:
    """`c / (c.sum(dim, keepdim) + eps)` -> (c, dim, eps)."""
    if not _is(node, aten.div.Tensor) or not _is(node.args[1], aten.add.Tensor):
        return None
    c = node.args[0]
    for total, eps in _operands(node.args[1]):
        if _is(total, aten.sum.dim_IntList) and total.args[0] is c and _arg(total, 2, "keepdim") \
                and _number(eps) is not None:
            return c, _dim(c, total.args[1]), float(eps)
    return None


def _softmax_input(node: Any) -> fx.Node | None:
    """x of `softmax(x, -1)`, whole or decomposed as `exp(x - amax(x)) / sum(exp(...))`."""
    if _is(node, *SOFTMAX) and _dim(node.args[0], node.args[1]) == -1 and not (len(node.args) > 2 and node.args[2]):
        return node.args[0]
    if _is(node, aten.div.Tensor) and _is(node.args[0], aten.exp.default) and _is(node.args[1], aten.sum.dim_IntList):
        e, total = node.args
        if total.args[0] is e and _dim(e, total.args[1]) == -1 and _is(e.args[0], aten.sub.Tensor):
            x, peak = e.args[0].args
            if _is(peak, aten.amax.default) and peak.args[0] is x and _dim(x, peak.args[1]) == -1:
                return x
    return None


class Sinkhorn(NamedTuple):
    affine: Affine
    iters: int
    eps: float


def _sinkhorn(node: Any) -> Sinkhorn | None:
    """The chain ending at node: `softmax(logits) + eps`, a column norm, then (row, column) norm pairs."""
    dims, epsilons, c = [], [], node
    while (step := _norm_step(c)) is not None:
        c, dim, eps = step
        dims.append(dim)
        epsilons.append(eps)
    dims.reverse()
    if not dims or dims != [-2] + [-1, -2] * (len(dims) // 2) or not _is(c, aten.add.Tensor):
        return None
    for soft, eps in _operands(c):
        logits = _softmax_input(soft)
        affine = _affine(logits) if logits is not None else None
        if affine is not None and _number(eps) is not None and set(epsilons) == {float(eps)}:
            return Sinkhorn(affine, (len(dims) + 1) // 2, float(eps))
    return None


def _weighted_rms(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """`(x.float() * rms_factor(x.float()) * w.float()).to(x.dtype)` in either mul order -> (x, w, eps)."""
    core = node if _dtype(node) == torch.float32 else _downcast_source(node)
    if not _is(core, aten.mul.Tensor):
        return None
    for normed, weight in _operands(core):
        if not _is(normed, aten.mul.Tensor):
            continue
        for x, factor in _operands(normed):
            rms = _rms_factor(factor)
            if rms is not None and rms[0] is x and _dtype(_upcast_source(x)) == _dtype(node):
                w = _upcast_source(weight)
                if len(_shape(w) or ()) == 1:
                    return _upcast_source(x), w, rms[1]
    return None


def _collapse(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """`sum_j pre[j] * streams[j]` (fp32, cast to streams' dtype) -> (pre, streams)."""
    total = node if _dtype(node) == torch.float32 else _downcast_source(node)
    if not _is(total, aten.sum.dim_IntList) or _dim(total.args[0], total.args[1]) != -2 \
            or _arg(total, 2, "keepdim") or not _is(total.args[0], aten.mul.Tensor):
        return None
    for column, streams in _operands(total.args[0]):
        if _is(column, aten.unsqueeze.default) and _dim(column, column.args[1]) == -1:
            streams = _upcast_source(streams)
            if _dtype(streams) == _dtype(node):
                return column.args[0], streams
    return None


def _transposed_last2(node: Any) -> fx.Node | None:
    """x of `x.transpose(-1, -2)` (transpose or permute swapping only the last two dims)."""
    node = _value(node)
    rank = len(_shape(node) or ())
    if _is(node, aten.transpose.int) and {_dim(node, node.args[1]), _dim(node, node.args[2])} == {-1, -2}:
        return node.args[0]
    if _is(node, aten.permute.default) and rank >= 2 \
            and [d % rank for d in node.args[1]] == list(range(rank - 2)) + [rank - 1, rank - 2]:
        return node.args[0]
    return None


def _batch_source(node: Any) -> Any:
    """x `[..., r, c]` that a `[N, r, c]` view of it (through an identity expand) flattens, else node."""
    if not _is(node, *VIEWS):
        return node
    source = _strip(node.args[0], frozenset({aten.expand.default}))
    inner, outer = _shape(source), _shape(node)
    if inner and outer and len(outer) == 3 and _same(inner[-2:], outer[-2:]) \
            and sympy.simplify(_numel(inner) - _numel(outer)) == 0:
        return source
    return node


def _batched_matmul(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) of `a @ b` over equal leading dims: matmul, or bmm between views (AOTAutograd's form)."""
    if _is(node, aten.matmul.default):
        a, b = node.args
    elif _is(node, *VIEWS) and _is(node.args[0], aten.bmm.default):
        a, b = (_batch_source(x) for x in node.args[0].args)
    else:
        return None
    lead = (_shape(node) or ())[:-2]
    return (a, b) if _same((_shape(a) or ())[:-2], lead) and _same((_shape(b) or ())[:-2], lead) else None


class Post(NamedTuple):
    new: fx.Node
    block_out: fx.Node
    streams: fx.Node
    post: fx.Node
    comb: fx.Node


def _post(node: fx.Node) -> Post | None:
    """`(post[..., None] * out.float()[..., None, :] + comb^T @ streams.float()).to(streams.dtype)`."""
    total = node if _dtype(node) == torch.float32 else _downcast_source(node)
    if not _is(total, aten.add.Tensor):
        return None
    for scaled, mixed in _operands(total):
        product, matmul = _post_product(scaled), _batched_matmul(mixed)
        comb = _transposed_last2(matmul[0]) if matmul is not None else None
        if product is None or comb is None:
            continue
        streams = _upcast_source(matmul[1])
        if _dtype(streams) == _dtype(node) and _same(_shape(product[1])[:-1], _shape(streams)[:-2]):
            return Post(node, product[1], streams, product[0], comb)
    return None


def _post_product(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """`post.unsqueeze(-1) * out.unsqueeze(-2)` -> (post, out)."""
    if not _is(node, aten.mul.Tensor):
        return None
    for column, row in _operands(node):
        if _is(column, aten.unsqueeze.default) and _dim(column, column.args[1]) == -1 \
                and _is(row, aten.unsqueeze.default) and _dim(row, row.args[1]) == -2:
            return column.args[0], _upcast_source(row.args[0])
    return None


# ---- whole boundaries ---------------------------------------------------------------------------------
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
    """affine reads these columns of like's mixes, base columns alike, and scale[scale_at] of like's scale."""
    return (affine.mixes.node is like.mixes.node and affine.cols == cols and affine.base_cols == cols
            and affine.scale_at == scale_at and affine.scale is like.scale and affine.base is like.base)


def _param_sizes_ok(affine: Affine, scales: int) -> bool:
    base, scale = _shape(affine.base), _shape(affine.scale)
    return base == (affine.mixes.width,) and scale == (scales,)


def _unique(items: list) -> Any:
    return items[0] if len(items) == 1 else None


def _pre(normed: fx.Node, weight: fx.Node, eps: float, gate: Gate, posts: dict, sinks: dict) -> Pre | None:
    a, m = gate.affine, gate.affine.mixes
    if m.width != (2 + m.n) * m.n or eps != m.eps or not _is_part(a, (0, m.n), 0, a) \
            or not _param_sizes_ok(a, 3):
        return None
    post = _unique([n for n, g in posts.get(m.node, []) if _is_part(g.affine, (m.n, 2 * m.n), 1, a)])
    comb = _unique([(n, s) for n, s in sinks.get(m.node, []) if _is_part(s.affine, (2 * m.n, m.width), 2, a)])
    if post is None or comb is None or comb[1].eps != gate.eps:
        return None
    return Pre(m, normed, post, comb[0], a.base, a.scale, weight, gate.eps, comb[1].iters)


def _head(normed: fx.Node, weight: fx.Node, eps: float, gate: Gate) -> Fusion | None:
    a, m = gate.affine, gate.affine.mixes
    if m.width != m.n or eps != m.eps or not _is_part(a, (0, m.n), 0, a) or not _param_sizes_ok(a, 1):
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
        sink = _sinkhorn(node) if _is(node, aten.div.Tensor) else None
        if sink is not None and not any(_norm_step(u) and u.args[0] is node for u in node.users):
            sinks.setdefault(sink.affine.mixes.node, []).append((node, sink))
        rms = _weighted_rms(node)
        collapse = _collapse(rms[0]) if rms is not None else None
        gate = _gate(collapse[0]) if collapse is not None else None
        if gate is not None and gate.kind == "pre" and _value(gate.affine.mixes.streams) is _value(collapse[1]):
            normed.append((node, rms[1], rms[2], gate))
        merge = _post(node)
        if merge is not None:
            merges.append(merge)
    return normed, posts, sinks, merges


def find_fusions(graph: fx.Graph) -> list[Fusion]:
    """Every mHC boundary of the graph as the fused op that replaces it (post+pre pairs joined)."""
    normed, posts, sinks, merges = _survey(graph)
    pres, fusions = [], []
    for node, weight, eps, gate in normed:
        pre = _pre(node, weight, eps, gate, posts, sinks)
        head = _head(node, weight, eps, gate) if pre is None else None
        pres += [pre] if pre is not None else []
        fusions += [head] if head is not None else []
    by_outputs = {(p.post, p.comb, _value(p.mixes.streams)) for p in pres}
    next_pre: dict[fx.Node, Pre] = {}
    for pre in pres:
        next_pre.setdefault(_value(pre.mixes.streams), pre)
    joined = set()
    for merge in merges:
        if (merge.post, merge.comb, _value(merge.streams)) not in by_outputs:
            continue
        args, pre = (merge.block_out, merge.streams, merge.post, merge.comb), next_pre.get(_value(merge.new))
        if pre is not None and id(pre) not in joined:
            joined.add(id(pre))
            fusions.append(Fusion("hc_post_pre", args + pre.args()[1:],
                                  (merge.new, pre.normed, pre.post, pre.comb)))
        else:
            fusions.append(Fusion("hc_post", args, (merge.new,)))
    fusions += [Fusion("hc_pre", p.args(), (p.normed, p.post, p.comb)) for p in pres if id(p) not in joined]
    return fusions


# ---- rewriting -----------------------------------------------------------------------------------------
def mhc_fusion(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Replace every matched mHC boundary by its dsv4c op; erase what only the old math read."""
    before = count_nodes(gm)
    if nodes_without_val(gm):  # dims and dtypes are read from meta["val"]
        refresh_fake_values(gm)
    fusions = find_fusions(gm.graph)
    counts = {kind: sum(f.kind == kind for f in fusions) for kind in FUSED}
    if fusions:
        _rewrite(gm.graph, fusions)
        gm.recompile()
    lowering = target_table.mhc_lowering(target_table.target(ctx.target))
    summary = ", ".join(f"{counts[k]} {k}" for k in FUSED)
    return gm, make_record("mhc_fusion", before, gm, len(fusions), f"fused {summary} ({lowering} lowering)",
                           **counts, lowering=lowering)


def _rewrite(graph: fx.Graph, fusions: list[Fusion]) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    replaced: dict[fx.Node, fx.Node] = {}
    mode = graph_fake_mode(graph)
    for fusion in sorted(fusions, key=lambda f: min(order[o] for o in f.outputs)):
        args = tuple(replaced.get(a, a) if isinstance(a, fx.Node) else a for a in fusion.args)
        results = _emit(graph, getattr(torch.ops.dsv4c, fusion.kind).default, args, len(fusion.outputs), mode)
        for old, new in zip(fusion.outputs, results):
            old.replace_all_uses_with(new)
            replaced[old] = new
    _erase_dead_ancestors(graph, [o for f in fusions for o in f.outputs])
    if not _topological(graph):
        _stable_toposort(graph)


def _emit(graph: fx.Graph, op: Any, args: tuple, outputs: int, mode: Any) -> list[fx.Node]:
    """The op's call (after its latest input and the placeholders) and a getitem per output if several."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    anchors = [a for a in args if isinstance(a, fx.Node)] + [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(max(anchors, key=position.__getitem__)):
        call = graph.call_function(op, args)
    _fake_value(call, mode)
    if outputs == 1:
        return [call]
    results, last = [], call
    for i in range(outputs):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (call, i))
        if "val" in call.meta:
            last.meta["val"] = call.meta["val"][i]
        results.append(last)
    return results


def _fake_value(call: fx.Node, mode: Any) -> None:
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in call.args]
    if mode is not None and all(v is not None for v in vals):
        with mode:
            call.meta["val"] = call.target(*vals)


def _erase_dead_ancestors(graph: fx.Graph, roots: list[fx.Node]) -> None:
    erased: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in erased or node.users or node.op != "call_function" or not is_pure(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)


def _topological(graph: fx.Graph) -> bool:
    seen: set[fx.Node] = set()
    for node in graph.nodes:
        if any(i not in seen for i in node.all_input_nodes):
            return False
        seen.add(node)
    return True


def _stable_toposort(graph: fx.Graph) -> None:
    """Reorder so every node follows its inputs, keeping the present order wherever it already does."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(position[n], n) for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, node = heapq.heappop(ready)
        ordered.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (position[user], user))
    for node in reversed(ordered):
        first = next(iter(graph.nodes))
        if first is not node:
            first.prepend(node)
