"""Compressor fusion: each KV compressor's step becomes one `dsv4c::compress_step_` writing its state in place.

Pattern (model/attention.py `compress` once kv_compression stores its cache packed), with the cache's state P
(packed rows), the rings K and S (placeholders), this step's kv rows NEW and score projection SP (`[B, T, F]` fp32):
    score   = SP + index(ape, [IDX])                                    # IDX = (start + t) % ratio
    line(R) = cat([gather(R, 1, expand(SLOTS)), new_rows], 1)           # ring_timeline
    win(R)  = transpose(slice(unfold(line(R), 1, W, 1), 1, -T), -1, -2)  # token_windows
    kv_w, score_w = win(K), win(S)       (C4, W = 2 * ratio: columns [0, width) of the first `ratio` slots and
                                          [width, 2 * width) of the others, concatenated along the slots)
    pooled  = sum(softmax(score_w, -2) * kv_w, -2).to(dtype)
    roped   = cat([normed[..., :-r], rotated(normed[..., -r:], cos, sin).to(dtype)], -1)
              with normed = rms_norm(pooled, norm_weight, eps)
    FIN     = the cache's declared rounding of f(roped), f the identity or the Hadamard transform
    P'      = scatter.src(P, 1, expand(ROWS), kv_pack(where(DONE, FIN, 0), ...))      # kv_compression's write
    K', S'  = scatter.src(K, 1, expand(WSLOTS), NEW[:, T - kept:]), the same for S with score
The functions of `start` (SLOTS, IDX, DONE, ROWS, WSLOTS) are checked by value on sample positions whatever ops
spell them (as passes/sparse_attention.py checks its masks), and f by value on random rows: bit for bit. cos and
sin are the op's inputs as they are, so their values need no check. The replacement
    op = compress_step_(P, K, S, NEW, SP, ape, norm_weight, cos, sin, start, ratio, eps, format, rounded, block,
                        rotate, dtype)
takes P''s place (every reader of the new cache reads the op's result, an in-place alias of P), and the outputs
K' and S' become K and S themselves, which the op has written. Exact on CPU: the op's reference is the same math
with the model's functions, so the graph after equals the graph before bit for bit.

Writing in place is this pass's job because the op writes in place (codegen/compressor.py says why): it needs the
contract reinplace_state needs, checked here: output names (a captured step: the caller hands its state over),
P', K' and S' graph outputs named `state.*`, K' and S' read by nothing else, and P, K and S read by nothing but the
pattern (and `sym_size`), so no reader of an old value follows the write.

Left alone: caches not packed (kv_compression found no rounding), write rows of another form, positions that differ
from the op's at any sample, a transform before the rounding other than the two, a softmax over another dim, the
old ring or cache read elsewhere, graphs without output names (torch.compile's).

Before: kv_compression (the cache's write is its packed row scatter). Where: after the passes that read the packed
caches (sparse_attention and the Lightning Indexer match kv_compression's row scatter as the cache's node; the op's
result then takes its place in their ops), before constant folding, reinplace_state and shape propagation.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import torch
import torch.fx as fx

from dsv4c.codegen import compressor  # (also registers the op this pass emits)
from dsv4c.codegen.kv_cache import PackedLayout
from dsv4c.model.quant import hadamard
from dsv4c.passes.graph_match import (ADD, MUL, SOFTMAX, SUM, arg, dim, downcast_source, dtype, erase_dead_ancestors,
                                      is_, is_call, nearest_ancestor, operands, shape, span, static_size,
                                      subgraph_values, transposed_last2, upcast_source, value_of, weighted_rms)
from dsv4c.passes.kv_compression import ROUNDING_OPS, STATE_PREFIX
from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, graph_fake_mode, is_pure

aten, dsv4c = torch.ops.aten, torch.ops.dsv4c
SAMPLE_SPAN = 4  # sample positions cover this many rings from 0, plus far positions
FINISH_SEARCH = 256  # nodes searched back from a cache row's rounding for the RoPE output


# ---- reading nodes -------------------------------------------------------------------------------------
def _slices(node: Any) -> tuple[Any, dict[int, tuple[int, int]]]:
    """(source, {negative dim: (start, stop)}) of a chain of unit-step slices with literal bounds."""
    bounds: dict[int, tuple[int, int]] = {}
    while is_(node, aten.slice.Tensor) and arg(node, 4, "step", 1) == 1:
        along = dim(node.args[0], arg(node, 1, "dim", 0))
        got = span(arg(node, 2, "start"), arg(node, 3, "end"), static_size(node.args[0], along or 0))
        if along is None or got is None or along in bounds:
            break
        bounds[along] = got
        node = node.args[0]
    return node, bounds


class Ring(NamedTuple):
    """One ring read as a timeline: its state, the slot of each timeline position `[B, C, 1]`, this step's rows."""

    state: fx.Node
    slots: fx.Node
    new: fx.Node
    window: int


