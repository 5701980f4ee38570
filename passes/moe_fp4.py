"""The whole MoE: routing + routed experts + shared expert + combine -> one `dsv4c::moe_fp4` on the packed weights.

Pattern (model/layers.py `moe` as capture and the fp8_linear pass leave it; dt the activation dtype, casts up
to fp32 and the flattening view of x looked through, operands of add and mul either way):
    ids, weights = the routing of x's rows (passes/router_match.py: router logits, score function, the top-k
                   of the biased scores or the hash table's rows of the token ids, normalisation, scaling)
    R  = dsv4c::routed_moe(x, ids, weights, w1[], s1[], w3[], s3[], w2[], s2[], limit, act_quant)   # [..., D] fp32
    g  = dsv4c::fp8_linear(x.view(-1, D), sw1, ss1, aq, dt);  u = dsv4c::fp8_linear(same x, sw3, ss3, aq, dt)
    h  = silu(clamp(g.float(), max=L)) * clamp(u.float(), -L, L)        # or no clamps (shared_limit None)
    d  = dsv4c::fp8_linear(h.to(dt), sw2, ss2, aq, dt)
    out = (R.view(-1, D) + d.float()).to(dt)                             # no cast when dt is fp32
  becomes
    out = dsv4c::moe_fp4(x, router, bias | None, table | None, tokens | None, w1[], ..., s2[],
                         [sw1, ss1, sw3, ss3, sw2, ss2], k, scoring, normalize, scale, limit, L, acts, aq)
          (viewed as (-1, D) when x has more dims)
where `acts` is the target table's choice (codegen/targets.py `moe_fp4_lowering`): the graph's own numerics
unless asked otherwise ("w4a8" for act_quant, "w4a16" without: the op then computes exactly the graph's
values), or the requested format (`--moe`; W4A4, or W4A8 on a plain graph, change the numerics: opt-in, and
named in the pass record). Left alone, whole: a routing that is not the model's math (router_match's near
misses), a router reading other rows than the experts', a shared expert whose width differs from the routed
experts' (the kernels share one hidden buffer), any piece read elsewhere, different x or numerics between the
routed and shared parts, other clamps, a missing piece; on cpu, unless asked, everything (the captured ops
already run their references there).

Not matched, by construction: transformers' `DeepseekV4ForCausalLM` through the torch.compile backend
(compiler/backend.py). Its routed experts (`DeepseekV4Experts`) are two stacked parameters of already decoded
values in the model's dtype (`gate_up_proj [E, 2I, D]`, `down_proj [E, D, I]`), run by transformers' grouped_mm
experts implementation (the token-expert pairs sorted by expert, `histc` + `cumsum` offsets, one grouped
matmul over all E experts per projection: `transformers::grouped_mm_fallback` on CPU), and its shared expert is
three dense `F.linear`s. That graph holds no `dsv4c::routed_moe` (only capture emits it, from the checkpoint's
per-expert packed tensors) and no MXFP4 / FP8 codes with e8m0 scales for `moe_fp4` to read; lowering it would
mean re-quantising the dense weights at compile time, a change of numerics and another pass. (Seen: 0 matches
on its graph through the h100 pipeline, transformers 5.24.)

Before: after fp8_linear (the shared expert's linears are `dsv4c::fp8_linear` nodes). Where: after fp8_linear,
before constant_folding and shape_propagation (which gives the new nodes their sympy shapes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops this pass reads and writes)
from dsv4c.codegen import targets as target_table
from dsv4c.passes.graph_match import (MUL, VIEWS, arg, downcast_source, dtype, erase_dead_ancestors, is_, is_call,
                                      number, operands, rank, rows_source, shape, static_size, upcast_source)
from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, graph_fake_mode, tensor_val
from dsv4c.passes.router_match import RouterMatch, router_match
from dsv4c.passes.shape_propagation import nodes_without_val, refresh_fake_values

aten = torch.ops.aten
dsv4c = torch.ops.dsv4c
ADD = (aten.add.Tensor,)


class SharedExpert(NamedTuple):
    """`fp8_linear(silu(clamp(g)) * clamp(u), w2)` with g, u the gate and up fp8_linears of one x."""

    x: fx.Node
    weights: tuple[fx.Node, ...]  # sw1, ss1, sw3, ss3, sw2, ss2
    limit: float | None
    act_quant: bool
    nodes: tuple[fx.Node, ...]  # every node of it, the down projection first


class MoeMatch(NamedTuple):
    output: fx.Node
    routed: fx.Node
    router: RouterMatch
    shared: SharedExpert
    nodes: frozenset[fx.Node]  # every node of it


# ---- the pieces ---------------------------------------------------------------------------------------------
def clamped(node: fx.Node, both_sides: bool) -> tuple[fx.Node, float | None] | None:
    """(input, L) of `clamp(v, max=L)` (or `clamp(v, -L, L)` with both_sides); (node, None) unclamped."""
    if not is_(node, aten.clamp.default):
        return node, None
    low, high = arg(node, 1, "min"), arg(node, 2, "max")
    if number(high) is None or (number(low) != -high if both_sides else low is not None):
        return None
    return node.args[0], float(high)


def fp8_linear_of(node: fx.Node) -> fx.Node | None:
    node = upcast_source(node)
    return node if is_(node, dsv4c.fp8_linear.default) else None


def shared_expert(down: fx.Node) -> SharedExpert | None:
    """The shared expert whose down projection is `down` (an fp8_linear), else None."""
    if not is_(down, dsv4c.fp8_linear.default):
        return None
    dt, act_quant = down.args[4], down.args[3]
    cast = down.args[0]
    hidden = downcast_source(cast) if dtype(cast) != torch.float32 else cast
    if not is_call(hidden, MUL):
        return None
    for silu, up_clamp in operands(hidden):
        if not is_(silu, aten.silu.default):
            continue
        gate, gate_limit = clamped(silu.args[0], both_sides=False) or (None, None)
        up, up_limit = clamped(up_clamp, both_sides=True) or (None, None)
        g, u = fp8_linear_of(gate), fp8_linear_of(up)
        if g is None or u is None or gate_limit != up_limit or g.args[0] is not u.args[0]:
            continue
        if any(tuple(n.args[3:]) != (act_quant, dt) for n in (g, u)):
            continue
        nodes = (down, cast, hidden, silu, silu.args[0], up_clamp, *_upcasts(gate), *_upcasts(up))
        weights = (g.args[1], g.args[2], u.args[1], u.args[2], down.args[1], down.args[2])
        return SharedExpert(g.args[0], weights, gate_limit, act_quant, tuple(dict.fromkeys(nodes)))
    return None


def match(node: fx.Node) -> MoeMatch | None:
    """node as the MoE's output: the cast (or, in fp32, the add) of routed + shared."""
    total = downcast_source(node) if dtype(node) != torch.float32 else node
    if not is_call(total, ADD) or total.kwargs.get("alpha", 1) != 1:
        return None
    for routed_view, shared_out in operands(total):
        routed = routed_view.args[0] if is_call(routed_view, VIEWS) else routed_view
        shared = shared_expert(upcast_source(shared_out))
        if not is_(routed, dsv4c.routed_moe.default) or shared is None:
            continue
        x = routed.args[0]
        if rows_source(shared.x) is not x and shared.x is not x or dtype(x) != dtype(node):
            continue
        if shared.act_quant != routed.args[10] or not same_width(routed, shared):
            continue
        router = router_match(routed.args[1], routed.args[2])
        if router is None or not routes_rows_of(router, x, len(routed.args[3])):
            continue
        nodes = {node, total, routed_view, routed, *_upcasts(shared_out), *shared.nodes, *router.nodes}
        return MoeMatch(node, routed, router, shared, frozenset(nodes))
    return None


