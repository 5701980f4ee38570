"""`dsv4c::bf16_linear`: a linear layer on a bf16 weight, read as bf16 (never a widened copy of it).

    bf16_linear(x [..., K] bfloat16|float32, weight bfloat16 [N, K], out_dtype float32|bfloat16) -> [..., N]

The value is `(x.float() @ weight.float().T).to(out_dtype)`: model/layers.py's `linear` and the LM head on a
weight released in bf16, which the captured graph computes by widening the whole weight to fp32 every step.
The reference below is exactly that math. On CUDA tensors the batch-invariant matmul of
codegen/kernels/batch_invariant_matmul.py runs instead (launch: batch_invariant_launch.py's
`bf16_weight_launch`): the weight is loaded as bf16 and the products summed in fp32; a bf16 x goes to the
tensor cores as it is, an fp32 x as three exact bf16 parts ("bf16x3"). A product of a bf16 (or split) value and
a bf16 value is exact in fp32, so the kernel sums the reference's products in another order, fixed by (N, K)
and the target alone: a row's result does not depend on the other rows of the call (runtime/batch_invariant.py).
Importing this module registers the op (codegen/ops.py does).
"""

from __future__ import annotations

import torch

from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.codegen.kernels.batch_invariant_launch import bf16_weight_launch
from dsv4c.codegen.targets import target_for_device

KERNEL_MODULE = "dsv4c.codegen.kernels.batch_invariant_matmul"
X_DTYPES = (torch.bfloat16, torch.float32)
OUT_DTYPES = (torch.float32, torch.bfloat16)


def check_operands(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> None:
    """ValueError naming the operand that does not fit the op."""
    if x.dtype not in X_DTYPES:
        raise ValueError(f"bf16_linear: x must be one of {X_DTYPES}, got {x.dtype}")
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise ValueError(f"bf16_linear: weight must be bfloat16 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"bf16_linear: x [..., K] must match weight [N, K] = {tuple(weight.shape)}, "
                         f"got x {tuple(x.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"bf16_linear: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def reference(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The op's definition in PyTorch (fp32 inside)."""
    check_operands(x, weight, out_dtype)
    return (x.float() @ weight.float().T).to(out_dtype)


def cuda_impl(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton matmul on x flattened to rows, the weight as its transposed view (Triton is imported when the
    first CUDA call arrives; where it is not installed, the reference runs; where it is, a kernel module that
    fails to import is an error)."""
    matmul = triton_kernels(KERNEL_MODULE, "bf16_linear")
    if matmul is None:
        return reference(x, weight, out_dtype)
    check_operands(x, weight, out_dtype)
    rows = x.reshape(1, -1, x.shape[-1])
    (n, k), m = weight.shape, rows.shape[1]
    launch = bf16_weight_launch(target_for_device(x.device), m, n, k, x.dtype)
    out = matmul.invariant_bmm(rows, weight.t().unsqueeze(0), out_dtype, launch=launch)
    return out.reshape(*x.shape[:-1], n)


bf16_linear = torch.library.custom_op("dsv4c::bf16_linear", reference, mutates_args=())


@bf16_linear.register_fake
def _(x, weight, out_dtype):
    check_operands(x, weight, out_dtype)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


bf16_linear.register_kernel("cuda")(cuda_impl)
