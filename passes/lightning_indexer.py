"""Lightning Indexer: each C4 layer's entry selection over packed keys becomes one `dsv4c::lightning_indexer`.

Pattern (model/attention.py `indexer_select`, once kv_compression stores the indexer keys packed):
    logits = relu(einsum("bthd,bsd->bths", Q.float(), kv_unpack(CACHE, "e2m1", d, d, block, Q.dtype).float()))
    scores = masked_fill(sum(logits * unsqueeze(W, -1), 2), ~MASK, -inf)
    values, ids = topk(scores, K)                   (last dim, largest, sorted)
    valid = values > -inf                           (values read by nothing else)
with Q `[B, T, H, d]` of bf16 values (bf16, or the output of `dsv4c::fake_quant_fp4`: the indexer's rounded
queries, which the kernels multiply exactly on bf16 tensor cores) and W fp32 `[B, T, H]` (the head weights with
their scale). MASK must be `visible_entries(start + arange(T), E, ratio)` of the step's `start` alone: its
subgraph is run on sample positions against that definition, whatever ops spell it (as passes/sparse_attention.py
checks its masks). The replacement `(ids, valid) = lightning_indexer(Q, W, CACHE, start, ratio, K, block)` reads
the packed rows, so the indexer's keys are never unpacked whole; it equals the pattern bit for bit where the op runs
its reference (the same expressions and the same `topk`).

Left alone: keys not stored packed (kv_compression did not run, or the numerics do not round them), scores of
another form (no relu, a scale after the head sum, another einsum), a mask that differs from the op's at any sample
position, top-k values read for anything but their validity, queries that are not bf16 values.

Before: kv_compression (the keys are `kv_unpack` of the packed cache). Where: after sparse_attention (whose
`where(valid, ids, -1)` then reads this op's outputs; it matches the same either way), before constant folding,
reinplace_state and shape propagation.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from dsv4c.codegen import lightning_indexer as indexer_op  # noqa: F401  (registers the op this pass emits)
from dsv4c.codegen.kv_cache import PackedLayout
from dsv4c.model import rounding_ops  # noqa: F401  (registers the rounding this pass reads)
from dsv4c.model.attention import visible_entries
from dsv4c.passes.graph_match import (MUL, SUM, arg, dim, dtype, erase_dead_ancestors, is_, is_call,
                                      is_topological, operands, replace_with_op, same_sizes, shape, stable_toposort,
                                      static_size, upcast_source)
from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes
from dsv4c.passes.sparse_attention import evaluate_at_starts, mask_ratio, start_input

aten, dsv4c = torch.ops.aten, torch.ops.dsv4c
NEG_INF = float("-inf")


class Selection(NamedTuple):
    """A matched indexer selection: what the op reads and the two nodes it replaces."""

    q: fx.Node
    head_w: fx.Node
    cache: fx.Node
    layout: PackedLayout
    start: fx.Node
    ratio: int
    k: int
    ids: fx.Node
    valid: fx.Node


# ---- the selection -------------------------------------------------------------------------------------
def top_entries(node: fx.Node) -> tuple[fx.Node, int, fx.Node, fx.Node] | None:
    """(scores, K, ids, valid) of `values, ids = topk(scores, K)` and `valid = values > -inf` (values read by
    nothing else)."""
    if not is_(node, aten.topk.default) or not isinstance(node.args[1], int) \
            or dim(node.args[0], arg(node, 2, "dim", -1)) != -1 or not arg(node, 3, "largest", True) \
            or not arg(node, 4, "sorted", True):
        return None
    parts = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if set(parts) != {0, 1} or len(node.users) != 2 or len(parts[0].users) != 1:
        return None
    (valid,) = parts[0].users
    if not is_(valid, aten.gt.Scalar) or valid.args[1] != NEG_INF:
        return None
    return node.args[0], node.args[1], parts[1], valid


def masked_scores(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """(head sum, mask) of `masked_fill(total, ~mask, -inf)`."""
    if not is_(node, aten.masked_fill.Scalar) or node.args[2] != NEG_INF \
            or not is_(node.args[1], aten.bitwise_not.default):
        return None
    return node.args[0], node.args[1].args[0]


def head_sum(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """(logits, W) of `sum(logits * unsqueeze(W, -1), 2)` over the heads of `[B, T, H, E]` logits."""
    if not is_call(node, SUM) or dim(node.args[0], node.args[1]) != -2 or arg(node, 2, "keepdim", False) \
            or not is_call(node.args[0], MUL):
        return None
    for logits, weights in operands(node.args[0]):
        if is_(weights, aten.unsqueeze.default) and dim(weights, weights.args[1]) == -1 \
                and dtype(weights) == torch.float32:
            return logits, weights.args[0]
    return None


def relu_logits(node: Any) -> tuple[fx.Node, fx.Node, PackedLayout] | None:
    """(Q, packed cache, layout) of
    `relu(einsum("bthd,bsd->bths", Q.float(), kv_unpack(cache, "e2m1", d, d, block, Q.dtype).float()))`."""
    if not is_(node, aten.relu.default) or not is_(node.args[0], aten.einsum.default) \
            or node.args[0].args[0] != "bthd,bsd->bths":
        return None
    q_fp32, keys_fp32 = node.args[0].args[1]
    q, keys = upcast_source(q_fp32), upcast_source(keys_fp32)
    if dtype(q_fp32) != torch.float32 or dtype(keys_fp32) != torch.float32 \
            or not is_(keys, dsv4c.kv_unpack.default) or keys.args[1] != "e2m1":
        return None
    layout = PackedLayout(*keys.args[1:])
    bf16_values = dtype(q) == torch.bfloat16 or is_(q, dsv4c.fake_quant_fp4.default)
    whole = layout.rounded == layout.width == static_size(q, -1) and layout.dtype == dtype(q)
    return (q, keys.args[0], layout) if bf16_values and whole else None


def match(gm: fx.GraphModule, topk: fx.Node) -> Selection | None:
    """The op's reads for the selection ending in `topk`, or None for a near miss."""
    top = top_entries(topk)
    masked = masked_scores(top[0]) if top is not None else None
    summed = head_sum(masked[0]) if masked is not None else None
    logits = relu_logits(summed[0]) if summed is not None else None
    if logits is None:
        return None
    q, cache, layout = logits
    head_w, mask = summed[1], masked[1]
    start, ratio = start_input(mask), mask_ratio(mask)
    if not same_sizes(shape(head_w), (shape(q) or ())[:3]) or start is None or not ratio \
            or not mask_agrees(gm, mask, start, ratio, static_size(q, 1), static_size(cache, 1)):
        return None
    return Selection(q, head_w, cache, layout, start, ratio, top[1], top[2], top[3])


