"""`dsv4c::hadamard_fake_quant_fp4`: the Lightning Indexer's query rounding as one op.

    hadamard_fake_quant_fp4(x [..., N] bfloat16|float32, block) -> [..., N] x.dtype
      = quant.fake_quant_fp4(quant.hadamard(x), block)

(model/attention.py `indexer_rounding`: the normalised Walsh-Hadamard rotation, then e2m1 with a power-of-two scale
per `block` values). N a power of two, block a power of two dividing it. The reference below is the model's two
functions; on CUDA tensors the Triton kernel of codegen/kernels/hadamard_rounding.py runs instead, bit-equal to it.
passes/hadamard_rounding.py puts the op in place of the captured rotation and rounding. Importing this module
registers the op (codegen/ops.py does).
"""

from __future__ import annotations

import torch

from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.model import quant

KERNEL_MODULE = "dsv4c.codegen.kernels.hadamard_rounding"
MAX_WIDTH = 4096  # the widest row the kernel rotates in one program's registers


def check_operands(x: torch.Tensor, block: int) -> None:
    """x [..., N] bf16 or fp32 with N a power of two in 2..MAX_WIDTH, block a power of two dividing N; else a
    ValueError that says which."""
    n = x.shape[-1] if x.dim() else 0
    if x.dtype not in (torch.bfloat16, torch.float32) or n < 2 or n & (n - 1) or n > MAX_WIDTH:
        raise ValueError(f"hadamard_fake_quant_fp4: x {tuple(x.shape)} {x.dtype} needs a bf16 or fp32 last dim "
                         f"that is a power of two in 2..{MAX_WIDTH}")
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"hadamard_fake_quant_fp4: block {block} must be a power of two dividing {n}")


def reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """The op's definition: the model's functions."""
    check_operands(x, block)
    return quant.fake_quant_fp4(quant.hadamard(x), block)


def cuda_impl(x: torch.Tensor, block: int) -> torch.Tensor:
    """The Triton kernel (imported when the first CUDA call arrives; the reference where Triton is not installed)."""
    kernels = triton_kernels(KERNEL_MODULE, "hadamard_fake_quant_fp4")
    return reference(x, block) if kernels is None else kernels.hadamard_fake_quant_fp4(x, block)


hadamard_fake_quant_fp4 = torch.library.custom_op("dsv4c::hadamard_fake_quant_fp4", reference, mutates_args=())


@hadamard_fake_quant_fp4.register_fake
def _(x, block):
    check_operands(x, block)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


hadamard_fake_quant_fp4.register_kernel("cuda")(cuda_impl)
