"""`dsv4c::routed_moe`: the routed experts of one MoE layer, reading only the experts the tokens selected.

    routed_moe(x [..., D] (activation dtype), ids [..., k] int64, weights [..., k] fp32,
               w1, s1, w3, s3, w2, s2: lists of E tensors, swiglu_limit: float | None, act_quant: bool)
        -> fp32 [..., D]

computes model/layers.py `routed_experts`: for each token, the sum over its k selected experts of
`swiglu_expert(x, W1[e], W2[e], W3[e], weight, swiglu_limit)` with the activation dtype `x.dtype`
(gate and up rounded to it, the SwiGLU and the routing weight in fp32, the hidden rounded to it before w2,
each expert's output rounded to it, the sum in fp32) and, with `act_quant`, each matmul input rounded to
FP8 e4m3 per 128 (W4A8). The weights are the checkpoint's per-expert tensors, never stacked: w1[e], w3[e]
MXFP4 int8 `[I, D/2]` with e8m0 scales s1[e], s3[e] `[I, D/32]`; w2[e] int8 `[D, I/2]` with s2[e]
`[D, I/32]`. ids must lie in [0, E) (the router's top-k or hash table gives them so; nothing checks it on a
GPU, since checking reads the ids on the host).

Implementations:
- the reference (CPU, and GPUs where Triton is not installed): loops over the experts some token selected
  (`ids.unique()`) and decodes only their weights; an expert no token chose is not touched;
- CUDA: the Triton kernels of codegen/kernels/routed_moe.py, which read only the selected experts' packed
  weights through a table of their addresses and never wait for the host (CUDA-graph capturable once the
  table of each weight set exists: the first call with those tensors builds it, so run once before capture).
  Where Triton is installed, a kernel module that fails to import is an error naming it, never a silent
  switch to the reference (as codegen/cuda_impls.py);
- `every_expert`: the same sum as a graph of fixed shape (every expert on every token, weight zero where
  not selected), which the ONNX exporter traces as the op's function body.
"""

from __future__ import annotations

import torch

from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.model import quant
from dsv4c.model.layers import swiglu_expert
from dsv4c.model.numerics import Numerics

WEIGHT_LISTS = ("w1", "s1", "w3", "s3", "w2", "s2")
KERNEL_MODULE = "dsv4c.codegen.kernels.routed_moe"


def _numerics(x: torch.Tensor, act_quant: bool) -> Numerics:
    """The roundings `swiglu_expert` applies: activation dtype and FP8 activation quantisation."""
    return Numerics(dtype=x.dtype, act_quant=act_quant)


def _check(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, lists: tuple[list[torch.Tensor], ...]) -> None:
    """Shapes and list lengths (host metadata only: nothing reads a tensor's values)."""
    if (ids.dtype != torch.int64 or weights.dtype != torch.float32 or ids.shape != weights.shape
            or ids.shape[:-1] != x.shape[:-1]):
        raise ValueError(f"routed_moe: ids {tuple(ids.shape)} {ids.dtype} and weights {tuple(weights.shape)} must "
                         f"be int64 / fp32 [..., k] with x's leading dims {tuple(x.shape[:-1])}")
    lengths = {name: len(values) for name, values in zip(WEIGHT_LISTS, lists)}
    if len(set(lengths.values())) != 1 or not lengths["w1"]:
        raise ValueError(f"routed_moe: the weight lists need one entry per expert each, got {lengths}")


def reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: list[torch.Tensor],
              s1: list[torch.Tensor], w3: list[torch.Tensor], s3: list[torch.Tensor], w2: list[torch.Tensor],
              s2: list[torch.Tensor], swiglu_limit: float | None, act_quant: bool) -> torch.Tensor:
    """The op's PyTorch reference: the selected experts only, each decoded and run on its tokens."""
    _check(x, ids, weights, (w1, s1, w3, s3, w2, s2))
    num, k = _numerics(x, act_quant), ids.shape[-1]
    flat, ids, weights = x.reshape(-1, x.shape[-1]), ids.reshape(-1, k), weights.reshape(-1, k)
    out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
    for expert in ids.unique().tolist():
        rows, slot = (ids == expert).nonzero(as_tuple=True)
        gate, down, up = (quant.dequant_fp4_weight(w[expert], s[expert]) for w, s in ((w1, s1), (w2, s2), (w3, s3)))
        y = swiglu_expert(flat[rows], gate, down, up, weights[rows, slot], swiglu_limit, num)
        out.index_add_(0, rows, y.float())
    return out.reshape(x.shape)


routed_moe = torch.library.custom_op("dsv4c::routed_moe", reference, mutates_args=())


@routed_moe.register_fake
def _(x, ids, weights, w1, s1, w3, s3, w2, s2, swiglu_limit, act_quant):
    _check(x, ids, weights, (w1, s1, w3, s3, w2, s2))
    return x.new_empty(x.shape, dtype=torch.float32)


@routed_moe.register_kernel("cuda")
def _(x, ids, weights, w1, s1, w3, s3, w2, s2, swiglu_limit, act_quant):
    _check(x, ids, weights, (w1, s1, w3, s3, w2, s2))
    kernels = triton_kernels(KERNEL_MODULE, "routed_moe")
    if kernels is None:  # no Triton: the reference, on the GPU (it reads the selected ids on the host)
        return reference(x, ids, weights, w1, s1, w3, s3, w2, s2, swiglu_limit, act_quant)
    k = ids.shape[-1]
    out = kernels.routed_moe(x.reshape(-1, x.shape[-1]), ids.reshape(-1, k), weights.reshape(-1, k),
                             (w1, s1, w3, s3, w2, s2), swiglu_limit, act_quant)
    return out.reshape(x.shape)


def every_expert(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: list[torch.Tensor],
                 s1: list[torch.Tensor], w3: list[torch.Tensor], s3: list[torch.Tensor], w2: list[torch.Tensor],
                 s2: list[torch.Tensor], swiglu_limit: float | None, act_quant: bool) -> torch.Tensor:
    """`routed_moe` with every expert run on every token (routing weight zero where not selected, which adds
    exactly zero) and the weights decoded by `dsv4c::dequant_fp4_weight`: a graph of fixed shape that
    torch.export can trace, kept in x's leading dims (the ONNX exporter traces a body generic in the plain
    batch dim only): the op's ONNX function body (export/onnx_reference.py). Not for running."""
    num = _numerics(x, act_quant)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(len(w1)):
        combine = torch.where(ids == expert, weights, 0.0).sum(-1)
        gate, down, up = (torch.ops.dsv4c.dequant_fp4_weight(w[expert], s[expert], torch.float32)
                          for w, s in ((w1, s1), (w2, s2), (w3, s3)))
        out = out + swiglu_expert(x, gate, down, up, combine, swiglu_limit, num).float()
    return out