def token_windows(node: Any, steps: int) -> Ring | None:
    """The ring R behind `transpose(slice(unfold(cat([gather(R, 1, expand(slots)), new], 1), 1, W, 1), 1, -T), -1,
    -2)` (model/attention.py `token_windows(ring_timeline(R, new, start), W, T)`)."""
    unfolded, bounds = _slices(transposed_last2(node))
    if not is_(unfolded, aten.unfold.default) or unfolded.args[3] != 1 or dim(unfolded.args[0], unfolded.args[1]) != -2:
        return None
    size = static_size(unfolded, 1)
    if size is None or bounds != {-3: (size - steps, size)}:
        return None
    line = unfolded.args[0]
    if not is_(line, aten.cat.default) or len(line.args[0]) != 2 or dim(line, arg(line, 1, "dim", 0)) != -2:
        return None
    old, new = line.args[0]
    if not is_(old, aten.gather.default) or old.args[0].op != "placeholder" or dim(old, old.args[1]) != -2:
        return None
    index = old.args[2]
    if not is_(index, aten.expand.default) or (shape(index.args[0]) or (0,))[-1] != 1 \
            or static_size(new, 1) != steps or dtype(new) != torch.float32:
        return None
    return Ring(old.args[0], index.args[0], new, unfolded.args[2])


def window_pair(node: Any, steps: int) -> tuple[Ring, int] | None:
    """(ring, coff) of a compressor's windows: token_windows of the ring (coff 1), or for coff 2 its halves
    `cat([w[:, :, :ratio, :width], w[:, :, ratio:, width:]], 2)` of one token_windows."""
    ring = token_windows(node, steps)
    if ring is not None:
        return ring, 1
    if not is_(node, aten.cat.default) or len(node.args[0]) != 2 or dim(node, arg(node, 1, "dim", 0)) != -2:
        return None
    (first, head), (second, tail) = (_slices(part) for part in node.args[0])
    ring = token_windows(first, steps) if first is second else None
    width, window = static_size(node, -1), ring.window if ring is not None else 0
    if ring is None or window % 2 or static_size(first, -1) != 2 * width:
        return None
    half = window // 2
    ok = head == {-2: (0, half), -1: (0, width)} and tail == {-2: (half, window), -1: (width, 2 * width)}
    return (ring, 2) if ok else None


class Pooling(NamedTuple):
    kv: Ring
    score: Ring
    coff: int


