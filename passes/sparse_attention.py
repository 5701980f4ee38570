"""Sparse attention: each layer's attention core over packed caches becomes one `dsv4c::sparse_decode_attention`.

Pattern (model/attention.py `attend` over the key sets `attention` builds, once kv_compression stores the caches
packed): one softmax with the sink in its denominator,
    joined = cat([masked_fill(einsum(q, K_i) * scale, ~mask_i, -inf) for each key set], -1)
    peak   = maximum(amax(joined), view(sink, [1, 1, H, 1]));  e = exp(joined - peak)
    probs  = (e / (sum(e) + exp(sink - peak))).to(q.dtype)
    out    = (0.0 + sum_i einsum(probs[..., set i], K_i)).to(q.dtype)
over these key sets, in this order:
- window (first, per query): `token_windows(cat([kv_unpack(gather(RING, ring slots)), NEW], 1), W, T)` with
  mask `key_pos >= 0`; RING packed e4m3 rows, NEW this step's rows on the rounding's grid;
- C4 (optional, per query): `kv_unpack(gather(unsqueeze(CACHE, 1), 2, IDS))` with any mask `valid` (the op
  reads `where(valid, IDS, -1)`);
- C128 (optional, shared): `kv_unpack(CACHE)` with the mask `visible_entries(positions, E, ratio)`.
The ring slots and both position masks are functions of the step's `start` alone; they are checked by value (their
subgraph runs on sample positions against the op's own definition), whatever ops spell them. The replacement reads
RING, kv_pack(NEW) and CACHE packed, so no whole cache is unpacked for attention; it equals the pattern bit for
bit where the op runs its reference (the same `attend` on the same rows; masked entries weigh exactly 0).
The ring's write (a scatter into RING) moves after the op, so reinplace_state can still write it in place.

Left alone: attention over unpacked caches (kv_compression did not run or found no rounding), a key set of
another form or order, masks that differ from the op's at any sample position, sets with different scales, probabilities
rounded to a dtype other than q's.

Before: kv_compression (the caches are packed rows and their reads kv_unpack). Where: before constant folding and
reinplace_state (which must see the ring's write after its last reader) and before shape propagation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from dsv4c.codegen import sparse_attention as decode_attention_op  # noqa: F401  (registers the op this pass emits)
from dsv4c.codegen.kv_cache import PackedLayout
from dsv4c.model.attention import visible_entries
from dsv4c.passes.graph_match import (ADD, SUM, VIEWS, arg, dim, dtype, erase_dead_ancestors, is_, is_call,
                                      is_topological, number, operands, replace_with_op, shape, span,
                                      stable_toposort, static_size, transposed_last2, upcast_source, value_of)
from dsv4c.passes.kv_compression import on_grid
from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, graph_fake_mode

aten, dsv4c = torch.ops.aten, torch.ops.dsv4c
SHARED, PER_QUERY = "bthd,bsd->bths", "bthd,btsd->bths"
SAMPLE_SPAN = 4  # sample positions cover this many rings and windows from 0, plus far positions


class KeySet(NamedTuple):
    """One key set of the softmax: its fp32 keys node, its mask, whether keys are shared by the step's queries."""

    keys: fx.Node
    mask: fx.Node
    shared: bool


class Core(NamedTuple):
    """A matched attention core: q (its dtype), the key sets in order, the sink, the scale and the output."""

    q: fx.Node
    sets: list[KeySet]
    sink: fx.Node
    scale: float
    out: fx.Node


