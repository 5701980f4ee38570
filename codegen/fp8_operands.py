"""The operands `dsv4c::fp8_linear` takes (codegen/fp8_linear.py), checked in one place for the op, its
reference and the Triton wrapper (codegen/kernels/fp8_gemm.py)."""

from __future__ import annotations

import torch

QUANT_BLOCK = 128
X_DTYPES = (torch.float32, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.bfloat16)


def check_operands(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> None:
    """ValueError naming the operand that does not fit `x [..., K] @ weight [N, K]^T` with 128x128 scales."""
    if x.dim() < 1 or x.dtype not in X_DTYPES:
        raise ValueError(f"fp8_linear: x must be a float32 or bfloat16 [..., K] tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"fp8_linear: weight must be float8_e4m3fn [N, K={x.shape[-1]}], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    blocks = tuple(-(-size // QUANT_BLOCK) for size in weight.shape)
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8) or tuple(scale.shape) != blocks:
        raise ValueError(f"fp8_linear: scale must be float8_e8m0fnu {blocks} (one per 128x128 block), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"fp8_linear: out_dtype must be float32 or bfloat16, got {out_dtype}")