def pooling(pooled: fx.Node, steps: int) -> Pooling | None:
    """The kv and score windows of `sum(softmax(score_w, -2) * kv_w, -2)` (cast to pooled's dtype, or fp32 as is)."""
    total = pooled if dtype(pooled) == torch.float32 else downcast_source(pooled)
    if not is_call(total, SUM) or dim(total.args[0], total.args[1]) != -2 or arg(total, 2, "keepdim", False):
        return None
    for probs, kv_w in operands(total.args[0]) if is_call(total.args[0], MUL) else []:
        if is_call(probs, SOFTMAX) and dim(probs.args[0], probs.args[1]) == -2 and len(probs.args) <= 3 \
                and not arg(probs, 2, "half_to_float", False) and probs.kwargs.get("dtype") is None:
            kv, score = window_pair(kv_w, steps), window_pair(probs.args[0], steps)
            if kv is not None and score is not None and kv[1] == score[1]:
                return Pooling(kv[0], score[0], kv[1])
    return None


class Rope(NamedTuple):
    normed: fx.Node
    cos: fx.Node
    sin: fx.Node


def rope(node: Any) -> Rope | None:
    """`cat([x[..., :-r], stack([e * cos - o * sin, e * sin + o * cos], -1).flatten(-2).to(x.dtype)], -1)` with e, o
    the even and odd dims of `x[..., -r:].float()` (model/layers.py `apply_rope`)."""
    if not is_(node, aten.cat.default) or len(node.args[0]) != 2 or dim(node, arg(node, 1, "dim", 0)) != -1:
        return None
    nope, rotated = node.args[0]
    x, nope_bounds = _slices(nope)
    width, pairs = static_size(node, -1), static_size(rotated, -1)
    flat = rotated if dtype(rotated) == torch.float32 else downcast_source(rotated)
    if width is None or pairs is None or nope_bounds != {-1: (0, width - pairs)} or dtype(rotated) != dtype(x) \
            or not is_(flat, aten.flatten.using_ints) or not is_(flat.args[0], aten.stack.default):
        return None
    stacked = flat.args[0]
    if dim(stacked, arg(stacked, 1, "dim", 0)) != -1 or len(stacked.args[0]) != 2 or dim(flat, flat.args[1]) != -2:
        return None
    halves = _even_odd(x, width - pairs, width)
    first, second = stacked.args[0]
    if halves is None or not is_(first, aten.sub.Tensor) or not is_call(second, ADD):
        return None
    even, odd = halves
    cos, sin = _product_of(first.args[0], even), _product_of(first.args[1], odd)
    if cos is None or sin is None or (_product_of_pair(second, even, odd) != (sin, cos)):
        return None
    return Rope(x, cos, sin)


def _even_odd(x: fx.Node, lo: int, hi: int) -> tuple[fx.Node, fx.Node] | None:
    """The nodes `f[..., 0::2]` and `f[..., 1::2]` of `f = x[..., lo:hi].float()`."""
    found = {}
    for sliced in x.users:
        source, bounds = _slices(sliced)
        if source is not x or bounds != {-1: (lo, hi)}:
            continue
        upcasts = [u for u in sliced.users if upcast_source(u) is sliced and dtype(u) == torch.float32]
        for cast in upcasts + ([sliced] if dtype(sliced) == torch.float32 else []):
            for user in cast.users:
                if is_(user, aten.slice.Tensor) and dim(cast, arg(user, 1, "dim", 0)) == -1 \
                        and arg(user, 4, "step", 1) == 2 and span(arg(user, 2, "start"), arg(user, 3, "end"),
                                                                 hi - lo) in ((0, hi - lo), (1, hi - lo)):
                    found[span(arg(user, 2, "start"), None, hi - lo)[0]] = user
    return (found[0], found[1]) if set(found) == {0, 1} else None


def _product_of(product: Any, factor: fx.Node) -> fx.Node | None:
    """The other operand of `factor * other`."""
    if not is_call(product, MUL):
        return None
    return next((other for a, other in operands(product) if a is factor and isinstance(other, fx.Node)), None)


def _product_of_pair(total: fx.Node, even: fx.Node, odd: fx.Node) -> tuple[fx.Node | None, fx.Node | None] | None:
    """(s, c) of `even * s + odd * c`, operands in any order."""
    for a, b in operands(total):
        s, c = _product_of(a, even), _product_of(b, odd)
        if s is not None and c is not None:
            return s, c
    return None


