"""CUDA kernels of the model's activation roundings, `dsv4c::fake_quant_fp8` and `fake_quant_fp4`.

The ops are defined with the model (model/rounding_ops.py: their reference is model/quant.py, so a graph holding
them runs anywhere); importing this module (codegen/ops.py does) registers their "cuda" kernel: the Triton
kernel of codegen/kernels/act_rounding.py, bit-equal to the reference, imported when the first CUDA call
arrives (the reference where Triton is not installed, as the loader says; a kernel module that fails to import is
an error, codegen/cuda_impls.py `triton_kernels`)."""

from __future__ import annotations

import torch

from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.model import rounding_ops

KERNEL_MODULE = "dsv4c.codegen.kernels.act_rounding"


def _cuda_impl(fmt: str, reference):
    def impl(x: torch.Tensor, block: int) -> torch.Tensor:
        kernels = triton_kernels(KERNEL_MODULE, f"fake_quant_{fmt}")
        return reference(x, block) if kernels is None else kernels.fake_quant(x, block, fmt)

    return impl


rounding_ops.fake_quant_fp8.register_kernel("cuda")(_cuda_impl("fp8", rounding_ops.fake_quant_fp8_reference))
rounding_ops.fake_quant_fp4.register_kernel("cuda")(_cuda_impl("fp4", rounding_ops.fake_quant_fp4_reference))
