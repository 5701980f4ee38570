"""KV compression: a cache whose values the model rounds is stored as codes and scales (codegen/kv_cache.py).

Pattern: a step output `state.<name>` that the model declares rounded (`ctx.cache_roundings`, model/step.py
`cache_roundings`: e4m3 for the window and compressed KV, e2m1 for the indexer keys), computed as
    new = aten.scatter.src(P, 1, expand(rows, [..., width]), src)       # P the state placeholder
where src's values come from the declared rounding (`dsv4c::fake_quant_fp8` / `fake_quant_fp4` of that block
size on the first `rounded` dims, the others concatenated after them along the last dim) through ops that keep
each row's values on that rounding's grid: casts between bf16 and fp32, copies, views and slices that leave the
last dim whole, `where(mask, v, 0)`, concatenation along another dim. Then
    P    becomes uint8 [..., row_bytes] (the layout's codes, raw RoPE dims, e8m0 scales)
    new  = aten.scatter.src(P, 1, expand(rows, [..., row_bytes]), dsv4c::kv_pack(src, format, rounded, block))
and every reader of P or of new reads the packed rows: a gather of rows (through unsqueeze / expand / slices that
leave the last dim) gathers bytes and `dsv4c::kv_unpack`s only those rows; any other reader gets the whole cache
unpacked. An output that passes P through unchanged (a state this step does not touch) is only retyped, so every
step variant of an artifact agrees on the layout. Exact: packing values already on the grid and unpacking gives
them back bit for bit (codegen/kv_cache.py), so cached values and logits equal the uncompressed graph's.

Left alone: states not declared (compressor rings, score rings), roundings whose result reaches no cache (the
indexer's query), graphs without output names or without `ctx.cache_roundings`. A declared cache written with
values not proven to be on the grid is an error naming the state (packing it would change the model's numerics).

Before: cleanup and CSE (one node per value), after the fusions that read the caches' neighbours. Where: before
reinplace_state (which then writes the packed rows in place), shape propagation and memory planning.
Debug mode's before/after check (passes/manager.py) follows the retyped placeholders and outputs through their
`STORED_AS` meta: inputs packed going in, outputs unpacked coming out (the compile's random cache inputs lie on
the model's grid, so packing them is exact).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.fx as fx

from dsv4c.codegen import kv_cache  # noqa: F401  (registers dsv4c::kv_pack / kv_unpack, which this pass emits)
from dsv4c.codegen.kv_cache import PackedLayout
from dsv4c.model import rounding_ops  # noqa: F401  (registers the roundings this pass reads)
from dsv4c.passes.graph_match import CASTS, VIEWS, arg, dim, erase_dead_ancestors, is_, is_call, shape
from dsv4c.passes.manager import STORED_AS, PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, graph_fake_mode, tensor_val

aten, dsv4c = torch.ops.aten, torch.ops.dsv4c
STATE_PREFIX = "state."
ROUNDING_OPS = {"e4m3": dsv4c.fake_quant_fp8.default, "e2m1": dsv4c.fake_quant_fp4.default}
EXACT_DTYPES = (torch.bfloat16, torch.float32)  # a rounded block's values pass exactly between these
ROW_COPIES = (aten.alias.default, aten.clone.default, aten.contiguous.default)


class Cache(NamedTuple):
    """One declared cache of the graph: its state placeholder, its write (None: passed through), its layout."""

    name: str
    state: fx.Node
    write: fx.Node | None
    layout: PackedLayout


# ---- matching ------------------------------------------------------------------------------------------
def find_caches(gm: fx.GraphModule, names: tuple[str, ...], roundings: Mapping[str, Any]) -> list[Cache]:
    """The declared caches among the graph's state outputs; ValueError for one written in another form."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    found = []
    for name, value in zip(names, output.args[0]):
        rounding = roundings.get(name[len(STATE_PREFIX):]) if name.startswith(STATE_PREFIX) else None
        if rounding is None:
            continue
        state, write = (value, None) if _is_placeholder(value) else (_written_state(value), value)
        if state is None:
            raise ValueError(f"kv_compression: {name} is not a row scatter into its state input; cannot store it "
                             f"packed")
        val = tensor_val(state)
        layout = PackedLayout(rounding.format, val.shape[-1], rounding.rounded, rounding.block, val.dtype)
        if write is not None and not on_grid(write.args[3], layout):
            raise ValueError(f"kv_compression: {name} is written with values not proven rounded to {layout.format} "
                             f"in blocks of {layout.block}; packing them would change the model's numerics")
        found.append(Cache(name, state, write, layout))
    return found