# ---- the softmax and its products -----------------------------------------------------------------------
def sink_softmax(div: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(joined logits, sink [H]) of `exp(x - peak) / (sum(exp(x - peak)) + exp(sink_view - peak))`."""
    if not is_(div, aten.div.Tensor) or not is_(div.args[0], aten.exp.default) or not is_call(div.args[1], ADD):
        return None
    e = div.args[0]
    if not is_(e.args[0], aten.sub.Tensor) or not is_(e.args[0].args[1], aten.maximum.default):
        return None
    joined, peak = e.args[0].args
    amax, sink_view = peak.args
    if not (is_(amax, aten.amax.default) and amax.args[0] is joined and dim(joined, amax.args[1]) == -1):
        return None
    for total, sink_exp in operands(div.args[1]):
        if is_call(total, SUM) and total.args[0] is e and dim(e, total.args[1]) == -1 \
                and is_(sink_exp, aten.exp.default) and is_(sink_exp.args[0], aten.sub.Tensor) \
                and tuple(sink_exp.args[0].args) == (sink_view, peak):
            sink = sink_view.args[0] if is_call(sink_view, VIEWS) else None
            heads = (shape(joined) or (0, 0, 0))[2]
            if sink is not None and shape(sink) == (heads,) and shape(sink_view) == (1, 1, heads, 1):
                return joined, sink
    return None


def masked_logits(node: Any) -> tuple[fx.Node, fx.Node, fx.Node, float, bool] | None:
    """(q fp32, keys fp32, mask, scale, shared) of `masked_fill(einsum(q, K) * scale, ~unsqueeze(mask, 2), -inf)`."""
    if not is_(node, aten.masked_fill.Scalar) or node.args[2] != -math.inf:
        return None
    scaled, hidden = node.args[:2]
    if not is_call(scaled, (aten.mul.Tensor,)) or number(scaled.args[1]) is None \
            or not is_(hidden, aten.bitwise_not.default) or not is_(hidden.args[0], aten.unsqueeze.default) \
            or dim(hidden.args[0], hidden.args[0].args[1]) != -2:
        return None
    product = scaled.args[0]
    if not is_(product, aten.einsum.default) or product.args[0] not in (SHARED, PER_QUERY):
        return None
    q, keys = product.args[1]
    return q, keys, hidden.args[0].args[0], float(scaled.args[1]), product.args[0] == SHARED


def weighted_sums(probs: fx.Node, sets: list[KeySet]) -> fx.Node | None:
    """The output `(0.0 + sum_i einsum(probs[..., set i].float(), K_i)).to(dtype)` of the rounded probabilities."""
    acc, offset = None, 0
    for key_set in sets:
        width = static_size(key_set.keys, -2)
        part = _probs_part(probs, offset, width, len(sets) == 1)
        offset += width or 0
        pattern = "bths,bsd->bthd" if key_set.shared else "bths,btsd->bthd"
        product = _only_user(part, aten.einsum.default)
        if part is None or product is None or product.args[0] != pattern \
                or list(product.args[1]) != [part, key_set.keys]:
            return None
        step = _only_user(product, aten.add.Tensor) if acc is None else _only_user(acc, aten.add.Tensor)
        if step is None or (acc is None and list(step.args) != [product, 0.0]) \
                or (acc is not None and (acc, product) not in operands(step)):
            return None
        acc = step
    out = _only_user(acc, aten.to.dtype)
    return out if out is not None and dtype(out) == dtype(probs) else None


def _probs_part(probs: fx.Node, start: int, width: int | None, whole: bool) -> fx.Node | None:
    """The fp32 upcast of probs' columns [start, start + width) (all of them when `whole`)."""
    for user in probs.users:
        if whole:
            return user if is_(user, aten.to.dtype) and dtype(user) == torch.float32 else None
        source = None
        if is_(user, aten.slice.Tensor) and dim(probs, arg(user, 1, "dim", 0)) == -1 and arg(user, 4, "step", 1) == 1:
            bounds = span(arg(user, 2, "start"), arg(user, 3, "end"), static_size(probs, -1))
            source = user if width is not None and bounds == (start, start + width) else None
        cast = _only_user(source, aten.to.dtype) if source is not None else None
        if cast is not None and dtype(cast) == torch.float32:
            return cast
    return None


def _only_user(node: Any, target: Any) -> fx.Node | None:
    users = list(node.users) if isinstance(node, fx.Node) else []
    return users[0] if len(users) == 1 and is_(users[0], target) else None


def attention_core(div: fx.Node) -> Core | None:
    """The attention core whose sink softmax is `div`, or None."""
    softmax = sink_softmax(div)
    probs = _only_user(div, aten.to.dtype)
    if softmax is None or probs is None or not is_(softmax[0], aten.cat.default) \
            or dim(softmax[0], arg(softmax[0], 1, "dim", 0)) != -1:
        return None
    parts = [masked_logits(p) for p in softmax[0].args[0]]
    if not parts or any(p is None for p in parts) or len({(p[0], p[3]) for p in parts}) != 1:
        return None
    q = upcast_source(parts[0][0])
    if dtype(q) != dtype(probs) or dtype(parts[0][0]) != torch.float32:
        return None
    sets = [KeySet(keys, mask, shared) for _, keys, mask, _, shared in parts]
    out = weighted_sums(probs, sets)
    return Core(q, sets, softmax[1], parts[0][3], out) if out is not None else None


# ---- the key sets over packed rows ---------------------------------------------------------------------
class Window(NamedTuple):
    ring: fx.Node
    slots: fx.Node  # [B, C, 1]: the ring slot of each timeline position
    new: fx.Node
    width: int
    layout: PackedLayout


def _unpacked(node: Any) -> tuple[fx.Node, PackedLayout] | None:
    """(packed rows, layout) of an e4m3 `kv_unpack`."""
    if not is_(node, dsv4c.kv_unpack.default) or node.args[1] != "e4m3":
        return None
    return node.args[0], PackedLayout(*node.args[1:])


def window_set(key_set: KeySet) -> Window | None:
    """The window's ring, slot index and new rows, if `key_set` reads `token_windows(ring_timeline(...))`."""
    windows = transposed_last2(upcast_source(key_set.keys))
    if key_set.shared or not is_(windows, aten.slice.Tensor) or arg(windows, 4, "step", 1) != 1:
        return None
    unfold, steps = windows.args[0], static_size(key_set.mask, 1)
    if not is_(unfold, aten.unfold.default) or dim(unfold.args[0], unfold.args[1]) != -2 or unfold.args[3] != 1:
        return None
    size = static_size(unfold, 1)
    if dim(unfold, windows.args[1]) != -3 or span(arg(windows, 2, "start"), arg(windows, 3, "end"), size) \
            != (size - steps, size):
        return None
    line = unfold.args[0]
    if not is_(line, aten.cat.default) or len(line.args[0]) != 2 or dim(line, arg(line, 1, "dim", 0)) != -2:
        return None
    old, new = line.args[0][0], value_of(line.args[0][1])
    unpacked = _unpacked(old)
    if unpacked is None or not is_(unpacked[0], aten.gather.default) or dim(unpacked[0], unpacked[0].args[1]) != -2:
        return None
    rows, layout = unpacked
    index = rows.args[2]
    if not is_(index, aten.expand.default) or (shape(index.args[0]) or (0,))[-1] != 1:
        return None
    if dtype(new) != layout.dtype or static_size(new, 1) != steps or not on_grid(new, layout):
        return None
    return Window(rows.args[0], index.args[0], new, unfold.args[2], layout)


def selected_set(key_set: KeySet) -> tuple[fx.Node, fx.Node, PackedLayout] | None:
    """(packed cache, ids [B, T, K], layout) of `kv_unpack(gather(unsqueeze(cache, 1), 2, ids))`."""
    unpacked = _unpacked(upcast_source(key_set.keys))
    if key_set.shared or unpacked is None or not is_(unpacked[0], aten.gather.default):
        return None
    rows, layout = unpacked
    source, index = rows.args[0], rows.args[2]
    while is_(source, aten.expand.default):
        source = source.args[0]
    if not is_(source, aten.unsqueeze.default) or dim(source, source.args[1]) != -3 or dim(rows, rows.args[1]) != -2:
        return None
    if not is_(index, aten.expand.default) or not is_(index.args[0], aten.unsqueeze.default) \
            or (shape(index.args[0]) or (0,))[-1] != 1:
        return None
    ids = index.args[0].args[0]
    return (source.args[0], ids, layout) if dtype(ids) == torch.int64 and shape(ids) == shape(key_set.mask) else None


def all_entries_set(key_set: KeySet) -> tuple[fx.Node, PackedLayout] | None:
    """(packed cache, layout) of a shared `kv_unpack(cache)`."""
    unpacked = _unpacked(upcast_source(key_set.keys))
    return unpacked if key_set.shared and unpacked is not None else None


# ---- position tensors, checked by value ------------------------------------------------------------------
def evaluate_at_starts(gm: fx.GraphModule, node: fx.Node, start: fx.Node, starts: torch.Tensor) -> torch.Tensor | None:
    """node's value for `start = starts`, when `start` is the only input it reads (None otherwise)."""
    needed, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in needed:
            needed.add(current)
            stack.extend(current.all_input_nodes)
    if any(n.op == "placeholder" and n is not start for n in needed):
        return None
    graph, env = fx.Graph(), {}
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[node])
    try:
        return fx.GraphModule(gm, graph)(*([starts] if start in needed else []))
    except (RuntimeError, IndexError, TypeError):
        return None


