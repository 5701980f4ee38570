"""The CUDA half of runtime/batch_invariant.py: aten's products and reductions on CUDA tensors computed by
Triton kernels whose order of summation does not depend on how many rows a call has
(codegen/kernels/batch_invariant_matmul.py, batch_invariant_reduce.py).

Each function takes the arguments of its aten overload (`cuda_kernels` names them) and returns what it returns:
`mm`, `bmm`, `addmm` on operands of one dtype among KERNEL_DTYPES; `sum.dim_IntList` and `mean.dim` over a
non-empty list of dims; `_softmax` and `_log_softmax`. Anything else (integer sums, sums over every dim, fp64)
runs PyTorch's own CUDA kernel through the op's `out` overload, which the override leaves alone. The kernel
modules import Triton, so they are imported when the first CUDA call arrives; the functions run on CPU tensors
too (under TRITON_INTERPRET=1), which is how the tests call them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from dsv4c.codegen.cuda_impls import triton_installed, triton_kernels

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the batch_invariant_* kernels' DTYPES


def _kernels(family: str):
    """codegen/kernels/batch_invariant_{family}.py, imported when the first CUDA call arrives (it imports Triton;
    one that fails to import is an error naming it)."""
    return triton_kernels(f"dsv4c.codegen.kernels.batch_invariant_{family}", "the batch-invariant aten ops")


def _pytorch(out_op, *args, result_dtype: torch.dtype | None = None, **kwargs) -> torch.Tensor:
    """PyTorch's own kernel through the `out` overload (resized from empty; `result_dtype` default the first
    argument's), for what the kernels do not take."""
    return out_op(*args, **kwargs, out=args[0].new_empty(0, dtype=result_dtype or args[0].dtype))


def _products(*operands: torch.Tensor) -> bool:
    return len({t.dtype for t in operands}) == 1 and operands[0].dtype in KERNEL_DTYPES


def cuda_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not _products(a, b):
        return _pytorch(torch.ops.aten.mm.out, a, b)
    return _kernels("matmul").invariant_bmm(a.unsqueeze(0), b.unsqueeze(0))[0]


def cuda_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not _products(a, b):
        return _pytorch(torch.ops.aten.bmm.out, a, b)
    return _kernels("matmul").invariant_bmm(a, b)


def cuda_addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    """beta * bias + alpha * (a @ b), the product kept in fp32 until the one rounding to a's dtype."""
    if not _products(bias, a, b):
        return _pytorch(torch.ops.aten.addmm.out, bias, a, b, beta=beta, alpha=alpha)
    product = _kernels("matmul").invariant_bmm(a.unsqueeze(0), b.unsqueeze(0), torch.float32)[0] * alpha
    if beta == 0:  # PyTorch ignores the bias then, NaN included
        return product.to(a.dtype)
    return torch.add(product, bias.float(), alpha=beta).to(a.dtype)


def _reduced_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype | None:
    """The output dtype of a sum / mean the kernels compute, or None where PyTorch's kernel must."""
    out = dtype or x.dtype
    return out if x.dtype in KERNEL_DTYPES and out in KERNEL_DTYPES else None


def cuda_sum(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    out_dtype = _reduced_dtype(x, dtype)
    if not dim or out_dtype is None:
        result = torch.ops.aten.sum.dim_IntList(x.to("meta"), dim, keepdim, dtype=dtype).dtype
        return _pytorch(torch.ops.aten.sum.IntList_out, x, dim, keepdim, dtype=dtype, result_dtype=result)
    return _kernels("reduce").invariant_sum(x, tuple(dim), keepdim, out_dtype)


def cuda_mean(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    out_dtype = _reduced_dtype(x, dtype)
    if not dim or out_dtype is None:
        return _pytorch(torch.ops.aten.mean.out, x, dim, keepdim, dtype=dtype, result_dtype=dtype or x.dtype)
    return _kernels("reduce").invariant_sum(x, tuple(dim), keepdim, out_dtype, mean=True)


def _cuda_softmax(log: bool) -> Callable[..., torch.Tensor]:
    out_op = torch.ops.aten._log_softmax.out if log else torch.ops.aten._softmax.out

    def run(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
        out_dtype = torch.float32 if half_to_float else x.dtype
        if x.dtype not in KERNEL_DTYPES:
            return _pytorch(out_op, x, dim, half_to_float, result_dtype=out_dtype)
        return _kernels("reduce").invariant_softmax(x, dim, log, out_dtype)
    return run


def cuda_kernels() -> dict[str, Callable[..., Any]]:
    """aten overload -> its batch-invariant CUDA implementation (none where Triton is not installed)."""
    if not triton_installed():
        return {}
    return {"mm": cuda_mm, "bmm": cuda_bmm, "addmm": cuda_addmm, "sum.dim_IntList": cuda_sum, "mean.dim": cuda_mean,
            "_softmax": _cuda_softmax(log=False), "_log_softmax": _cuda_softmax(log=True)}
