"""A dsv4c op's PyTorch reference implementation, traced to a plan for one call signature.

The ONNX exporter gives each fused op that has no hand-written ONNX body (compiler/onnx_functions.py) a
function body translated from its reference implementation (the Python function the custom op was defined
with): the call's tensor arguments become a small module's inputs, traced by torch.export with the batch
dimension symbolic and every other size and every non-tensor argument fixed, then lowered to a `Plan`
like a whole step. One trace per distinct call signature (an ONNX function overload).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.export import Dim

from dsv4c.runtime.plan import BATCH, Plan

from dsv4c.compiler.capture import MAX_BATCH, flat_graph_module
from dsv4c.compiler.lowering import graph_constants, plan_from_graph
from dsv4c.export.onnx_graph import NotExpressible, Value


class _Call(torch.nn.Module):
    """fn with its tensor arguments as positional inputs and the others fixed."""

    def __init__(self, fn: Callable[..., Any], tensor_names: list[str], fixed: dict[str, Any]):
        super().__init__()
        self.fn, self.tensor_names, self.fixed = fn, tensor_names, fixed

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        return self.fn(**self.fixed, **dict(zip(self.tensor_names, tensors)))


def reference_of(qualname: str) -> Callable[..., Any]:
    """The Python function a `torch.library.custom_op` was defined with (its reference implementation)."""
    from torch._library.custom_ops import OPDEFS  # the registry of custom_op definitions (no public accessor)

    opdef = OPDEFS.get(qualname)
    fn = getattr(opdef, "_init_fn", None)
    if fn is None:
        raise NotExpressible(f"{qualname}: no reference implementation to trace (not a torch.library.custom_op)")
    return fn


def trace_reference(qualname: str, named: dict[str, Any]) -> tuple[Plan, dict[str, torch.Tensor]]:
    """(plan, constants) of the reference implementation for arguments `named` by schema name, tensors
    as `Value`s (their dtypes and dims); inputs are named by the tensor arguments, outputs `output<i>`."""
    fn = reference_of(qualname)
    tensor_names = [name for name, value in named.items() if isinstance(value, Value)]
    fixed = {name: value for name, value in named.items() if name not in tensor_names}
    batch = Dim("batch", min=1, max=MAX_BATCH)
    examples, dynamic = [], []
    for name in tensor_names:
        dims = named[name].dims
        odd = [d for d in dims if not isinstance(d, int) and d != BATCH]
        if odd:
            raise NotExpressible(f"{qualname}: argument {name!r} has size {odd[0]}; only the plain batch dim is traced")
        examples.append(torch.empty([2 if d == BATCH else d for d in dims], dtype=named[name].dtype))
        dynamic.append({i: batch for i, d in enumerate(dims) if d == BATCH} or None)
    program = torch.export.export(_Call(fn, tensor_names, fixed), (tuple(examples),),
                                  dynamic_shapes=(tuple(dynamic),), strict=False)
    gm = flat_graph_module(program)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    plan = plan_from_graph(gm, tensor_names, [f"output{i}" for i in range(len(output.args[0]))])
    return plan, graph_constants(gm, plan)