def start_input(slots: fx.Node) -> fx.Node | None:
    """The one int64 `[B]` placeholder the ring slots are computed from."""
    found, stack, seen = [], [slots], set()
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
            found += [node] if node.op == "placeholder" else []
    return found[0] if len(found) == 1 and dtype(found[0]) == torch.int64 and len(shape(found[0]) or ()) == 1 else None


def sample_starts(slots: int, window: int, steps: int) -> torch.Tensor:
    """Positions from 0 over a few rings and windows, and far ones (rings wrapped many times, 1M context)."""
    near = torch.arange(SAMPLE_SPAN * (slots + window + steps))
    return torch.cat((near, torch.tensor([4093, 65_536 - steps, 1_000_003, 2 ** 20 - steps])))


def positions_agree(gm: fx.GraphModule, core: Core, window: Window, start: fx.Node, ratio: int) -> bool:
    """The ring slots, the window mask and (C128, `ratio`) the visibility mask equal the op's at sample starts."""
    slots, steps = static_size(window.ring, 1), static_size(window.new, 1)
    starts = sample_starts(slots, window.width, steps)
    positions = starts.unsqueeze(1) + torch.arange(steps)
    want_slots = (starts.unsqueeze(1) - slots + torch.arange(slots)) % slots
    key_pos = positions.unsqueeze(-1) - window.width + 1 + torch.arange(window.width)
    checks = [(window.slots, want_slots.unsqueeze(-1)), (core.sets[0].mask, key_pos >= 0)]
    if ratio and core.sets[-1].shared:
        entries = static_size(core.sets[-1].keys, -2)
        checks.append((core.sets[-1].mask, visible_entries(positions, entries, ratio)))
    for node, want in checks:
        got = evaluate_at_starts(gm, node, start, starts)
        if got is None or got.shape != want.shape or not torch.equal(got.to(want.dtype), want):
            return False
    return True


