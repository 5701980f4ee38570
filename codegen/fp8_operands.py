"""The operands `dsv4c::fp8_linear` (codegen/fp8_linear.py) and `dsv4c::fp8_grouped_linear`
(codegen/fp8_grouped_linear.py) take, checked in one place for the ops, their references and the Triton wrappers
(codegen/kernels/fp8_gemm.py)."""

from __future__ import annotations

import torch

QUANT_BLOCK = 128
X_DTYPES = (torch.float32, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.bfloat16)


def check_operands(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype,
                   op: str = "fp8_linear") -> None:
    """ValueError naming the operand that does not fit `x [..., K] @ weight [N, K]^T` with 128x128 scales
    (`op`: the op the message names)."""
    if x.dim() < 1 or x.dtype not in X_DTYPES:
        raise ValueError(f"{op}: x must be a float32 or bfloat16 [..., K] tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must be float8_e4m3fn [N, K={x.shape[-1]}], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    blocks = tuple(-(-size // QUANT_BLOCK) for size in weight.shape)
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8) or tuple(scale.shape) != blocks:
        raise ValueError(f"{op}: scale must be float8_e8m0fnu {blocks} (one per 128x128 block), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be float32 or bfloat16, got {out_dtype}")


def group_scale_rows(group: int, rows: int) -> tuple[int, int]:
    """The rows [first, stop) of an FP8 weight's scales that group `group` of `rows` weight rows reads."""
    return group * rows // QUANT_BLOCK, -(-(group + 1) * rows // QUANT_BLOCK)


def fits_scale_blocks(rows: int) -> bool:
    """Whether groups of `rows` weight rows each take whole 128-row scale blocks (rows a multiple of 128) or lie
    inside one (rows a divisor of 128, at least 16, the GEMM's smallest weight tile): then group g's rows, sliced
    with `group_scale_rows`, take their own scales, as in the whole weight."""
    return rows > 0 and (rows % QUANT_BLOCK == 0 or (QUANT_BLOCK % rows == 0 and rows >= 16))


def check_grouped_operands(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                           out_dtype: torch.dtype) -> int:
    """The rows a group, N, of `x [..., G, K]` times `weight [G*N, K]` group by group (group g: x[..., g, :] and
    weight rows [g*N, (g+1)*N)); ValueError naming the operand that does not fit. N must be a multiple of 128 or
    a divisor of 128 (`fits_scale_blocks`): no group straddles a scale block boundary."""
    op = "fp8_grouped_linear"
    check_operands(x, weight, scale, out_dtype, op)
    if x.dim() < 2 or x.shape[-2] < 1:
        raise ValueError(f"{op}: x must be a [..., G, K] tensor with G >= 1, got {tuple(x.shape)}")
    groups = x.shape[-2]
    if weight.shape[0] % groups or not fits_scale_blocks(weight.shape[0] // groups):
        raise ValueError(f"{op}: weight must be [G*N, K] with G={groups} (x's dim -2) and N a multiple of "
                         f"{QUANT_BLOCK} or a divisor of it >= 16 (no group across a scale block boundary), got "
                         f"{tuple(weight.shape)}")
    return weight.shape[0] // groups