class Finish(NamedTuple):
    roped: fx.Node
    rotate: bool


def finish(gm: fx.GraphModule, rows: fx.Node, layout: PackedLayout) -> Finish | None:
    """The RoPE output under `rows` = the layout's rounding of f(roped) (its `rounded` dims, the rest raw), with f
    the identity or the normalised Hadamard transform, both checked by value on random rows."""
    if layout.rounded < layout.width:
        if not is_(rows, aten.cat.default) or len(rows.args[0]) != 2 or dim(rows, arg(rows, 1, "dim", 0)) != -1:
            return None
        rounding, raw = rows.args[0]
    else:
        rounding, raw = rows, None
    if not is_(rounding, ROUNDING_OPS[layout.format]) or rounding.args[1] != layout.block \
            or static_size(rounding, -1) != layout.rounded:
        return None
    roped = nearest_ancestor(rounding.args[0], lambda n: rope(n) is not None, FINISH_SEARCH)
    if roped is None:
        return None
    sample = (torch.randn(2, *(int(s) for s in shape(roped)[1:])) * 4).to(dtype(roped))
    got = subgraph_values(gm, [rounding.args[0]] + ([raw] if raw is not None else []), {roped: sample})
    for rotate in (False, True):
        want = hadamard(sample) if rotate else sample
        parts = [want[..., :layout.rounded]] + ([want[..., layout.rounded:]] if raw is not None else [])
        if got is not None and all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, parts)):
            return Finish(roped, rotate)
    return None


# ---- values of subgraphs -------------------------------------------------------------------------------
def _start_input(node: fx.Node) -> fx.Node | None:
    """The one int64 `[B]` placeholder `node` is computed from."""
    found, stack, seen = [], [node], set()
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
            found += [current] if current.op == "placeholder" else []
    ok = len(found) == 1 and dtype(found[0]) == torch.int64 and len(shape(found[0]) or ()) == 1
    return found[0] if ok else None


def sample_starts(slots: int, steps: int) -> torch.Tensor:
    """Positions from 0 over a few rings, and far ones (rings wrapped many times, 1M context)."""
    near = torch.arange(SAMPLE_SPAN * (slots + steps))
    return torch.cat((near, torch.tensor([4093, 65_536 - steps, 1_000_003, 2 ** 20 - steps])))


