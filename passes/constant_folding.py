"""Constant folding: compute once, at compile time, what depends only on constant buffers and literals.

Pattern: a maximal subgraph of pure calls whose inputs are `get_attr` buffers and literal arguments
(`arange(0, 32, 2) / 32`, `pow`, `reciprocal`: the RoPE frequency tables; `lift_fresh_copy` of a lifted
constant). Each of its nodes that a non-constant node (or the output) reads is evaluated with the real
buffers and becomes a new `get_attr` buffer `_folded_<n>`; the subgraph behind it is erased.
Never folded: anything reached from a placeholder (weights are inputs, and so is the batch size through
`sym_size`), random or mutating calls, any node whose storage some mutating op writes, and any result
larger than `max_bytes` (64 MiB by default), so folding never materialises an `expand` of a table.

Before: a flat aten graph; `meta["val"]` is used (when present) to refuse large results before computing
them. Where: after CSE (each duplicated table folds once), before dead_code (which then drops the unused
original buffers) and shape_propagation (which gives the new buffers their metadata if needed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, erase_dead, graph_fake_mode, is_pure, is_sym_op, mutated_roots, storage_root

DEFAULT_MAX_BYTES = 64 << 20


def constant_folding(gm: fx.GraphModule, ctx: PassContext,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[fx.GraphModule, PassRecord]:
    """Fold every constant subgraph into buffers; returns the number of new buffers as matches."""
    before = count_nodes(gm)
    graph = gm.graph
    constant = constant_nodes(gm, max_bytes)
    frontier = [n for n in graph.nodes if n in constant and n.op != "get_attr" and _read_outside(n, constant)]
    values = _evaluate(gm, constant, frontier, max_bytes)
    fake_mode = graph_fake_mode(graph)
    folded = 0
    for node in frontier:
        if node in values:
            _replace_with_buffer(gm, node, values[node], fake_mode)
            folded += 1
    erase_dead(graph, constant)  # the folded subgraphs; their buffers are left to dead_code
    gm.recompile()
    size = sum(v.numel() * v.element_size() for v in values.values())
    return gm, make_record("constant_folding", before, gm, folded,
                           f"folded {folded} constant subgraphs into buffers ({size} bytes)", bytes=size)


def constant_nodes(gm: fx.GraphModule, max_bytes: int = DEFAULT_MAX_BYTES) -> set[fx.Node]:
    """Nodes computable from constant buffers and literals alone, within the size cap."""
    written = mutated_roots(gm.graph)
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if storage_root(node) in written or _too_large(node, max_bytes):
            continue
        if node.op == "get_attr" and isinstance(_fetch(gm, node.target), torch.Tensor):
            constant.add(node)
        elif node.op == "call_function" and is_pure(node) and not is_sym_op(node):
            if all(arg in constant for arg in node.all_input_nodes):
                constant.add(node)
    return constant


def _read_outside(node: fx.Node, constant: set[fx.Node]) -> bool:
    return any(user not in constant for user in node.users)


def _too_large(node: fx.Node, max_bytes: int) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    for v in vals:
        if isinstance(v, torch.Tensor):
            numel = v.numel()
            if not isinstance(numel, int) or numel * v.element_size() > max_bytes:
                return True
    return False


def _evaluate(gm: fx.GraphModule, constant: set[fx.Node], frontier: list[fx.Node],
              max_bytes: int) -> dict[fx.Node, torch.Tensor]:
    """Run the constant nodes the frontier needs, in graph order; results over the cap are dropped."""
    needed = _ancestors(frontier)
    env: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node not in needed:
                continue
            if node.op == "get_attr":
                env[node] = _fetch(gm, node.target)
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            env[node] = node.target(*args, **kwargs)
    return {n: _owned_copy(env[n]) for n in frontier
            if isinstance(env.get(n), torch.Tensor) and env[n].numel() * env[n].element_size() <= max_bytes}


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _owned_copy(value: torch.Tensor) -> torch.Tensor:
    """A copy that shares no storage with existing buffers; strides kept where dense (clone's rule)."""
    return value.detach().clone()


def _replace_with_buffer(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor, fake_mode: Any) -> None:
    name = _free_name(gm, "_folded_")
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(node):
        buffer = gm.graph.get_attr(name)
    if fake_mode is not None:
        buffer.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    node.replace_all_uses_with(buffer)


def _free_name(gm: fx.GraphModule, prefix: str) -> str:
    index = 0
    while hasattr(gm, f"{prefix}{index}"):
        index += 1
    return f"{prefix}{index}"


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value
