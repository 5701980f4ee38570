"""dsv4c's fused ops: `torch.library.custom_op`s in the `dsv4c` namespace.

Each op has a fake (shape) function and a PyTorch reference implementation, so a graph holding it runs
anywhere, on CPU included; Triton kernels registered per target replace the reference where a kernel
exists. Importing this module registers the ops (idempotent: a second import finds them registered).

Ops:
- `dsv4c::dequant_fp8_weight(weight e4m3 [out, in], scale e8m0 [ceil(out/128), ceil(in/128)], dtype)`:
  the exact values of an FP8 weight with 128x128 block scales.
- `dsv4c::dequant_fp4_weight(weight int8 [out, in/2], scale e8m0 [out, in/32], dtype)`: the exact values of
  an MXFP4 weight (two e2m1 codes a byte, low nibble first) with per-32 scales.

mHC boundary ops (spec section 2; reference bodies in codegen/mhc_reference.py, i.e. compiler/layers.py's
math; any leading dims, flattened to N tokens inside; `n` streams of width `D`; post/comb fp32):
- `dsv4c::hc_pre(streams [..., n, D], fn [(2+n)n, nD], base [(2+n)n], scale [3], norm_weight [D], rms_eps,
  hc_eps, iters) -> (normed [..., D] in streams' dtype, post [..., n], comb [..., n, n])`: the mHC pre of a
  sub-layer (Sinkhorn of `iters` iterations) followed by the sub-layer's RMSNorm.
- `dsv4c::hc_post(block_out [..., D], streams, post, comb) -> new_streams [..., n, D]`.
- `dsv4c::hc_post_pre(block_out, streams, post, comb, fn, base, scale, norm_weight, rms_eps, hc_eps, iters)
  -> (new_streams, normed, post_next, comb_next)`: one sub-layer's post fused with the next one's pre.
- `dsv4c::hc_head(streams, fn [n, nD], base [n], scale [1], norm_weight, rms_eps, hc_eps) -> normed [..., D]`:
  the final collapse of the streams and the final RMSNorm.
"""

from __future__ import annotations

import torch

from dsv4c.model import quant
from dsv4c.codegen import mhc_reference
from dsv4c.codegen.mhc_shapes import flat_post_inputs, pre_outputs, tokens