def mask_ratio(mask: fx.Node) -> int:
    """The divisor of the floor division in a visibility mask's subgraph (0 when there is none)."""
    stack, seen = [mask], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_(node, aten.floor_divide.default) and isinstance(node.args[1], int):
            return node.args[1]
        stack.extend(node.all_input_nodes)
    return 0


# ---- rewriting -----------------------------------------------------------------------------------------
SELECTED_RATIO = 4  # the op's ratio for a C4 set: any ratio > 0 with ids selects the sparse path


class Match(NamedTuple):
    """What the op reads for one matched core."""

    core: Core
    window: Window
    start: fx.Node
    cache: fx.Node | None
    ids: fx.Node | None  # the C4 set's ids (their mask in core.sets[1])
    ratio: int


def match(gm: fx.GraphModule, div: fx.Node) -> Match | None:
    """The op's reads for the attention core around `div`, or None for a near miss."""
    core = attention_core(div)
    window = window_set(core.sets[0]) if core is not None and len(core.sets) <= 2 else None
    start = start_input(window.slots) if window is not None else None
    if start is None or static_size(core.q, -1) != window.layout.width:
        return None
    cache, ids, ratio, layout = None, None, 0, window.layout
    if len(core.sets) == 2:
        selected, every = selected_set(core.sets[1]), all_entries_set(core.sets[1])
        if selected is not None:
            cache, ids, layout = selected
            ratio = SELECTED_RATIO
        elif every is not None:
            (cache, layout), ratio = every, mask_ratio(core.sets[1].mask)
        if cache is None or not ratio or layout != window.layout:
            return None
    if not positions_agree(gm, core, window, start, ratio if ids is None else 0):
        return None
    return Match(core, window, start, cache, ids, ratio)


