"""The MoE's routing as a captured graph computes it, read for passes/moe_fp4.py (a matcher, not a pass).

model/layers.py `route` after capture and cleanup, for the flattened rows x [N, D] (casts up to fp32 looked
through, the views that only split the rows of ids and weights too):
    logits  = x.float() @ router.float().T                    matmul / mm / linear of the transposed router
    scores  = sqrt(softplus(logits)) | sigmoid(logits) | softmax(logits, -1)       (softplus: beta 1, threshold 20)
    ids     = topk(scores + bias.float(), k, -1).indices       score-routed: largest, sorted
            | table.long()[tokens] (or table[tokens].long())   hash layers: one integer index tensor of rank 1
    weights = scores.gather(-1, ids)  [/ weights.sum(-1, keepdim=True)]  [* scale]
read as the inputs of `dsv4c::moe_fp4`'s routing (codegen/moe_routing.py): x, the router, the bias or the table
(each before its lossless cast) and the token ids, with a `Routing`. Anything else is no match: another score
function, another softplus, a smallest or unsorted top-k, weights gathered from the biased scores, a scale
that is not a number, an index with more than one tensor.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from dsv4c.codegen.moe_routing import Routing
from dsv4c.passes.graph_match import (ADD, CASTS, MUL, SOFTMAX, SUM, VIEWS, arg, dim, dtype, is_, is_call, linear,
                                      number, numel, operands, rank, same_sizes, shape, softmax_input, static_size,
                                      upcast_source)
from dsv4c.passes.op_facts import tensor_val

aten = torch.ops.aten
INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class RouterMatch(NamedTuple):
    x: fx.Node  # the rows the router multiplies, before their cast to fp32
    router: fx.Node  # [E, D], before its cast to fp32
    bias: fx.Node | None  # [E] (score-routed), before its cast to fp32
    table: fx.Node | None  # [V, k] (hash), before its widening to int64
    tokens: fx.Node | None  # the token ids indexing the table
    routing: Routing
    nodes: frozenset[fx.Node]  # the nodes that compute ids and weights from those inputs


def router_match(ids_use: Any, weights_use: Any) -> RouterMatch | None:
    """The routing that computes the routed experts' ids and weights arguments, else None."""
    ids, id_views = _rows_views(ids_use)
    weights, weight_views = _rows_views(weights_use)
    found = _weights(weights)
    if found is None:
        return None
    scores, gathered, normalize, scale, weight_nodes = found
    scored = _scores(scores)
    selected = _selection(ids, scores)
    if gathered is not ids or scored is None or selected is None or dtype(ids) != torch.int64 or rank(scores) != 2:
        return None
    logits, scoring, score_nodes = scored
    bias, table, tokens, top_k, select_nodes = selected
    product = linear(logits)
    if product is None or any(dtype(n) != torch.float32 for n in (logits, *product)):
        return None
    x, router = (upcast_source(n) for n in product)
    nodes = {*id_views, *weight_views, *weight_nodes, *score_nodes, *select_nodes, *_between(logits, product)}
    return RouterMatch(x, router, bias, table, tokens, Routing(top_k, scoring, normalize, scale), frozenset(nodes))


def _rows_views(node: Any) -> tuple[Any, list[fx.Node]]:
    """(the tensor, the views looked through) of views that keep the last dim and only regroup the rows."""
    views = []
    while is_call(node, VIEWS) and shape(node) and shape(node.args[0]) \
            and same_sizes(shape(node)[-1:], shape(node.args[0])[-1:]) \
            and same_sizes((numel(shape(node)),), (numel(shape(node.args[0])),)):
        views.append(node)
        node = node.args[0]
    return node, views


def _weights(node: Any) -> tuple[fx.Node, fx.Node, bool, float, list[fx.Node]] | None:
    """(scores, ids, normalize, scale, nodes) of `gather(scores, -1, ids) [/ its sum] [* scale]`."""
    nodes, scale = [], 1.0
    if is_call(node, MUL):
        factor = next(((a, number(b)) for a, b in operands(node) if number(b) is not None), None)
        if factor is None:
            return None
        nodes.append(node)
        node, scale = factor
    normalize = is_(node, aten.div.Tensor) and _sum_of(node.args[1], node.args[0])
    if normalize:
        nodes += [node, node.args[1]]
        node = node.args[0]
    if not is_(node, aten.gather.default) or dim(node.args[0], node.args[1]) != -1:
        return None
    return node.args[0], node.args[2], normalize, scale, nodes + [node]


