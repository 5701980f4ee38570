"""`dsv4c::fp8_grouped_linear`: G FP8 linears, group g of x times its own rows of one packed weight, in one op.

    fp8_grouped_linear(x [..., G, K] float32|bfloat16, weight float8_e4m3fn [G*N, K],
                       scale float8_e8m0fnu [ceil(G*N/128), ceil(K/128)], act_quant: bool, out_dtype) -> [..., G*N]

    out[..., g*N:(g+1)*N] = fp8_linear(x[..., g, :], weight[g*N:(g+1)*N],
                                       scale[g*N // 128 : ceil((g+1)*N / 128)], act_quant, out_dtype)

The grouped output projection `wo_a` of attention (model/attention.py): DeepSeek's grouped einsum. N must be a
multiple of 128 (each group's rows whole 128-row scale blocks: Flash, N = 1024) or a divisor of 128, at least
16 (each group inside one block: tiny, N = 64); either way no group straddles a scale block boundary, so each
row takes its own block's scale, as in the whole weight (fp8_operands.check_grouped_operands).
The reference below is codegen/fp8_linear.py's reference group by group, concatenated: the very operations of
the G fp8_linear calls and the cat it replaces (passes/fp8_grouped_linear.py), so on CPU the rewrite changes
no bit. On CUDA tensors one launch of codegen/kernels/fp8_gemm.py's GEMM covers every group (each weight
tile lies in one group and reads that group's x row), summing the same exact products in another fp32 order.
Importing this module registers the op (codegen/ops.py does).
"""

from __future__ import annotations

import torch

from dsv4c.codegen import fp8_linear
from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.codegen.fp8_operands import check_grouped_operands, group_scale_rows


def reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
              out_dtype: torch.dtype) -> torch.Tensor:
    """The op's definition in PyTorch: fp8_linear's reference per group, concatenated along the last dim."""
    rows = check_grouped_operands(x, weight, scale, out_dtype)
    return torch.cat([fp8_linear.reference(x[..., g, :], weight[g * rows:(g + 1) * rows],
                                           scale[slice(*group_scale_rows(g, rows))], act_quant, out_dtype)
                      for g in range(x.shape[-2])], dim=-1)


def cuda_impl(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
              out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernel on x flattened to [rows, G, K] (the reference where Triton is not installed, as
    fp8_linear's CUDA implementation)."""
    fp8_gemm = triton_kernels(fp8_linear.KERNEL_MODULE, "fp8_grouped_linear")
    if fp8_gemm is None:
        return reference(x, weight, scale, act_quant, out_dtype)
    check_grouped_operands(x, weight, scale, out_dtype)
    flat = x.reshape(-1, *x.shape[-2:])
    out = fp8_gemm.fp8_grouped_linear(flat, weight, scale, act_quant, out_dtype)
    return out.reshape(*x.shape[:-2], weight.shape[0])


fp8_grouped_linear = torch.library.custom_op("dsv4c::fp8_grouped_linear", reference, mutates_args=())


@fp8_grouped_linear.register_fake
def _(x, weight, scale, act_quant, out_dtype):
    check_grouped_operands(x, weight, scale, out_dtype)
    return x.new_empty((*x.shape[:-2], weight.shape[0]), dtype=out_dtype)


fp8_grouped_linear.register_kernel("cuda")(cuda_impl)