def _upcasts(node: fx.Node) -> list[fx.Node]:
    """node and the lossless casts up to fp32 that `upcast_source` looks through from it."""
    chain = [node]
    while chain[-1] is not upcast_source(chain[-1]):
        chain.append(chain[-1].args[0])
    return chain


def same_width(routed: fx.Node, shared: SharedExpert) -> bool:
    """The shared expert's hidden width equals the routed experts' (the kernels' one hidden buffer)."""
    routed_w1, shared_w1 = tensor_val(routed.args[3][0]), tensor_val(shared.weights[0])
    return routed_w1 is not None and shared_w1 is not None and routed_w1.shape[0] == shared_w1.shape[0]


def routes_rows_of(router: RouterMatch, x: fx.Node, experts: int) -> bool:
    """The router multiplies x's rows (x itself, or its flattening view) and has one row per routed expert."""
    rows = router.x if router.x is x else rows_source(router.x)
    return rows is x and dtype(router.x) == dtype(x) and static_size(router.router, 0) == experts \
        and rank(router.router) == 2


def private(found: MoeMatch) -> bool:
    """Nothing outside the match reads its intermediate values (they disappear with it)."""
    return all(user in found.nodes for node in found.nodes - {found.output} for user in node.users)


# ---- the pass ---------------------------------------------------------------------------------------------
def moe_fp4(gm: fx.GraphModule, ctx: PassContext, activations: str | None = None) -> tuple[fx.GraphModule, PassRecord]:
    """Replace every MoE (routing, routed and shared experts, combine) by `dsv4c::moe_fp4`; `activations` the `--moe`
    choice (None: the target table's default for the graph's numerics)."""
    activations = activations if activations is not None else ctx.moe
    before = count_nodes(gm)
    if nodes_without_val(gm):
        refresh_fake_values(gm)
    target = target_table.target(ctx.target)
    found = [m for node in list(gm.graph.nodes) if node.op == "call_function" for m in [match(node)] if m]
    found = [m for m in found if private(m)]
    chosen, changed = [], 0
    for m in found:
        acts = target_table.moe_fp4_lowering(target, activations, m.routed.args[10])
        if acts is None:
            continue
        changed += acts != ("w4a8" if m.routed.args[10] else "w4a16")
        _rewrite(gm.graph, m, acts)
        chosen.append(acts)
    gm.recompile()
    kinds = sorted(set(chosen))
    native = "w4a4" in kinds and target_table.has_native_mxfp4(target)
    description = (f"fused {len(chosen)} of {len(found)} MoE layers on {target.name}"
                   f"{' as ' + ', '.join(kinds) if kinds else ''}{' (native MXFP4 products)' if native else ''}"
                   f"{f'; {changed} with numerics changed (opt-in)' if changed else ''}")
    return gm, make_record("moe_fp4", before, gm, len(chosen), description, activations=kinds, native_fp4=native,
                           numerics_changed=changed, left=len(found) - len(chosen))


