"""dsv4c's fused ops: `torch.library.custom_op`s in the `dsv4c` namespace.

Each op has a fake (shape) function and a PyTorch reference implementation, so a graph holding it runs
anywhere, on CPU included; Triton kernels registered per target replace the reference where a kernel
exists. Importing this module registers the ops (idempotent: a second import finds them registered).

Ops:
- `dsv4c::dequant_fp8_weight(weight e4m3 [out, in], scale e8m0 [ceil(out/128), ceil(in/128)], dtype)`:
  the exact values of an FP8 weight with 128x128 block scales.
- `dsv4c::dequant_fp4_weight(weight int8 [out, in/2], scale e8m0 [out, in/32], dtype)`: the exact values of
  an MXFP4 weight (two e2m1 codes a byte, low nibble first) with per-32 scales.
"""

from __future__ import annotations

import torch

from ..compiler import quant


@torch.library.custom_op("dsv4c::dequant_fp8_weight", mutates_args=())
def dequant_fp8_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return quant.dequant_fp8_weight(weight, scale).to(dtype)


@dequant_fp8_weight.register_fake
def _(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.new_empty(weight.shape, dtype=dtype)


@torch.library.custom_op("dsv4c::dequant_fp4_weight", mutates_args=())
def dequant_fp4_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return quant.dequant_fp4_weight(weight, scale).to(dtype)


@dequant_fp4_weight.register_fake
def _(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.new_empty((weight.shape[0], weight.shape[1] * 2), dtype=dtype)