def _new(graph: fx.Graph, target: Any, args: tuple) -> fx.Node:
    """A new call at the insertion point, with its FakeTensor value."""
    node = graph.call_function(target, args)
    with graph_fake_mode(graph):
        node.meta["val"] = target(*fx.node.map_arg(args, lambda a: a.meta["val"]))
    return node


def _packed_new(graph: fx.Graph, window: Window) -> fx.Node:
    """kv_pack of the step's rows: the ring write's own pack when it exists, else a new one."""
    layout = window.layout
    args = (window.new, layout.format, layout.rounded, layout.block)
    existing = [u for u in window.new.users if is_(u, dsv4c.kv_pack.default) and tuple(u.args) == args]
    if existing:
        return existing[0]
    with graph.inserting_after(window.new):
        return _new(graph, dsv4c.kv_pack.default, args)


def _op_ids(graph: fx.Graph, m: Match) -> fx.Node:
    """`where(valid, ids, -1)` for a C4 set; an empty `[B, T, 0]` int64 view of q's shape otherwise."""
    if m.ids is not None:
        with graph.inserting_after(max((m.ids, m.core.sets[1].mask), key=_position(graph).__getitem__)):
            return _new(graph, aten.where.ScalarOther, (m.core.sets[1].mask, m.ids, -1))
    with graph.inserting_after(m.core.q):
        empty = _new(graph, aten.slice.Tensor, (m.core.q, 3, 0, 0))
        row = _new(graph, aten.select.int, (empty, 2, 0))
        return _new(graph, aten.to.dtype, (row, torch.int64))


def _position(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def rewrite(graph: fx.Graph, m: Match) -> fx.Node:
    """Put the op where the core's output was; the ring's write follows it. Returns the op's node."""
    window, core = m.window, m.core
    layout = window.layout
    cache = m.cache if m.cache is not None else window.ring
    args = (core.q, _packed_new(graph, window), window.ring, cache, _op_ids(graph, m), m.start, core.sink,
            core.scale, window.width, m.ratio, layout.rounded, layout.block)
    old = core.out
    (op,) = replace_with_op(graph, dsv4c.sparse_decode_attention.default, args, (old,))
    erase_dead_ancestors(graph, [old])
    if not is_topological(graph):
        stable_toposort(graph)
    order = _position(graph)
    for write in [u for u in window.ring.users if is_(u, aten.scatter.src) and u.args[0] is window.ring]:
        if order[write] < order[op]:
            op.append(write)
    return op


# ---- the pass ------------------------------------------------------------------------------------------
def sparse_attention(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Replace every matched attention core by `dsv4c::sparse_decode_attention` (module docstring)."""
    before = count_nodes(gm)
    softmaxes = [n for n in gm.graph.nodes if is_(n, aten.div.Tensor) and sink_softmax(n) is not None]
    matches = [m for m in (match(gm, d) for d in softmaxes) if m is not None]
    kinds = [("C4" if m.ids is not None else f"C{m.ratio}" if m.ratio else "window") for m in matches]
    for m in matches:
        rewrite(gm.graph, m)
    gm.graph.lint()
    gm.recompile()
    description = (f"{len(matches)} attention cores read packed rows ({', '.join(kinds) or 'none'}); "
                   f"{len(softmaxes) - len(matches)} sink softmaxes left alone")
    return gm, make_record("sparse_attention", before, gm, len(matches), description, kinds=kinds)
