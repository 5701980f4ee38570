"""The activation roundings' Triton kernel (codegen/kernels/act_rounding.py, the CUDA kernel of
`dsv4c::fake_quant_fp8` / `fake_quant_fp4`) under Triton's interpreter, in a spawned child that sets
TRITON_INTERPRET=1 before importing Triton, against the ops' reference (model/quant.py): bit-equal, NaN where the
reference has NaN, on blocks of every magnitude (zero, below the amax floor, at rounding ties, near the fp32
range), with NaN and inf, in fp32 and bf16, for the block sizes the model uses and one that is not a power of
two."""

from __future__ import annotations


import pytest
import torch

from child_pool import run_in
from dsv4c.codegen import ops  # noqa: F401  (registers the ops and their CUDA kernels)
from dsv4c.model import quant

REFERENCE = {"fp8": quant.fake_quant_fp8, "fp4": quant.fake_quant_fp4}


def _kernel(x, block, fmt):
    from dsv4c.codegen.kernels.act_rounding import fake_quant

    return fake_quant(x, block, fmt)


@pytest.fixture(scope="module")
def kernel(interpreter_pool):
    return run_in(interpreter_pool, _kernel)


def hard_input(rows: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """rows x 3 blocks: random magnitudes from 2^-30 to 2^100 a block; row 0 zeros, row 1 below the FP8 amax floor,
    row 2 values halfway between e4m3 / e2m1 neighbours of a block with amax 448 / 6, row 3 a NaN, row 4 an inf."""
    scales = 2.0 ** torch.randint(-30, 100, (rows, 3, 1)).float()
    x = (torch.randn(rows, 3, block) * scales).flatten(1)
    x[0] = 0.0
    x[1] = torch.randn(3 * block) * 1e-6
    x[2, :block] = 448.0
    x[2, 1:block:2] = torch.tensor([1.0625, 3.25, 0.75, 5.0, 13.0, 0.25, 2.5, 104.0]).repeat(block)[: block // 2]
    x[3, 5] = float("nan")
    x[4, block + 1] = float("inf")
    return x.to(dtype).view(rows, 1, 3 * block)


@pytest.mark.parametrize("fmt, block", [("fp8", 128), ("fp8", 64), ("fp4", 32), ("fp8", 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_equals_the_reference_bit_for_bit(kernel, fmt, block, dtype):
    x = hard_input(37, block, dtype)  # 111 blocks: the last program's rows run past the end
    want = REFERENCE[fmt](x, block)
    got = kernel(x, block, fmt)
    assert got.dtype == dtype and got.shape == x.shape
    assert want[3].isnan().any() and want[4].isnan().any() and not want[5:].isnan().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_bad_shapes_and_formats_are_refused_naming_them(kernel):
    with pytest.raises(ValueError, match="multiple of block 64"):
        kernel(torch.zeros(2, 96), 64, "fp8")
    with pytest.raises(ValueError, match="format 'fp6'"):
        kernel(torch.zeros(2, 64), 64, "fp6")


def test_the_ops_have_their_cuda_kernel_registered():
    for name in ("fake_quant_fp8", "fake_quant_fp4"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsv4c::{name}", "CUDA")