def expected_positions(starts: torch.Tensor, slots: int, steps: int, ratio: int,
                       spill: int) -> dict[str, torch.Tensor]:
    """What the op computes from `start`: ring slots read, ape rows, entries completed, cache rows and ring slots
    written."""
    positions = starts.unsqueeze(1) + torch.arange(steps)
    kept = min(steps, slots)
    done = (positions + 1) % ratio == 0
    return {"slots": ((starts.unsqueeze(1) - slots + torch.arange(slots)) % slots).unsqueeze(-1),
            "ape": positions % ratio, "done": done.unsqueeze(-1),
            "rows": torch.where(done, (positions // ratio).clamp(max=spill), spill).unsqueeze(-1),
            "written": (positions[:, steps - kept:] % slots).unsqueeze(-1)}


def positions_agree(gm: fx.GraphModule, start: fx.Node, checks: dict[str, fx.Node],
                    want: dict[str, torch.Tensor], starts: torch.Tensor) -> bool:
    """Each checked node equals the op's value at every sample start."""
    got = subgraph_values(gm, list(checks.values()), {start: starts})
    if got is None:
        return False
    for name, value in zip(checks, got):
        expected = want[name]
        if not isinstance(value, torch.Tensor) or value.shape != expected.shape \
                or not torch.equal(value.to(expected.dtype), expected):
            return False
    return True


# ---- the match -----------------------------------------------------------------------------------------
class Match(NamedTuple):
    """What the op reads for one compressor, and the writes it replaces."""

    write: fx.Node  # the cache's packed row scatter
    kv_write: fx.Node
    score_write: fx.Node
    args: tuple
    kind: str


def packed_write(node: fx.Node) -> tuple[fx.Node, fx.Node, PackedLayout] | None:
    """(rows index `[B, T, 1]`, source of `where(done, rows, 0)`, layout) of kv_compression's packed write_rows
    scatter into a placeholder."""
    if not is_(node, aten.scatter.src) or node.args[0].op != "placeholder" or dim(node.args[0], node.args[1]) != -2:
        return None
    index, packed = node.args[2], node.args[3]
    if not is_(index, aten.expand.default) or not is_(packed, dsv4c.kv_pack.default):
        return None
    source = value_of(packed.args[0])
    if not is_(source, aten.where.ScalarOther) or source.args[2] != 0:
        return None
    layout = PackedLayout(packed.args[1], static_size(source, -1), packed.args[2], packed.args[3], dtype(source))
    return index.args[0], source, layout


def ring_write(ring: Ring, new: fx.Node, steps: int) -> tuple[fx.Node, fx.Node] | None:
    """(the scatter writing this step's rows `new` (its last C when T > C) into the ring, its slots `[B, kept, 1]`)."""
    slots = static_size(ring.state, 1)
    writes = [u for u in ring.state.users if is_(u, aten.scatter.src) and u.args[0] is ring.state]
    if len(writes) != 1 or dim(ring.state, writes[0].args[1]) != -2 or not is_(writes[0].args[2], aten.expand.default):
        return None
    write = writes[0]
    source, bounds = _slices(write.args[3])
    kept = min(steps, slots)
    if source is not new or bounds not in ({}, {-2: (steps - kept, steps)}) or static_size(write.args[3], 1) != kept:
        return None
    return write, write.args[2].args[0]


def score_rows(score: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(projection, ape, index) of `projection + ape[index]`."""
    if not is_call(score, ADD):
        return None
    for projection, looked_up in operands(score):
        if is_(looked_up, aten.index.Tensor) and len(looked_up.args[1]) == 1 \
                and dtype(projection) == torch.float32 and shape(projection) == shape(score):
            table = looked_up.args[0]
            if dtype(table) == torch.float32 and len(shape(table) or ()) == 2:
                return projection, table, looked_up.args[1][0]
    return None


def match(gm: fx.GraphModule, write: fx.Node) -> Match | None:
    """The compressor whose cache write is `write`, or None for a near miss."""
    written = packed_write(write)
    if written is None:
        return None
    rows_index, source, layout = written
    steps = static_size(source, 1)
    end = finish(gm, source.args[1], layout) if steps is not None else None
    roped = rope(end.roped) if end is not None else None
    normed = weighted_rms(roped.normed) if roped is not None else None
    pooled = pooling(normed[0], steps) if normed is not None else None
    if pooled is None or dtype(normed[0]) != layout.dtype or static_size(normed[1], 0) != layout.width:
        return None
    kv, score = pooled.kv, pooled.score
    looked_up = score_rows(score.new)
    kv_written, score_written = ring_write(kv, kv.new, steps), ring_write(score, score.new, steps)
    start = _start_input(kv.slots)
    if looked_up is None or kv_written is None or score_written is None or start is None:
        return None
    ratio, slots = kv.window // pooled.coff, static_size(kv.state, 1)
    if static_size(looked_up[1], 0) != ratio or score.window != kv.window or static_size(score.state, 1) != slots:
        return None
    checks = {"slots": kv.slots, "ape": looked_up[2], "done": source.args[0], "rows": rows_index,
              "written": kv_written[1]}
    starts = sample_starts(slots, steps)
    want = expected_positions(starts, slots, steps, ratio, static_size(write.args[0], 1) - 1)
    if not all(positions_agree(gm, start, {name: node}, want, starts)
               for name, node in [*checks.items(), ("slots", score.slots), ("written", score_written[1])]):
        return None
    args = (write.args[0], kv.state, score.state, kv.new, looked_up[0], looked_up[1], normed[1], roped.cos,
            roped.sin, start, ratio, normed[2], layout.format, layout.rounded, layout.block, end.rotate, layout.dtype)
    if not fits_the_op(args):
        return None
    kind = f"C{ratio} {layout.format}" + (" hadamard" if end.rotate else "")
    return Match(write, kv_written[0], score_written[0], args, kind)


def fits_the_op(args: tuple) -> bool:
    """Whether the op's own check (codegen/compressor.py) accepts the arguments' shapes and dtypes."""
    values = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
    try:
        compressor.check(*values[:11], *values[12:15], values[16])
    except ValueError:
        return False
    return True


# ---- writing in place ----------------------------------------------------------------------------------
def in_place_safe(graph: fx.Graph, m: Match, outputs: dict[fx.Node, str]) -> bool:
    """The three writes are `state.*` outputs nothing else reads, and every other reader of the old states is a
    node only those writes need (it goes with them) or a `sym_size`."""
    writes = (m.write, m.kv_write, m.score_write)
    if any(not outputs.get(w, "").startswith(STATE_PREFIX) for w in (m.kv_write, m.score_write, m.write)):
        return False
    if any(set(w.users) != {graph.output_node()} for w in (m.kv_write, m.score_write)):
        return False
    doomed = _needed_only_by(graph, writes)
    for state in (w.args[0] for w in writes):
        if any(user not in doomed and not is_(user, aten.sym_size.int) for user in state.users):
            return False
    return True


def _needed_only_by(graph: fx.Graph, roots: Iterable[fx.Node]) -> set[fx.Node]:
    """The roots and the pure nodes whose every user is among them (what erasing the roots erases)."""
    doomed = set(roots)
    for node in reversed(list(graph.nodes)):
        if node not in doomed and node.users and is_pure(node) and node.op == "call_function" \
                and all(user in doomed for user in node.users):
            doomed.add(node)
    return doomed


def rewrite(graph: fx.Graph, m: Match) -> fx.Node:
    """The op in place of the cache's write; the rings' outputs become the rings the op wrote."""
    with graph.inserting_before(m.write):
        op = graph.call_function(dsv4c.compress_step_.default, m.args)
    with graph_fake_mode(graph):
        op.meta["val"] = op.target(*fx.node.map_arg(m.args, lambda a: a.meta["val"]))
    m.write.replace_all_uses_with(op)
    for write in (m.kv_write, m.score_write):
        write.replace_all_uses_with(write.args[0])
    erase_dead_ancestors(graph, [m.write, m.kv_write, m.score_write])
    return op


# ---- the pass ------------------------------------------------------------------------------------------
def compressor_fusion(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Replace every matched compressor by `dsv4c::compress_step_` (module docstring)."""
    before = count_nodes(gm)
    if ctx.output_names is None:
        return gm, make_record("compressor_fusion", before, gm, 0, "no output names: not a captured step")
    graph = gm.graph
    outputs = {node: name for name, node in zip(ctx.output_names, graph.output_node().args[0])
               if isinstance(node, fx.Node)}
    candidates = [n for n in graph.nodes if packed_write(n) is not None]
    matches = [m for m in (match(gm, c) for c in candidates) if m is not None and in_place_safe(graph, m, outputs)]
    for m in matches:
        rewrite(graph, m)
    graph.lint()
    gm.recompile()
    kinds = [m.kind for m in matches]
    description = (f"{len(matches)} compressors write their rings and packed cache in one op "
                   f"({', '.join(kinds) or 'none'}); {len(candidates) - len(matches)} cache row writes left alone")
    return gm, make_record("compressor_fusion", before, gm, len(matches), description, kinds=kinds)
