"""`dsv4c::rms_norm`: RMSNorm over the last dim, as one op.

    rms_norm(x [..., D] bfloat16|float32, weight [D] | None, eps) -> [..., D] in x's dtype (contiguous)

The value is model/layers.py's `rms_norm(x, weight, eps)`: `x * rsqrt(mean(x^2, -1) + eps)` in fp32, times
`weight` in fp32 when given, cast to x's dtype. The reference below is that function itself, so a graph holding
the op equals the graph it replaces bit for bit on CPU (passes/norm_rope_fusion.py). On CUDA tensors the Triton
kernel of codegen/kernels/norm_rope.py runs instead, one program per row: the mean of the squares sums in another
order, and the reciprocal square root is IEEE (`div_rn(1, sqrt_rn(.))`); it agrees with the reference within one
rounding of x's dtype on a few elements (fp32: relative norm error ~1e-7; bf16: within 1 bf16 ulp,
tests/test_norm_rope_fusion.py). Importing this module registers the op (codegen/ops.py does).
"""

from __future__ import annotations

from typing import Optional

import torch

from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.model.layers import rms_norm as model_rms_norm

KERNEL_MODULE = "dsv4c.codegen.kernels.norm_rope"
DTYPES = (torch.bfloat16, torch.float32)  # the activation dtypes (model/numerics.py) the kernel rounds to


def check(x: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
    """ValueError unless x is bf16 or fp32 with a last dim and weight (if any) is one float of each of its columns."""
    ok = x.dtype in DTYPES and x.dim() >= 1 and (
        weight is None or (weight.dim() == 1 and weight.shape[0] == x.shape[-1] and weight.dtype.is_floating_point))
    if not ok:
        described = "None" if weight is None else f"{tuple(weight.shape)} {weight.dtype}"
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype} (need bf16 or fp32 [..., D]), weight {described} "
                         f"(need None or a float [D])")


def reference(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """The op's definition: model/layers.py's rms_norm (contiguous, as the kernel writes it)."""
    check(x, weight)
    return model_rms_norm(x, weight, eps).contiguous()


def cuda_impl(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """The Triton kernel (imported when the first CUDA call arrives; the reference where Triton is missing)."""
    kernels = triton_kernels(KERNEL_MODULE, "rms_norm")
    if kernels is None:
        return reference(x, weight, eps)
    check(x, weight)
    return kernels.rms_norm(x, weight, eps)


rms_norm = torch.library.custom_op("dsv4c::rms_norm", reference, mutates_args=())


@rms_norm.register_fake
def _(x, weight, eps):
    check(x, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


rms_norm.register_kernel("cuda")(cuda_impl)