def _rewrite(graph: fx.Graph, found: MoeMatch, activations: str) -> None:
    """The op before the output (every input precedes it), viewed to the output's shape, takes its uses."""
    routed, router, shared = found.routed, found.router, found.shared
    x, lists, routing = routed.args[0], routed.args[3:9], found.router.routing
    args = (x, router.router, router.bias, router.table, router.tokens, *lists, list(shared.weights),
            routing.top_k, routing.scoring, routing.normalize, routing.scale, routed.args[9], shared.limit,
            activations, shared.act_quant)
    with graph.inserting_before(found.output):
        call = graph.call_function(dsv4c.moe_fp4.default, args)
        result = call
        if shape(x) is not None and len(shape(x)) != len(shape(found.output)):
            result = graph.call_function(aten.reshape.default, (call, [-1, int(shape(x)[-1])]))
    mode = graph_fake_mode(graph)
    if mode is not None:
        with mode:
            vals = fx.node.map_arg(args, lambda n: n.meta["val"])
            call.meta["val"] = dsv4c.moe_fp4.default(*vals)
            if result is not call:
                result.meta["val"] = call.meta["val"].reshape(-1, call.meta["val"].shape[-1])
    found.output.replace_all_uses_with(result)
    erase_dead_ancestors(graph, [found.output])