def dequant_fp8_weight_reference(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return quant.dequant_fp8_weight(weight, scale).to(dtype)


dequant_fp8_weight = torch.library.custom_op("dsv4c::dequant_fp8_weight", dequant_fp8_weight_reference, mutates_args=())


@dequant_fp8_weight.register_fake
def _(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.new_empty(weight.shape, dtype=dtype)


def dequant_fp4_weight_reference(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return quant.dequant_fp4_weight(weight, scale).to(dtype)


dequant_fp4_weight = torch.library.custom_op("dsv4c::dequant_fp4_weight", dequant_fp4_weight_reference, mutates_args=())


@dequant_fp4_weight.register_fake
def _(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.new_empty((weight.shape[0], weight.shape[1] * 2), dtype=dtype)


# ---- mHC -------------------------------------------------------------------------------------------
def _pre_fakes(streams: torch.Tensor):
    *lead, n, d = streams.shape
    return (streams.new_empty((*lead, d)), streams.new_empty((*lead, n), dtype=torch.float32),
            streams.new_empty((*lead, n, n), dtype=torch.float32))


def hc_pre_reference(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           norm_weight: torch.Tensor, rms_eps: float, hc_eps: float,
           iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lead, flat = tokens(streams)
    return pre_outputs(lead, *mhc_reference.hc_pre(flat, fn, base, scale, norm_weight, rms_eps, hc_eps, iters))


hc_pre = torch.library.custom_op("dsv4c::hc_pre", hc_pre_reference, mutates_args=())


@hc_pre.register_fake
def _(streams, fn, base, scale, norm_weight, rms_eps, hc_eps, iters):
    return _pre_fakes(streams)


def hc_post_reference(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor) -> torch.Tensor:
    lead, flat = flat_post_inputs(block_out, streams, post, comb)
    return mhc_reference.hc_post(*flat).reshape(streams.shape)


hc_post = torch.library.custom_op("dsv4c::hc_post", hc_post_reference, mutates_args=())


@hc_post.register_fake
def _(block_out, streams, post, comb):
    return torch.empty_like(streams, memory_format=torch.contiguous_format)


def hc_post_pre_reference(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
                rms_eps: float, hc_eps: float,
                iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lead, flat = flat_post_inputs(block_out, streams, post, comb)
    new, *pre = mhc_reference.hc_post_pre(*flat, fn, base, scale, norm_weight, rms_eps, hc_eps, iters)
    return (new.reshape(streams.shape), *pre_outputs(lead, *pre))


hc_post_pre = torch.library.custom_op("dsv4c::hc_post_pre", hc_post_pre_reference, mutates_args=())


@hc_post_pre.register_fake
def _(block_out, streams, post, comb, fn, base, scale, norm_weight, rms_eps, hc_eps, iters):
    return (torch.empty_like(streams, memory_format=torch.contiguous_format), *_pre_fakes(streams))


def hc_head_reference(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            norm_weight: torch.Tensor, rms_eps: float, hc_eps: float) -> torch.Tensor:
    lead, flat = tokens(streams)
    normed = mhc_reference.hc_head(flat, fn, base, scale, norm_weight, rms_eps, hc_eps)
    return normed.reshape(*lead, normed.shape[-1])


hc_head = torch.library.custom_op("dsv4c::hc_head", hc_head_reference, mutates_args=())


@hc_head.register_fake
def _(streams, fn, base, scale, norm_weight, rms_eps, hc_eps):
    return streams.new_empty((*streams.shape[:-2], streams.shape[-1]))


# The Triton kernels on CUDA tensors (Triton is imported only when one arrives); CPU keeps the references.
from dsv4c.codegen import cuda_impls  # noqa: E402

cuda_impls.register()
from dsv4c.codegen import routed_moe  # noqa: E402,F401  (dsv4c::routed_moe, with its CUDA kernel)
from dsv4c.codegen import fp8_linear  # noqa: E402,F401  (dsv4c::fp8_linear, with its CUDA kernel)
from dsv4c.codegen import fp8_grouped_linear  # noqa: E402,F401  (dsv4c::fp8_grouped_linear, its kernel)
from dsv4c.codegen import bf16_linear  # noqa: E402,F401  (dsv4c::bf16_linear, on the batch-invariant matmul)
from dsv4c.codegen import moe_fp4  # noqa: E402,F401  (dsv4c::moe_fp4, with its CUDA kernel)
from dsv4c.codegen import act_rounding  # noqa: E402,F401  (dsv4c::fake_quant_fp8 / fp4's CUDA kernel)
from dsv4c.codegen import hadamard_rounding  # noqa: E402,F401  (dsv4c::hadamard_fake_quant_fp4, its kernel)
from dsv4c.codegen import kv_cache  # noqa: E402,F401  (dsv4c::kv_pack / kv_unpack, compressed cache rows)
from dsv4c.codegen import kv_pack  # noqa: E402,F401  (dsv4c::kv_pack's CUDA kernel)
from dsv4c.codegen import sparse_attention  # noqa: E402,F401  (dsv4c::sparse_decode_attention, its kernel)
from dsv4c.codegen import compressor  # noqa: E402,F401  (dsv4c::compress_step_, its kernel)
from dsv4c.codegen import lightning_indexer  # noqa: E402,F401  (dsv4c::lightning_indexer, its kernels)
from dsv4c.codegen import rms_norm, rope  # noqa: E402,F401  (dsv4c::rms_norm / rope / rms_norm_rope, their kernel)
