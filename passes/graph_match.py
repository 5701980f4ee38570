"""Reading the math of an aten graph, for fusion passes: what to look through, common pieces, one rewrite.

A fusion pass matches by what nodes compute, whichever way the graph spells it: torch.export's ops
(`linear`, `matmul`, `softmax`, `to`) or AOTAutograd's decompositions (`mm` between views, `bmm` between
expanded views, `amax`/`exp`/`sum`/`div`, `convert_element_type`). The readers here return the inputs of
a piece or None; every one reads dims and dtypes from FakeTensor `meta["val"]`, normalises dims to
negative indices and accepts commuted operands. What they look through never changes a value:
- casts up to fp32 (from fp16, bf16 or fp32: exact) — a cast down rounds, so it is never looked through;
- views that only merge or split dims, identity expands and copies (when a matcher asks for them).
`replace_with_op` puts one op call where a match's outputs were and erases what only they read.
"""

from __future__ import annotations

import collections
import heapq
import operator
from typing import Any, Callable, Iterable, Sequence

import sympy
import torch
import torch.fx as fx

from dsv4c.passes.op_facts import graph_fake_mode, is_pure, sym_tuple, tensor_val

aten, prims = torch.ops.aten, torch.ops.prims


def _overloads(*names: str) -> frozenset:
    """The named `aten` / `prims` overloads this torch has (a missing one is left out, not an error)."""
    found = set()
    for name in names:
        namespace, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None and hasattr(packet, overload):
            found.add(getattr(packet, overload))
    return frozenset(found)


CASTS = _overloads("aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default",
                   "prims.convert_element_type.default")
VIEWS = _overloads("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
                   "aten.flatten.using_ints", "aten.unflatten.int")
COPIES = _overloads("aten.clone.default", "aten.contiguous.default", "aten.alias.default", "aten.expand.default")
TRANSPOSES = _overloads("aten.numpy_T.default", "aten.t.default", "aten.permute.default", "aten.transpose.int")
SOFTMAX = _overloads("aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default")
ADD = _overloads("aten.add.Tensor", "aten.add.Scalar")
MUL = _overloads("aten.mul.Tensor", "aten.mul.Scalar")
SUM = _overloads("aten.sum.dim_IntList")


# ---- nodes and their metadata ------------------------------------------------------------------------
def is_call(node: Any, targets: Iterable) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_(node: Any, target: Any) -> bool:
    return is_call(node, (target,))


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)


def shape(node: Any) -> tuple[sympy.Expr, ...] | None:
    val = tensor_val(node)
    return sym_tuple(val.shape) if val is not None else None


def rank(node: Any) -> int:
    return len(shape(node) or ())


def dtype(node: Any) -> torch.dtype | None:
    val = tensor_val(node)
    return val.dtype if val is not None else None


def number(value: Any) -> float | None:
    """A Python int/float literal as a float, else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def dim(node: Any, value: Any) -> int | None:
    """`value` (an int or a one-int list) as a negative dim of node's value; None otherwise."""
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) == 1 else None
    if not isinstance(value, int) or shape(node) is None:
        return None
    return value - rank(node) if value >= 0 else value


def operands(node: fx.Node) -> list[tuple[Any, Any]]:
    """Both orders of a commutative op's two operands (none for `add` with an alpha other than 1)."""
    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return []
    a, b = node.args
    return [(a, b), (b, a)]


def same_sizes(a: Any, b: Any) -> bool:
    """Equal size tuples (symbolic sizes compared as expressions); False when either is unknown."""
    return a is not None and b is not None and len(a) == len(b) and all(
        sympy.simplify(x - y) == 0 for x, y in zip(a, b))


def numel(sizes: tuple[sympy.Expr, ...]) -> sympy.Expr:
    return sympy.Mul(*sizes) if sizes else sympy.Integer(1)


