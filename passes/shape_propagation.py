"""Shape propagation: every tensor node's shape as sympy expressions in one batch symbol `B`.

Pattern: every node whose `meta["val"]` is a FakeTensor gets `meta["dsv4c_shape"]` (a tuple of
`sympy.Expr`) and `meta["dsv4c_dtype"]`; SymInt nodes (`sym_size`, size arithmetic) get
`meta["dsv4c_expr"]`. Whatever export called the batch dimension (`s18`, `s77`, ...) becomes
`BATCH = Symbol("B", integer=True, positive=True)`; `gm.meta["dsv4c_batch_symbol"]` keeps export's name.
If some node has no `meta["val"]` (a pass built it without metadata), the whole graph is re-propagated
with FakeTensorProp in the graph's own FakeTensorMode and ShapeEnv, so symbols and storage identity stay
consistent across nodes (memory planning reads aliasing from fake storages).

Before: placeholders carry FakeTensor `meta["val"]` (torch.export / capture give them). Where: after the
rewriting passes, before anything that reasons about sizes (memory planning, kernel specialisation).
"""

from __future__ import annotations

import collections
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes, graph_fake_mode, sym_tuple, tensor_val, to_sympy

BATCH = sympy.Symbol("B", integer=True, positive=True)


def shape_propagation(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Annotate every node with sympy shapes in `B`, re-deriving missing FakeTensor metadata first."""
    before = count_nodes(gm)
    missing = nodes_without_val(gm)
    if missing:
        refresh_fake_values(gm)
    annotated, batch_name = annotate_shapes(gm)
    return gm, make_record("shape_propagation", before, gm, annotated,
                           f"annotated {annotated} nodes; batch symbol {batch_name} -> {BATCH}; "
                           f"re-derived metadata for {len(missing)} nodes", rederived=len(missing))


def nodes_without_val(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes a pass created without `meta["val"]` (asserts legitimately have val None, not missing)."""
    return [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr", "call_function") and "val" not in n.meta]


def annotate_shapes(gm: fx.GraphModule) -> tuple[int, str | None]:
    """Write `dsv4c_shape` / `dsv4c_dtype` / `dsv4c_expr`; returns (nodes annotated, export's batch name)."""
    batch = find_batch_symbol(gm)
    subs = {batch: BATCH} if batch is not None else {}
    annotated = 0
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            node.meta["dsv4c_shape"] = tuple(e.xreplace(subs) for e in sym_tuple(val.shape))
            node.meta["dsv4c_dtype"] = val.dtype
            annotated += 1
        elif isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            node.meta["dsv4c_expr"] = to_sympy(val).xreplace(subs)
            annotated += 1
    name = str(batch) if batch is not None else None
    gm.meta["dsv4c_batch_symbol"] = name
    return annotated, name


def find_batch_symbol(gm: fx.GraphModule) -> sympy.Symbol | None:
    """The one free symbol of the input shapes; with several, the one sizing dim 0 of `tokens`, else the
    most common dim-0 symbol. None for a fully static graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbols: set[sympy.Symbol] = set()
    dim0: collections.Counter = collections.Counter()
    for node in placeholders:
        val = tensor_val(node)
        if val is None or val.dim() == 0:
            continue
        shape = sym_tuple(val.shape)
        symbols |= set().union(*(e.free_symbols for e in shape))
        dim0.update(shape[0].free_symbols)
        if node.name == "tokens" and len(shape[0].free_symbols) == 1:
            return next(iter(shape[0].free_symbols))
    if len(symbols) <= 1:
        return next(iter(symbols), None)
    return dim0.most_common(1)[0][0] if dim0 else None


def refresh_fake_values(gm: fx.GraphModule) -> None:
    """Re-run FakeTensor propagation over the whole graph from the placeholders' existing fake inputs."""
    mode = graph_fake_mode(gm.graph)
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if "val" not in node.meta:
            raise ValueError(f"shape propagation: input {node.name} has no meta['val']; "
                             f"capture the graph with torch.export so inputs carry FakeTensors")
        inputs.append(node.meta["val"])
    if mode is None:
        raise ValueError("shape propagation: no FakeTensor in the graph's metadata to propagate from")
    _ConstantAwareFakeProp(gm, mode).propagate_dont_convert_inputs(*inputs)


class _ConstantAwareFakeProp(FakeTensorProp):
    """FakeTensorProp that turns real constant buffers into fakes of the same mode as it fetches them."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor):
            return self._mode.from_tensor(value, static_shapes=True)
        return value