def _sum_of(total: Any, values: fx.Node) -> bool:
    """total is `values.sum(-1, keepdim=True)`."""
    return is_call(total, SUM) and total.args[0] is values and dim(values, total.args[1]) == -1 \
        and bool(arg(total, 2, "keepdim", False)) and arg(total, 3, "dtype") is None


def _scores(node: Any) -> tuple[fx.Node, str, list[fx.Node]] | None:
    """(logits, scoring, nodes) of the score function model/layers.py `router_scores` applies."""
    if is_(node, aten.sqrt.default) and is_(node.args[0], aten.softplus.default):
        softplus = node.args[0]
        if number(arg(softplus, 1, "beta", 1)) == 1 and number(arg(softplus, 2, "threshold", 20)) == 20:
            return softplus.args[0], "sqrtsoftplus", [node, softplus]
    if is_(node, aten.sigmoid.default):
        return node.args[0], "sigmoid", [node]
    if is_call(node, SOFTMAX) and softmax_input(node) is not None:
        return node.args[0], "softmax", [node]
    return None


def _selection(ids: Any, scores: fx.Node) -> tuple[Any, Any, Any, int, list[fx.Node]] | None:
    """(bias, table, tokens, top_k, nodes) of the ids: the top-k of the biased scores, or the table lookup."""
    if isinstance(ids, fx.Node) and ids.target is operator.getitem and ids.args[1] == 1 \
            and is_(ids.args[0], aten.topk.default):
        topk = ids.args[0]
        biased, k = topk.args[0], arg(topk, 1, "k")
        if dim(biased, arg(topk, 2, "dim", -1)) != -1 or arg(topk, 3, "largest", True) is not True \
                or arg(topk, 4, "sorted", True) is not True or not is_call(biased, ADD) or not isinstance(k, int):
            return None
        for a, b in operands(biased):
            bias = upcast_source(b)
            if a is scores and rank(bias) == 1 and dtype(b) == torch.float32 and same_sizes(shape(bias), shape(a)[-1:]):
                return bias, None, None, k, [ids, topk, biased]
        return None
    nodes = []
    if _integer_cast(ids) is not None and dtype(ids) == torch.int64:
        nodes.append(ids)
        ids = ids.args[0]
    if not is_(ids, aten.index.Tensor) or len(ids.args[1]) != 1 or ids.args[1][0] is None:
        return None
    table, tokens = ids.args[0], ids.args[1][0]
    table = _integer_cast(table) or table
    if rank(table) != 2 or dtype(table) not in INTEGERS or dtype(tokens) not in INTEGERS \
            or static_size(table, -1) is None or not same_sizes(shape(tokens), shape(scores)[:-1]):
        return None
    return None, table, tokens, static_size(table, -1), nodes + [ids]


def _integer_cast(node: Any) -> fx.Node | None:
    """The input of a cast between integer dtypes that keeps every value (to a type at least as wide)."""
    if not is_call(node, CASTS) or not isinstance(node.args[0], fx.Node):
        return None
    source, target = dtype(node.args[0]), dtype(node)
    if source not in INTEGERS or target not in INTEGERS or source == torch.uint8 and target == torch.int8:
        return None
    return node.args[0] if torch.iinfo(target).bits >= torch.iinfo(source).bits else None


def _between(top: fx.Node, stops: tuple[fx.Node, ...]) -> set[fx.Node]:
    """top and the nodes it reads on the way to `stops` (those excluded)."""
    found, stack = set(), [top]
    while stack:
        node = stack.pop()
        if node in found or node in stops or node.op != "call_function" or tensor_val(node) is None:
            continue  # (sizes a view reads are not the routing's)
        found.add(node)
        stack.extend(node.all_input_nodes)
    return found