def static_size(node: Any, at: int) -> int | None:
    """The size of dim `at` of node's value when it is a known integer."""
    sizes = shape(node)
    return int(sizes[at]) if sizes and -len(sizes) <= at < len(sizes) and sizes[at].is_Integer else None


def span(start: Any, stop: Any, size: int | None) -> tuple[int, int] | None:
    """Python slice bounds (None, negative, past the end) as a [start, stop) range; None unless literal."""
    if size is None or not all(b is None or isinstance(b, int) for b in (start, stop)):
        return None
    return slice(start, stop).indices(size)[:2]


def _last_dim_slice(node: Any) -> tuple[fx.Node, int, int] | None:
    """(input, start, stop) of a unit-step slice along the last dim with literal bounds."""
    if not is_(node, aten.slice.Tensor) or dim(node.args[0], arg(node, 1, "dim", 0)) != -1 \
            or arg(node, 4, "step", 1) != 1:
        return None
    bounds = span(arg(node, 2, "start"), arg(node, 3, "end"), static_size(node.args[0], -1))
    return (node.args[0], *bounds) if bounds is not None else None


# ---- what to look through ------------------------------------------------------------------------------
def cast_input(node: Any) -> fx.Node | None:
    """The input of a dtype cast that stays on its device, else None."""
    if not is_call(node, CASTS) or not isinstance(node.args[0], fx.Node):
        return None
    inner, outer = tensor_val(node.args[0]), tensor_val(node)
    return node.args[0] if inner is not None and outer is not None and inner.device == outer.device else None


def upcast_source(node: Any) -> Any:
    """Node with casts that lose nothing looked through: fp16 / bf16 / fp32 -> fp32."""
    while (source := cast_input(node)) is not None and dtype(node) == torch.float32 \
            and dtype(source) in (torch.float32, torch.bfloat16, torch.float16):
        node = source
    return node


def downcast_source(node: fx.Node) -> fx.Node | None:
    """The fp32 input of a cast to node's dtype (a rounding the fused op must make too), else None."""
    source = cast_input(node)
    return source if source is not None and dtype(source) == torch.float32 else None


def strip(node: Any, targets: Iterable) -> Any:
    """Node with shape-preserving calls of `targets` (copies, identity expands) looked through."""
    while is_call(node, targets) and shape(node) == shape(node.args[0]):
        node = node.args[0]
    return node


def value_of(node: Any) -> Any:
    """The node whose value node holds: copies, identity expands and same-dtype casts looked through."""
    while True:
        inner = strip(node, COPIES)
        if cast_input(inner) is not None and dtype(inner) == dtype(inner.args[0]):
            inner = inner.args[0]
        if inner is node:
            return node
        node = inner


# ---- common pieces ---------------------------------------------------------------------------------------
def rms_factor(node: Any) -> tuple[fx.Node, float] | None:
    """`rsqrt(mean(x^2, -1, keepdim) + eps)` (mean, or sum / size) -> (x, eps)."""
    node = upcast_source(node)
    if not is_(node, aten.rsqrt.default) or not is_call(node.args[0], ADD):
        return None
    for mean, eps in operands(node.args[0]):
        x = _mean_square_input(mean)
        if x is not None and number(eps) is not None:
            return x, float(eps)
    return None


def _mean_square_input(node: Any) -> fx.Node | None:
    if is_(node, aten.mean.dim) and dim(node.args[0], node.args[1]) == -1 and arg(node, 2, "keepdim"):
        return _square_input(node.args[0])
    if is_(node, aten.div.Tensor) and is_call(node.args[0], SUM):
        total = node.args[0]
        sizes = shape(total.args[0])
        if dim(total.args[0], total.args[1]) == -1 and arg(total, 2, "keepdim") and sizes \
                and number(node.args[1]) == sizes[-1]:
            return _square_input(total.args[0])
    return None


