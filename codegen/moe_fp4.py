"""`dsv4c::moe_fp4`: a whole MoE layer as one op: the routing, the routed experts on their packed MXFP4 weights
and the shared expert on its FP8 weights, combined.

    moe_fp4(x [..., D] (activation dtype),
            router [E, D] (floating), bias [E] | None, table [V, k] (integer) | None, tokens (N ids) | None,
            w1, s1, w3, s3, w2, s2: lists of E tensors (routed, MXFP4 as codegen/routed_moe.py),
            shared: [w1, s1, w3, s3, w2, s2] (FP8 e4m3 with e8m0 scales per 128 x 128 block),
            top_k: int, scoring: str, normalize: bool, routed_scale: float,
            swiglu_limit: float | None, shared_limit: float | None, activations: str, shared_act_quant: bool)
        -> [..., D] in x's dtype

computes model/layers.py `moe`: the routing of codegen/moe_routing.py `route` (score-routed layers pass the
selection bias, hash layers the table and the token ids of x's rows), then `(routed + shared.float()).to(x.dtype)`
where `routed` is the fp32 sum over each token's selections of `swiglu_expert` times its routing weight (each
expert's output rounded to x's dtype) and `shared` the unweighted shared expert clamped to `shared_limit`. What
rounds each expert matmul's input is the only thing `activations` changes, for the routed experts:
- "w4a8": FP8 e4m3 per 128 with power-of-two scales (`quant.fake_quant_fp8`), DeepSeek's faithful numerics;
- "w4a16": nothing (the activations as they are: the model's plain numerics);
- "w4a4": MXFP4 e2m1 per 32 with power-of-two scales (`quant.fake_quant_fp4`): opt-in, it changes numerics.
The shared expert's inputs are rounded to FP8 per 128 when `shared_act_quant` (faithful), else not.
With activations "w4a8" and shared_act_quant, the op equals the model's faithful `moe`; with "w4a16" and not
shared_act_quant, its plain one.

Implementations: the reference below (CPU; GPUs without Triton), which decodes only the experts some token
chose; CUDA: the Triton kernels of codegen/kernels/moe_fp4.py (routing included; no host synchronisation:
CUDA-graph capturable once its pointer table exists, as `routed_moe`'s); `every_expert`: the same values as a
graph of fixed shape (every expert on every token, weight zero where not selected), the op's ONNX function
body. Hash tables must hold ids in [0, E) and the token ids must index the table.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dsv4c.codegen import moe_routing
from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.codegen.kernels.moe_fp4_launch import ACTIVATIONS
from dsv4c.codegen.moe_routing import Routing
from dsv4c.codegen.routed_moe import WEIGHT_LISTS
from dsv4c.model import quant, rounding_ops

KERNEL_MODULE = "dsv4c.codegen.kernels.moe_fp4"
# Each through its dsv4c op (exactly quant.py's function) so a traced body holds the rounding as one node.
ROUNDINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "w4a8": lambda x: rounding_ops.fake_quant_fp8(x, 128),
    "w4a16": lambda x: x,
    "w4a4": lambda x: rounding_ops.fake_quant_fp4(x, 32),
}


def check(x: torch.Tensor, lists: tuple[list[torch.Tensor], ...], shared: list[torch.Tensor],
          activations: str) -> None:
    """The experts' shapes, dtypes and list lengths (host metadata only: nothing reads a tensor's values)."""
    lengths = {name: len(values) for name, values in zip(WEIGHT_LISTS, lists)}
    if len(set(lengths.values())) != 1 or not lengths["w1"]:
        raise ValueError(f"moe_fp4: the routed weight lists need one entry per expert each, got {lengths}")
    if len(shared) != 6 or shared[0].dtype != torch.float8_e4m3fn or shared[0].shape[1] != x.shape[-1]:
        raise ValueError(f"moe_fp4: shared must be the FP8 [w1, s1, w3, s3, w2, s2] of width {x.shape[-1]}, got "
                         f"{[(tuple(t.shape), t.dtype) for t in shared]}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"moe_fp4: activations {activations!r}; allowed: {', '.join(ACTIVATIONS)}")


def checked_routing(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
                    tokens: torch.Tensor | None, lists: tuple[list[torch.Tensor], ...], shared: list[torch.Tensor],
                    top_k: int, scoring: str, normalize: bool, routed_scale: float, activations: str) -> Routing:
    """Every operand checked (`check`, `moe_routing.check`); the op's routing arguments as a `Routing`."""
    check(x, lists, shared, activations)
    routing = Routing(top_k, scoring, normalize, routed_scale)
    moe_routing.check(x, router, bias, table, tokens, routing, len(lists[0]))
    return routing


