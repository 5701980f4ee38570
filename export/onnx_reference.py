"""A dsv4c op's PyTorch reference implementation, traced to a plan for one call signature.

The ONNX exporter gives each fused op that has no hand-written ONNX body (compiler/onnx_functions.py) a
function body translated from its reference implementation (the Python function the custom op was defined
with, `REFERENCES`; for an op whose reference branches on data, its equivalent of fixed shape): the
call's tensor arguments (each element of a tensor list one input, `w_0`, `w_1`, ...) become a small module's
inputs, traced by torch.export with the batch dimension symbolic and every other size and every non-tensor
argument fixed, then lowered to a `Plan` like a whole step. One trace per distinct call signature (an ONNX
function overload).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.export import Dim

from dsv4c.codegen import (compressor, fp8_grouped_linear, fp8_linear, hadamard_rounding, kv_cache, lightning_indexer,
                           moe_fp4, ops, rms_norm, rope, routed_moe, sparse_attention)
from dsv4c.model import rounding_ops
from dsv4c.runtime.plan import BATCH, Plan

from dsv4c.compiler.capture import MAX_BATCH, flat_graph_module
from dsv4c.compiler.lowering import graph_constants, plan_from_graph
from dsv4c.export.onnx_graph import NotExpressible, Value


# The function each dsv4c op is defined with (its PyTorch reference), traced for its ONNX body; for an op whose
# reference runs only what the data selects (a graph torch.export cannot trace), the same function as a graph
# of fixed shape.
REFERENCES: dict[str, Callable[..., Any]] = {
    "dsv4c::dequant_fp8_weight": ops.dequant_fp8_weight_reference,
    "dsv4c::dequant_fp4_weight": ops.dequant_fp4_weight_reference,
    "dsv4c::hc_pre": ops.hc_pre_reference,
    "dsv4c::hc_post": ops.hc_post_reference,
    "dsv4c::hc_post_pre": ops.hc_post_pre_reference,
    "dsv4c::hc_head": ops.hc_head_reference,
    "dsv4c::fake_quant_fp8": rounding_ops.fake_quant_fp8_reference,
    "dsv4c::fake_quant_fp4": rounding_ops.fake_quant_fp4_reference,
    "dsv4c::hadamard_fake_quant_fp4": hadamard_rounding.reference,
    "dsv4c::fp8_linear": fp8_linear.reference,
    "dsv4c::fp8_grouped_linear": fp8_grouped_linear.reference,
    "dsv4c::routed_moe": routed_moe.every_expert,
    "dsv4c::moe_fp4": moe_fp4.every_expert,
    "dsv4c::kv_pack": kv_cache.pack_reference,
    "dsv4c::kv_unpack": kv_cache.unpack_reference,
    "dsv4c::sparse_decode_attention": sparse_attention.reference,
    "dsv4c::rms_norm": rms_norm.reference,
    "dsv4c::rope": rope.rope_reference,
    "dsv4c::rms_norm_rope": rope.rms_norm_rope_reference,
    "dsv4c::compress_step_": compressor.written_values,
    "dsv4c::lightning_indexer": lightning_indexer.reference,
}


class _Call(torch.nn.Module):
    """fn with its tensor arguments as positional inputs and the others fixed. `arguments`: in input order,
    (name, None) for a tensor argument, (name, n) for a tensor list of n elements (n inputs)."""

    def __init__(self, fn: Callable[..., Any], arguments: list[tuple[str, int | None]], fixed: dict[str, Any]):
        super().__init__()
        self.fn, self.arguments, self.fixed = fn, arguments, fixed

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        named, rest = {}, list(tensors)
        for name, count in self.arguments:
            if count is None:
                named[name], rest = rest[0], rest[1:]
            else:
                named[name], rest = rest[:count], rest[count:]
        return self.fn(**self.fixed, **named)


def reference_of(qualname: str) -> Callable[..., Any]:
    """The function to trace for a dsv4c op (`REFERENCES`); NotExpressible for an op it does not know."""
    if qualname not in REFERENCES:
        raise NotExpressible(f"{qualname}: no reference implementation to trace")
    return REFERENCES[qualname]


def trace_reference(qualname: str, named: dict[str, Any]) -> tuple[Plan, dict[str, torch.Tensor]]:
    """(plan, constants) of the reference implementation for arguments `named` by schema name, tensors
    as `Value`s (their dtypes and dims); inputs are named by the tensor arguments, outputs `output<i>`."""
    fn = reference_of(qualname)
    arguments: list[tuple[str, int | None]] = []
    inputs: list[tuple[str, Value]] = []
    for name, value in named.items():
        if isinstance(value, Value):
            arguments.append((name, None))
            inputs.append((name, value))
        elif _is_tensor_list(value):
            arguments.append((name, len(value)))
            inputs.extend((f"{name}_{i}", v) for i, v in enumerate(value))
    fixed = {name: value for name, value in named.items() if name not in dict(arguments)}
    batch = Dim("batch", min=1, max=MAX_BATCH)
    examples, dynamic = [], []
    for name, value in inputs:
        odd = [d for d in value.dims if not isinstance(d, int) and d != BATCH]
        if odd:
            raise NotExpressible(f"{qualname}: argument {name!r} has size {odd[0]}; only the plain batch dim is traced")
        examples.append(torch.empty([2 if d == BATCH else d for d in value.dims], dtype=value.dtype))
        dynamic.append({i: batch for i, d in enumerate(value.dims) if d == BATCH} or None)
    program = torch.export.export(_Call(fn, arguments, fixed), (tuple(examples),),
                                  dynamic_shapes=(tuple(dynamic),), strict=False)
    gm = flat_graph_module(program)
    _read_constants_directly(gm)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    plan = plan_from_graph(gm, [name for name, _ in inputs], [f"output{i}" for i in range(len(output.args[0]))])
    return plan, graph_constants(gm, plan)


_CONSTANT_COPIES = (torch.ops.aten.lift_fresh_copy.default, torch.ops.aten.detach_.default)


def _read_constants_directly(gm: torch.fx.GraphModule) -> None:
    """A tensor the reference builds (`torch.tensor(...)`, e.g. quant.py's e2m1 table) is traced as
    `detach_(lift_fresh_copy(constant))`; neither changes a value and nothing writes the constant, so the
    body reads the constant itself (ONNX has no copy, and refuses the in-place detach_)."""
    for node in list(gm.graph.nodes):
        if node.target in _CONSTANT_COPIES and node.args[0].op == "get_attr":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()


def _is_tensor_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Value) for v in value)