def _square_input(node: Any) -> fx.Node | None:
    if is_(node, aten.square.default) or is_(node, aten.pow.Tensor_Scalar) and number(node.args[1]) == 2:
        return node.args[0]
    if is_call(node, MUL) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def weighted_rms(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """`(x.float() * rms_factor(x.float()) * w.float()).to(x.dtype)`, muls in any order -> (x, w, eps)."""
    core = node if dtype(node) == torch.float32 else downcast_source(node)
    if not is_call(core, MUL):
        return None
    for normed, weight in operands(core):
        for x, factor in operands(normed) if is_call(normed, MUL) else []:
            rms = rms_factor(factor)
            w = upcast_source(weight)
            if rms is not None and rms[0] is x and dtype(upcast_source(x)) == dtype(node) and rank(w) == 1:
                return upcast_source(x), w, rms[1]
    return None


def rows_source(node: Any) -> Any:
    """The `[..., K]` tensor that a 2-D `[N, K]` view flattens (before an mm), else node."""
    if is_call(node, VIEWS) and rank(node) == 2:
        inner, outer = shape(node.args[0]), shape(node)
        if inner and inner[-1] == outer[-1] and sympy.simplify(numel(inner) - numel(outer)) == 0:
            return node.args[0]
    return node


def transposed(node: Any) -> fx.Node | None:
    """The 2-D weight that `w.T` reads."""
    if not is_call(node, TRANSPOSES) or rank(node.args[0]) != 2:
        return None
    if is_(node, aten.permute.default) and list(node.args[1]) not in ([1, 0], [-1, -2]):
        return None
    if is_(node, aten.transpose.int) and {dim(node, node.args[1]), dim(node, node.args[2])} != {-1, -2}:
        return None
    return node.args[0]


def linear(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """`x @ w.T` as linear, matmul or mm between views -> (x `[..., K]`, w `[M, K]`)."""
    if is_(node, aten.linear.default) and arg(node, 2, "bias") is None:
        return node.args[0], node.args[1]
    if is_call(node, VIEWS) and is_(node.args[0], aten.mm.default):
        x, w = rows_source(node.args[0].args[0]), transposed(node.args[0].args[1])
        return (x, w) if w is not None and same_sizes(shape(x)[:-1], shape(node)[:-1]) else None
    if is_call(node, (aten.matmul.default, aten.mm.default)):
        w = transposed(node.args[1])
        return (node.args[0], w) if w is not None else None
    return None


def softmax_input(node: Any) -> fx.Node | None:
    """x of `softmax(x, -1)`, whole or decomposed as `exp(x - amax(x)) / sum(exp(x - amax(x)))`."""
    if is_call(node, SOFTMAX) and dim(node.args[0], node.args[1]) == -1 \
            and not (len(node.args) > 2 and node.args[2]) and node.kwargs.get("dtype") is None:
        return node.args[0]  # (a dtype, or half_to_float, would cast inside)
    if is_(node, aten.div.Tensor) and is_(node.args[0], aten.exp.default) and is_call(node.args[1], SUM):
        e, total = node.args
        if total.args[0] is e and dim(e, total.args[1]) == -1 and is_(e.args[0], aten.sub.Tensor):
            x, peak = e.args[0].args
            if is_(peak, aten.amax.default) and peak.args[0] is x and dim(x, peak.args[1]) == -1:
                return x
    return None


def transposed_last2(node: Any) -> fx.Node | None:
    """x of `x.transpose(-1, -2)` (transpose, or a permute swapping only the last two dims)."""
    node = value_of(node)
    n = rank(node)
    if is_(node, aten.transpose.int) and {dim(node, node.args[1]), dim(node, node.args[2])} == {-1, -2}:
        return node.args[0]
    if is_(node, aten.permute.default) and n >= 2 \
            and [d % n for d in node.args[1]] == list(range(n - 2)) + [n - 1, n - 2]:
        return node.args[0]
    return None


def _batch_source(node: Any) -> Any:
    """x `[..., r, c]` that a `[N, r, c]` view of it (through an identity expand) flattens, else node."""
    if not is_call(node, VIEWS):
        return node
    source = strip(node.args[0], (aten.expand.default,))
    inner, outer = shape(source), shape(node)
    if inner and outer and len(outer) == 3 and same_sizes(inner[-2:], outer[-2:]) \
            and sympy.simplify(numel(inner) - numel(outer)) == 0:
        return source
    return node


def batched_matmul(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) of `a @ b` over equal leading dims: matmul, or bmm between views (AOTAutograd's form)."""
    if is_(node, aten.matmul.default):
        a, b = node.args
    elif is_call(node, VIEWS) and is_(node.args[0], aten.bmm.default):
        a, b = (_batch_source(x) for x in node.args[0].args)
    else:
        return None
    lead = (shape(node) or ())[:-2]
    return (a, b) if same_sizes((shape(a) or ())[:-2], lead) and same_sizes((shape(b) or ())[:-2], lead) else None


def split_part(node: Any, last: bool) -> tuple[fx.Node, int, int] | None:
    """getitem of split_with_sizes / split / unbind along the first (or last) dim -> (tensor, start, stop)."""
    if not (isinstance(node, fx.Node) and node.target is operator.getitem):
        return None
    split, index = node.args
    if not is_call(split, (aten.split_with_sizes.default, aten.split.Tensor, aten.unbind.int)):
        return None
    source = split.args[0]
    along = dim(source, arg(split, 1 if is_(split, aten.unbind.int) else 2, "dim", 0))
    if along != (-1 if last else -rank(source)):
        return None
    if is_(split, aten.unbind.int):
        return source, index, index + 1
    sizes = split.args[1]
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes] * (index + 1)
    if not all(isinstance(size, int) for size in sizes[:index + 1]):
        return None
    return source, sum(sizes[:index]), sum(sizes[:index + 1])


def columns(node: Any) -> tuple[fx.Node, int, int]:
    """(tensor, start, stop): the last-dim columns node takes (a view splitting the last dim looked through);
    the whole last dim of node itself when it takes none."""
    inner, outer = shape(node.args[0]) if is_call(node, VIEWS) else None, shape(node)
    if inner and outer and len(outer) == len(inner) + 1 and same_sizes(inner[:-1], outer[:-2]):
        node = node.args[0]
    part = _last_dim_slice(node) or split_part(node, last=True)
    if part is not None:
        return part
    width = static_size(node, -1)
    return node, 0, -1 if width is None else width


def param_part(node: Any) -> tuple[fx.Node, int, int] | None:
    """(1-D tensor, start, stop) that node reads of it: a slice, split part or element, or all of it
    (upcasts and a reshape of the part looked through)."""
    node = upcast_source(node)
    if is_call(node, VIEWS) and same_sizes((numel(shape(node) or ()),), (numel(shape(node.args[0]) or ()),)):
        node = upcast_source(node.args[0])
    part = split_part(node, last=False) or _last_dim_slice(node)  # (a 2-D source is refused below)
    size = static_size(node.args[0], 0) if is_(node, aten.select.int) else None
    if part is None and size is not None and node.args[1] in (0, -1) and isinstance(node.args[2], int):
        part = node.args[0], node.args[2] % size, node.args[2] % size + 1
    if part is None and rank(node) == 1 and static_size(node, 0) is not None:
        part = node, 0, static_size(node, 0)
    if part is None:
        return None
    source = upcast_source(part[0])
    return (source, part[1], part[2]) if rank(source) == 1 else None


# ---- values of subgraphs -------------------------------------------------------------------------------
def nearest_ancestor(node: fx.Node, wanted: Callable[[fx.Node], bool], limit: int) -> fx.Node | None:
    """The first node for which `wanted` holds, searching back from node (itself first) breadth-first, at most
    `limit` nodes."""
    queue, seen = collections.deque([node]), {node}
    while queue and len(seen) <= limit:
        current = queue.popleft()
        if wanted(current):
            return current
        for source in current.all_input_nodes:
            if source not in seen:
                seen.add(source)
                queue.append(source)
    return None


def subgraph_values(gm: fx.GraphModule, outputs: list[fx.Node], given: dict[fx.Node, torch.Tensor]) -> list | None:
    """The outputs' values when the `given` nodes hold the given values (constants as the graph holds them), or
    None if another placeholder feeds them or the subgraph fails on those values: how a pass checks by value that
    a subgraph computes a known function, whatever ops spell it."""
    needed, stack = set(), list(outputs)
    while stack:
        current = stack.pop()
        if current not in needed:
            needed.add(current)
            stack.extend(current.all_input_nodes if current not in given else [])
    if any(n.op == "placeholder" and n not in given for n in needed):
        return None
    graph, env = fx.Graph(), {}
    inputs = [n for n in gm.graph.nodes if n in given and n in needed]
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    for node in gm.graph.nodes:
        if node in needed and node not in env:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output([env[n] for n in outputs])
    try:
        return list(fx.GraphModule(gm, graph)(*[given[n] for n in inputs]))
    except (RuntimeError, IndexError, TypeError, ValueError):
        return None


# ---- rewriting ---------------------------------------------------------------------------------------------
def replace_with_op(graph: fx.Graph, op: Any, args: tuple, old_outputs: tuple[fx.Node, ...]) -> list[fx.Node]:
    """Call `op(*args)` after its latest input (and the placeholders); its outputs (getitems when there are
    several) take over every use of `old_outputs`. Returns the new output nodes. Dead matched nodes stay
    until `erase_dead_ancestors`; when a moved use now precedes its value, `stable_toposort` repairs it."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    anchors = [a for a in args if isinstance(a, fx.Node)] + [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(max(anchors, key=position.__getitem__)):
        call = graph.call_function(op, args)
    _fake_value(call)
    results, last = [call], call
    if len(old_outputs) > 1:
        results = []
        for i in range(len(old_outputs)):
            with graph.inserting_after(last):
                last = graph.call_function(operator.getitem, (call, i))
            if "val" in call.meta:
                last.meta["val"] = call.meta["val"][i]
            results.append(last)
    for old, new in zip(old_outputs, results):
        old.replace_all_uses_with(new)
    return results


def _fake_value(call: fx.Node) -> None:
    """`meta["val"]` of a new call from its op's fake function, in the graph's FakeTensorMode."""
    mode = graph_fake_mode(call.graph)
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in call.args]
    if mode is not None and all(v is not None for v in vals):
        with mode:
            call.meta["val"] = call.target(*vals)


def erase_dead_ancestors(graph: fx.Graph, roots: Iterable[fx.Node]) -> int:
    """Erase the roots and, transitively, their inputs, as long as they are pure and unused; the count."""
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
    return len(erased)


def is_topological(graph: fx.Graph) -> bool:
    seen: set[fx.Node] = set()
    for node in graph.nodes:
        if any(i not in seen for i in node.all_input_nodes):
            return False
        seen.add(node)
    return True


def stable_toposort(graph: fx.Graph) -> None:
    """Reorder so that every node follows its inputs, keeping the present order wherever it already does."""
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


def linear_product(node: fx.Node) -> fx.Node | None:
    """The fp32 product a linear's output `node` is: the product under node's bf16 cast (the product's only
    reader), or node itself when it is the fp32 product; None otherwise."""
    product = downcast_source(node) if dtype(node) == torch.bfloat16 else node
    if product is None or dtype(product) != torch.float32 or product is not node and len(product.users) != 1:
        return None
    return product


def operands_fit(check: Callable[..., Any], vals: Sequence[Any], out_dtype: torch.dtype) -> bool:
    """Whether an op's operand check (its fake function's) accepts these meta values and output dtype."""
    if any(v is None for v in vals):
        return False
    try:
        check(*vals, out_dtype)
    except ValueError:
        return False
    return True