# ---- the mask, checked by value ------------------------------------------------------------------------
def sample_starts(entries: int, ratio: int, steps: int) -> torch.Tensor:
    """Starts from 0 over the first entries, around the last entry's completion, and far ones (1M context)."""
    near = torch.arange(4 * ratio + steps)
    edge = (entries * ratio - steps + torch.arange(-ratio, ratio)).clamp(min=0)
    return torch.cat((near, edge, torch.tensor([4093, 65_536 - steps, 1_000_003, 2 ** 20 - steps])))


def mask_agrees(gm: fx.GraphModule, mask: fx.Node, start: fx.Node, ratio: int, steps: int | None,
                entries: int | None) -> bool:
    """Whether `mask` is `visible_entries(start + arange(steps), entries, ratio)` at every sample start."""
    if steps is None or entries is None:
        return False
    starts = sample_starts(entries, ratio, steps)
    want = visible_entries(starts.unsqueeze(1) + torch.arange(steps), entries, ratio)
    got = evaluate_at_starts(gm, mask, start, starts)
    return got is not None and got.shape == want.shape and torch.equal(got.to(torch.bool), want)


# ---- the pass ------------------------------------------------------------------------------------------
def rewrite(graph: fx.Graph, s: Selection) -> None:
    """The op where the selection was; the scores, the unpacked keys and the top-k go if nothing else reads them."""
    args = (s.q, s.head_w, s.cache, s.start, s.ratio, s.k, s.layout.block)
    replace_with_op(graph, dsv4c.lightning_indexer.default, args, (s.ids, s.valid))
    erase_dead_ancestors(graph, [s.valid, s.ids])
    if not is_topological(graph):
        stable_toposort(graph)


def lightning_indexer(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Replace every matched indexer selection by `dsv4c::lightning_indexer` (module docstring)."""
    before = count_nodes(gm)
    topks = [n for n in gm.graph.nodes if is_(n, aten.topk.default)]
    matches = [s for s in (match(gm, n) for n in topks) if s is not None]
    kinds = [f"top-{s.k} of {static_size(s.cache, 1)}" for s in matches]
    for s in matches:
        rewrite(gm.graph, s)
    gm.graph.lint()
    gm.recompile()
    description = (f"{len(matches)} indexer selections read packed FP4 keys ({', '.join(kinds) or 'none'}); "
                   f"{len(topks) - len(matches)} top-k left alone")
    return gm, make_record("lightning_indexer", before, gm, len(matches), description, kinds=kinds)
