"""`dsv4c::fp8_linear`: a linear layer on an FP8 weight in its packed (released) form.

    fp8_linear(x [..., K] float32|bfloat16, weight float8_e4m3fn [N, K],
               scale float8_e8m0fnu [ceil(N/128), ceil(K/128)], act_quant: bool, out_dtype) -> [..., N]

The value is model/layers.py's `linear(x, dequant_fp8_weight(weight, scale), num, quantized=True)`: with
`act_quant`, x is first rounded per row to e4m3 in blocks of 128 along K exactly as
`quant.fake_quant_fp8(x, 128)` (a partial last block takes its amax over the elements present); then
`x.float() @ W.float().T` in fp32, cast to out_dtype (float32 or bfloat16). The reference below computes
exactly that from model/quant.py; on CUDA tensors the Triton kernel of codegen/kernels/fp8_gemm.py runs
instead (the weight is read as e4m3 codes and block scales, never dequantised in memory), computing the
same exact products summed in another order. Importing this module registers the op (codegen/ops.py does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4c.codegen.fp8_operands import QUANT_BLOCK, check_operands
from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.model import quant

KERNEL_MODULE = "dsv4c.codegen.kernels.fp8_gemm"


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """`quant.fake_quant_fp8(x, 128)` in fp32 for any K: zeros pad the last block, which leaves its amax (over
    the elements present, floored at 1e-4) and every rounded value as they are."""
    k = x.shape[-1]
    padded = F.pad(x.to(torch.float32), (0, -k % QUANT_BLOCK))
    return quant.fake_quant_fp8(padded, QUANT_BLOCK)[..., :k]


def reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
              out_dtype: torch.dtype) -> torch.Tensor:
    """The op's definition in PyTorch (fp32 inside)."""
    check_operands(x, weight, scale, out_dtype)
    values = fake_quant_rows(x) if act_quant else x.to(torch.float32)
    return (values @ quant.dequant_fp8_weight(weight, scale).T).to(out_dtype)


def cuda_impl(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
              out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernel on x flattened to rows (Triton is imported when the first CUDA call arrives; where it
    is not installed, the reference runs; where it is, a kernel module that fails to import is an error)."""
    fp8_gemm = triton_kernels(KERNEL_MODULE, "fp8_linear")
    if fp8_gemm is None:
        return reference(x, weight, scale, act_quant, out_dtype)
    check_operands(x, weight, scale, out_dtype)
    flat = x.reshape(-1, x.shape[-1])
    return fp8_gemm.fp8_linear(flat, weight, scale, act_quant, out_dtype).reshape(*x.shape[:-1], weight.shape[0])


fp8_linear = torch.library.custom_op("dsv4c::fp8_linear", reference, mutates_args=())


@fp8_linear.register_fake
def _(x, weight, scale, act_quant, out_dtype):
    check_operands(x, weight, scale, out_dtype)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


fp8_linear.register_kernel("cuda")(cuda_impl)
