"""CUDA kernel of `dsv4c::kv_pack` (codegen/kv_cache.py, its reference `pack_reference`).

Importing this module (codegen/ops.py does, after kv_cache) registers the op's "cuda" kernel: the Triton kernel of
codegen/kernels/kv_pack.py, bit-equal to the reference but for the sign bit of e4m3 NaN codes (its docstring says
why), imported when the first CUDA call arrives (the reference where Triton is not installed, as the loader says; a
kernel module that fails to import is an error, codegen/cuda_impls.py `triton_kernels`)."""

from __future__ import annotations

import torch

from dsv4c.codegen import kv_cache
from dsv4c.codegen.cuda_impls import triton_kernels

KERNEL_MODULE = "dsv4c.codegen.kernels.kv_pack"


@kv_cache.kv_pack.register_kernel("cuda")
def _kv_pack_cuda(x: torch.Tensor, format: str, rounded: int, block: int) -> torch.Tensor:
    kernels = triton_kernels(KERNEL_MODULE, "kv_pack")
    if kernels is None:
        return kv_cache.pack_reference(x, format, rounded, block)
    return kernels.kv_pack(x, format, rounded, block)
