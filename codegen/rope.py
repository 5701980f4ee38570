"""`dsv4c::rope` and `dsv4c::rms_norm_rope`: RoPE on interleaved pairs, alone or after an RMSNorm, as one op.

    rope(x [..., D] bfloat16|float32, positions [...], inv_freq float32 [R/2], inverse) -> [..., D] in x's dtype
    rms_norm_rope(x, weight [D] | None, eps, positions, inv_freq, inverse) = rope(rms_norm(x, weight, eps), ...)

The value of `rope` is model/layers.py's `apply_rope(x, positions, inv_freq, inverse)`: the last R dims rotate by
pairs (x[2i], x[2i+1]) by the angles `positions.float() * inv_freq` (fp32; the conjugate with `inverse`), the
first D - R dims pass unchanged; positions broadcast against x's leading dims (a `[B, T, 1]` position serves
every head of a `[B, T, H, D]` query). `rms_norm_rope` is exactly `apply_rope(rms_norm(x, weight, eps), ...)`
(codegen/rms_norm.py), the normed row rounded to x's dtype before it rotates, as the model does: the query and
the KV row of every attention layer are normed, then rotated (model/attention.py). The references below are the
model's functions, so a graph holding these ops equals the graph they replace bit for bit on CPU.

Contract beyond the model's: x is bf16 or fp32, D - R is even (the kernel splits the whole row into pairs), the
outputs are contiguous. On CUDA tensors the Triton kernel of codegen/kernels/norm_rope.py runs instead, one
program per row: angles in fp32 from the same product, cos and sin from libdevice (Triton's `tl.cos`/`tl.sin`;
they and torch's differ in the last ulp), the rotations' products possibly fused into FMAs; it agrees with the
reference within one rounding of x's dtype on a few elements (fp32: relative norm error ~1e-6 at positions up to
1e5; bf16: within 1 bf16 ulp, tests/test_norm_rope_fusion.py). Importing this module registers the ops
(codegen/ops.py does).
"""

from __future__ import annotations

from typing import Optional

import torch

from dsv4c.codegen import rms_norm
from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.model.layers import apply_rope
from dsv4c.model.layers import rms_norm as model_rms_norm

KERNEL_MODULE = rms_norm.KERNEL_MODULE


def check(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """ValueError unless x is bf16 or fp32 `[..., D]`, inv_freq fp32 `[R/2]` with 0 < R <= D and D - R even, and
    positions a real tensor that broadcasts into x's leading dims."""
    lead = tuple(x.shape[:-1])
    rope_dim = 2 * inv_freq.numel()
    try:
        fits = tuple(torch.broadcast_shapes(tuple(positions.shape), lead)) == lead
    except RuntimeError:
        fits = False
    ok = (x.dtype in rms_norm.DTYPES and x.dim() >= 1 and inv_freq.dim() == 1 and inv_freq.dtype == torch.float32
          and 0 < rope_dim <= x.shape[-1] and (x.shape[-1] - rope_dim) % 2 == 0 and fits
          and not positions.is_complex() and positions.dtype != torch.bool)
    if not ok:
        raise ValueError(f"rope: x {tuple(x.shape)} {x.dtype} (need bf16 or fp32 [..., D]), inv_freq "
                         f"{tuple(inv_freq.shape)} {inv_freq.dtype} (need fp32 [R/2], 0 < R <= D, D - R even), "
                         f"positions {tuple(positions.shape)} {positions.dtype} (need real values broadcasting to "
                         f"{lead})")


def rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The op's definition: model/layers.py's apply_rope."""
    check(x, positions, inv_freq)
    return apply_rope(x, positions, inv_freq, inverse).contiguous()


def rms_norm_rope_reference(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, positions: torch.Tensor,
                            inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The op's definition: model/layers.py's apply_rope of its rms_norm."""
    rms_norm.check(x, weight)
    check(x, positions, inv_freq)
    return apply_rope(model_rms_norm(x, weight, eps), positions, inv_freq, inverse).contiguous()


def rope_cuda(x, positions, inv_freq, inverse):
    """The Triton kernel (imported when the first CUDA call arrives; the reference where Triton is missing)."""
    kernels = triton_kernels(KERNEL_MODULE, "rope")
    if kernels is None:
        return rope_reference(x, positions, inv_freq, inverse)
    check(x, positions, inv_freq)
    return kernels.rope(x, positions, inv_freq, inverse)


def rms_norm_rope_cuda(x, weight, eps, positions, inv_freq, inverse):
    """The Triton kernel (imported when the first CUDA call arrives; the reference where Triton is missing)."""
    kernels = triton_kernels(KERNEL_MODULE, "rms_norm_rope")
    if kernels is None:
        return rms_norm_rope_reference(x, weight, eps, positions, inv_freq, inverse)
    rms_norm.check(x, weight)
    check(x, positions, inv_freq)
    return kernels.rms_norm_rope(x, weight, eps, positions, inv_freq, inverse)


rope = torch.library.custom_op("dsv4c::rope", rope_reference, mutates_args=())
rms_norm_rope = torch.library.custom_op("dsv4c::rms_norm_rope", rms_norm_rope_reference, mutates_args=())


@rope.register_fake
def _(x, positions, inv_freq, inverse):
    check(x, positions, inv_freq)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@rms_norm_rope.register_fake
def _(x, weight, eps, positions, inv_freq, inverse):
    rms_norm.check(x, weight)
    check(x, positions, inv_freq)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


rope.register_kernel("cuda")(rope_cuda)
rms_norm_rope.register_kernel("cuda")(rms_norm_rope_cuda)