def _is_placeholder(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder"


def _written_state(node: Any) -> fx.Node | None:
    """P of `scatter.src(P, d, expand(rows, [..., width]), src)` along a dim other than the last, else None."""
    if not is_(node, aten.scatter.src) or not _is_placeholder(node.args[0]):
        return None
    along = dim(node.args[0], node.args[1])
    return node.args[0] if along is not None and along != -1 and _row_index(node.args[2]) is not None else None


def _row_index(index: Any) -> fx.Node | None:
    """rows of `expand(rows, sizes)` where rows' last size is 1 (the same row index for every column)."""
    if not is_(index, aten.expand.default) or (shape(index.args[0]) or (0,))[-1] != 1:
        return None
    return index.args[0]


def is_rounding(node: Any, layout: PackedLayout) -> bool:
    """`node` is the declared rounding of rows of `layout.width`: the rounding op alone (rounded == width), or
    concatenated along the last dim before the raw dims."""
    if layout.rounded < layout.width:
        if not is_(node, aten.cat.default) or dim(node, arg(node, 1, "dim", 0)) != -1:
            return False
        node = node.args[0][0]
    return (is_(node, ROUNDING_OPS[layout.format]) and node.args[1] == layout.block
            and (shape(node) or (0,))[-1] == layout.rounded)


def on_grid(node: Any, layout: PackedLayout) -> bool:
    """Whether every row of node's value is a row of the declared rounding (or zeros), read through ops that
    keep rows whole and values exact."""
    if is_rounding(node, layout):
        return True
    if not isinstance(node, fx.Node) or node.op != "call_function" or (shape(node) or (0,))[-1] != layout.width:
        return False
    if is_(node, aten.cat.default):
        return dim(node, arg(node, 1, "dim", 0)) != -1 and all(on_grid(part, layout) for part in node.args[0])
    if is_(node, aten.where.ScalarOther):
        return node.args[2] == 0 and on_grid(node.args[1], layout)
    source = node.args[0] if node.args else None
    if tensor_val(source) is None:
        return False
    if is_call(node, CASTS):
        exact = tensor_val(node).dtype in EXACT_DTYPES and tensor_val(source).dtype in EXACT_DTYPES
        return exact and on_grid(source, layout)
    return _keeps_rows(node) and on_grid(source, layout)


def _keeps_rows(node: fx.Node) -> bool:
    """A copy or view whose output rows are whole rows of its input (the last dim untouched)."""
    source = node.args[0]
    if is_call(node, ROW_COPIES) or is_call(node, VIEWS) or is_(node, aten.expand.default):
        return (shape(source) or (0,))[-1] == (shape(node) or (1,))[-1]
    if is_(node, aten.unsqueeze.default):
        return dim(node, node.args[1]) != -1
    if is_call(node, (aten.slice.Tensor, aten.select.int)):
        return dim(source, arg(node, 1, "dim", 0)) != -1
    return False


# ---- rewriting -----------------------------------------------------------------------------------------
def _call(graph: fx.Graph, target: Any, args: tuple) -> fx.Node:
    """A new call at the graph's insertion point, with its FakeTensor value."""
    node = graph.call_function(target, args)
    mode = graph_fake_mode(graph)
    vals = fx.node.map_arg(args, lambda a: a.meta.get("val"))
    with mode:
        node.meta["val"] = target(*vals)
    return node


def storage(layout: PackedLayout) -> tuple[Callable, Callable]:
    """(encode, decode) between a cache's values and its packed rows, for debug mode's check (passes/manager.py
    STORED_AS); encode leaves rows that are already packed as they are."""
    return (functools.partial(_encode, layout), functools.partial(_decode, layout))


def _encode(layout: PackedLayout, values: torch.Tensor) -> torch.Tensor:
    if values.dtype == torch.uint8:
        return values
    return dsv4c.kv_pack(values, layout.format, layout.rounded, layout.block)


def _decode(layout: PackedLayout, rows: torch.Tensor) -> torch.Tensor:
    return dsv4c.kv_unpack(rows, layout.format, layout.width, layout.rounded, layout.block, layout.dtype)


def _retype(state: fx.Node, layout: PackedLayout) -> None:
    """The placeholder now holds packed rows: uint8 [..., row_bytes]."""
    val = tensor_val(state)
    with graph_fake_mode(state.graph):
        state.meta["val"] = torch.empty((*val.shape[:-1], layout.row_bytes), dtype=torch.uint8)


def _bytes_index(graph: fx.Graph, index: fx.Node, layout: PackedLayout) -> fx.Node:
    sizes = list(index.args[1])
    return _call(graph, aten.expand.default, (index.args[0], sizes[:-1] + [layout.row_bytes]))


def _unpack(graph: fx.Graph, packed: fx.Node, layout: PackedLayout) -> fx.Node:
    return _call(graph, dsv4c.kv_unpack.default, (packed, layout.format, layout.width, layout.rounded,
                                                  layout.block, layout.dtype))


def _replayed(graph: fx.Graph, user: fx.Node, packed: fx.Node, layout: PackedLayout) -> tuple[fx.Node, bool] | None:
    """`user` (reading the logical cache as its first argument) applied to the packed rows, and whether its
    result is rows to unpack (a gather) rather than a view to follow; None if it cannot be replayed."""
    rest = list(user.args[1:])
    if is_(user, aten.gather.default) and dim(user.args[0], user.args[1]) != -1 and _row_index(user.args[2]):
        index = _bytes_index(graph, user.args[2], layout)
        return _call(graph, aten.gather.default, (packed, user.args[1], index)), True
    if is_(user, aten.expand.default) and _keeps_rows(user):
        return _call(graph, aten.expand.default, (packed, list(user.args[1])[:-1] + [-1])), False
    if is_call(user, (aten.unsqueeze.default, aten.slice.Tensor, aten.select.int)) and _keeps_rows(user):
        return _call(graph, user.target, (packed, *rest)), False
    return None


def route_reads(graph: fx.Graph, logical: fx.Node, packed: fx.Node, layout: PackedLayout,
                skip: frozenset = frozenset()) -> int:
    """Every reader of `logical` (the cache's values; `skip`, the output and the new nodes aside) reads `packed`
    instead, unpacking only the rows it gathers where it can; the number of row reads."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers = sorted((u for u in logical.users if u not in skip and u.op != "output"), key=order.__getitem__)
    whole, rows = None, 0
    for user in readers:
        if is_(user, aten.sym_size.int) and dim(logical, user.args[1]) != -1:
            user.replace_input_with(logical, packed)
            continue
        with graph.inserting_before(user):
            replayed = _replayed(graph, user, packed, layout)
            if replayed is None:
                whole = whole or _unpack(graph, packed, layout)  # before the first reader that needs it
                user.replace_input_with(logical, whole)
                continue
        node, gathered = replayed
        if gathered:
            with graph.inserting_before(user):
                user.replace_all_uses_with(_unpack(graph, node, layout))
            rows += 1
        else:
            rows += route_reads(graph, user, node, layout)
        graph.erase_node(user)
    return rows


def _compress(graph: fx.Graph, cache: Cache) -> int:
    """Store one cache packed; the number of row reads that unpack only what they gather."""
    _retype(cache.state, cache.layout)
    rows, skip, write, layout = 0, frozenset(), cache.write, cache.layout
    if write is not None:
        with graph.inserting_before(write):
            packed = _call(graph, dsv4c.kv_pack.default, (write.args[3], layout.format, layout.rounded, layout.block))
            index = _bytes_index(graph, write.args[2], layout)
            new_write = _call(graph, aten.scatter.src, (cache.state, write.args[1], index, packed))
        rows += route_reads(graph, write, new_write, layout)
        write.replace_all_uses_with(new_write)
        erase_dead_ancestors(graph, [write])
        skip = frozenset({new_write})
    return rows + route_reads(graph, cache.state, cache.state, layout, skip)


# ---- the pass ------------------------------------------------------------------------------------------
def kv_compression(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Store every declared cache packed (module docstring); the record lists each layout."""
    before = count_nodes(gm)
    if ctx.output_names is None or not ctx.cache_roundings:
        return gm, make_record("kv_compression", before, gm, 0, "no declared cache roundings: nothing to pack")
    caches = find_caches(gm, ctx.output_names, ctx.cache_roundings)
    rows = sum(_compress(gm.graph, cache) for cache in caches)
    stored = gm.graph.output_node().meta.setdefault(STORED_AS, {})
    for cache in caches:
        cache.state.meta[STORED_AS] = stored[ctx.output_names.index(cache.name)] = storage(cache.layout)
    gm.recompile()
    written = [c for c in caches if c.write is not None]
    layouts = {c.name[len(STATE_PREFIX):]: c.layout.describe() for c in caches}
    description = (f"{len(written)} caches written packed, {len(caches) - len(written)} passed through; "
                   f"{rows} row reads unpack only the rows they gather")
    return gm, make_record("kv_compression", before, gm, len(written), description, layouts=layouts,
                           row_bytes={name: c.layout.row_bytes for name, c in zip(layouts, caches)},
                           raw_row_bytes={name: c.layout.width * c.layout.dtype.itemsize
                                          for name, c in zip(layouts, caches)})