def expert(x: torch.Tensor, gate: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None,
           limit: float | None, rounding: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """model/layers.py `swiglu_expert` with `rounding` before each matmul (decoded fp32 weights; x's dtype)."""
    def linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (rounding(a).float() @ w.T).to(x.dtype)

    g, u = linear(x, gate).float(), linear(x, up).float()
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    hidden = F.silu(g) * u
    if weight is not None:
        hidden = hidden * weight.unsqueeze(-1)
    return linear(hidden.to(x.dtype), down)


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, lists: tuple[list[torch.Tensor], ...],
            shared: list[torch.Tensor], swiglu_limit: float | None, shared_limit: float | None, activations: str,
            shared_act_quant: bool) -> torch.Tensor:
    """The routed experts chosen by ids [N, k] with weights [N, k], the shared expert and the combine, for
    x [N, D]: the selected experts only, each decoded and run on its tokens."""
    w1, s1, w3, s3, w2, s2 = lists
    rounding = ROUNDINGS[activations]
    routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        rows, slot = (ids == e).nonzero(as_tuple=True)
        gate, down, up = (quant.dequant_fp4_weight(w[e], s[e]) for w, s in ((w1, s1), (w2, s2), (w3, s3)))
        routed.index_add_(0, rows, expert(x[rows], gate, down, up, weights[rows, slot], swiglu_limit,
                                          rounding).float())
    gate, down, up = (quant.dequant_fp8_weight(shared[j], shared[j + 1]) for j in (0, 4, 2))
    own = ROUNDINGS["w4a8" if shared_act_quant else "w4a16"]
    return (routed + expert(x, gate, down, up, None, shared_limit, own).float()).to(x.dtype)


def reference(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
              tokens: torch.Tensor | None, w1: list[torch.Tensor], s1: list[torch.Tensor], w3: list[torch.Tensor],
              s3: list[torch.Tensor], w2: list[torch.Tensor], s2: list[torch.Tensor], shared: list[torch.Tensor],
              top_k: int, scoring: str, normalize: bool, routed_scale: float, swiglu_limit: float | None,
              shared_limit: float | None, activations: str, shared_act_quant: bool) -> torch.Tensor:
    """The op's PyTorch reference: the model's routing (`moe_routing.route`), then `experts`."""
    lists = (w1, s1, w3, s3, w2, s2)
    routing = checked_routing(x, router, bias, table, tokens, lists, shared, top_k, scoring, normalize,
                              routed_scale, activations)
    flat = x.reshape(-1, x.shape[-1])
    ids, weights = moe_routing.route(flat, router, bias, table, tokens, routing)
    out = experts(flat, ids, weights, lists, shared, swiglu_limit, shared_limit, activations, shared_act_quant)
    return out.reshape(x.shape)


moe_fp4 = torch.library.custom_op("dsv4c::moe_fp4", reference, mutates_args=())


@moe_fp4.register_fake
def _(x, router, bias, table, tokens, w1, s1, w3, s3, w2, s2, shared, top_k, scoring, normalize, routed_scale,
      swiglu_limit, shared_limit, activations, shared_act_quant):
    checked_routing(x, router, bias, table, tokens, (w1, s1, w3, s3, w2, s2), shared, top_k, scoring, normalize,
                    routed_scale, activations)
    return x.new_empty(x.shape)


@moe_fp4.register_kernel("cuda")
def _(x, router, bias, table, tokens, w1, s1, w3, s3, w2, s2, shared, top_k, scoring, normalize, routed_scale,
      swiglu_limit, shared_limit, activations, shared_act_quant):
    lists = (w1, s1, w3, s3, w2, s2)
    kernels = triton_kernels(KERNEL_MODULE, "moe_fp4")
    if kernels is None:  # no Triton: the reference, on the GPU (it reads the selected ids on the host)
        return reference(x, router, bias, table, tokens, *lists, shared, top_k, scoring, normalize, routed_scale,
                         swiglu_limit, shared_limit, activations, shared_act_quant)
    routing = Routing(top_k, scoring, normalize, routed_scale)  # (the kernels' wrapper checks every operand)
    out = kernels.moe_fp4(x.reshape(-1, x.shape[-1]), router, bias, table, tokens, routing, lists, shared,
                          swiglu_limit, shared_limit, activations, shared_act_quant)
    return out.reshape(x.shape)


def every_expert(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
                 tokens: torch.Tensor | None, w1: list[torch.Tensor], s1: list[torch.Tensor],
                 w3: list[torch.Tensor], s3: list[torch.Tensor], w2: list[torch.Tensor], s2: list[torch.Tensor],
                 shared: list[torch.Tensor], top_k: int, scoring: str, normalize: bool, routed_scale: float,
                 swiglu_limit: float | None, shared_limit: float | None, activations: str,
                 shared_act_quant: bool) -> torch.Tensor:
    """`reference` with every expert run on every token (routing weight zero where not selected: its output
    is an exact zero, added in the reference's expert order) and the weights decoded by the dsv4c dequant
    ops: a graph of fixed shape that torch.export can trace, kept in x's leading dims (the ONNX exporter
    traces a body generic in the plain batch dim only): the op's ONNX function body
    (export/onnx_reference.py). Not for running: it reads every expert."""
    routing = Routing(top_k, scoring, normalize, routed_scale)
    ids, weights = moe_routing.route(x.reshape(-1, x.shape[-1]), router, bias, table, tokens, routing)
    ids, weights = ids.reshape(*x.shape[:-1], top_k), weights.reshape(*x.shape[:-1], top_k)
    rounding, dsv4c = ROUNDINGS[activations], torch.ops.dsv4c
    routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(len(w1)):
        combine = torch.where(ids == e, weights, 0.0).sum(-1)
        gate, down, up = (dsv4c.dequant_fp4_weight(w[e], s[e], torch.float32)
                          for w, s in ((w1, s1), (w2, s2), (w3, s3)))
        routed = routed + expert(x, gate, down, up, combine, swiglu_limit, rounding).float()
    gate, down, up = (dsv4c.dequant_fp8_weight(shared[j], shared[j + 1], torch.float32) for j in (0, 4, 2))
    own = ROUNDINGS["w4a8" if shared_act_quant else "w4a16"]
    return (routed + expert(x, gate, down, up, None, shared_limit, own).float()).to(x.dtype)
