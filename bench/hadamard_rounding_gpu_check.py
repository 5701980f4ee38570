"""GPU check of the indexer queries' rotation-and-rounding kernel (codegen/kernels/hadamard_rounding.py), run on the
GPU machine: `cd bench && python3 hadamard_rounding_gpu_check.py`.

`dsv4c::hadamard_fake_quant_fp4` on CUDA tensors (the registered Triton kernel) against model/quant.py's
`fake_quant_fp4(hadamard(x), 32)` on the same values on the CPU, bit for bit (NaN where the reference has NaN), in
bf16 and fp32, on Flash's indexer queries (64 heads of 128 dims) at batch 1, 4 tokens and batch 64, with rows of
every magnitude, a NaN and an inf; then the time of one call beside the captured graph's chain (the reference on
the GPU, CUDA graphs). Prints CHECK OK / CHECK FAILED lines and exits 1 if a check failed.
"""

from __future__ import annotations

import sys

import torch

from dsv4c.codegen import ops  # noqa: F401  (registers the ops and their CUDA kernels)
from dsv4c.model import quant
from gpu_common import baseline_us, graph_us  # bench/gpu_common.py (scripts run from bench/)

SHAPES = ((1, 1, 64, 128), (1, 4, 64, 128), (64, 1, 64, 128))
BLOCK = 32


def values(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random rows of magnitudes 2^-30 .. 2^60, one row zero, one with a NaN, one with an inf."""
    x = torch.randn(*shape) * 2.0 ** torch.randint(-30, 60, (*shape[:-1], 1)).float()
    flat = x.view(-1, shape[-1])
    flat[0] = 0.0
    flat[1, 3] = float("nan")
    flat[2, 5] = float("inf")
    return x.to(dtype)


def reference(x: torch.Tensor) -> torch.Tensor:
    return quant.fake_quant_fp4(quant.hadamard(x), BLOCK)


def main() -> int:
    failed = False
    op = torch.ops.dsv4c.hadamard_fake_quant_fp4
    for shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            x = values(shape, dtype)
            got, want = op(x.cuda(), BLOCK).cpu(), reference(x)
            same = torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
            failed |= not same
            print(f"CHECK {'OK' if same else 'FAILED'}: hadamard_fake_quant_fp4 {shape} {dtype} cuda kernel == "
                  f"reference")
        x = values(shape, torch.bfloat16).cuda()
        print(f"  {shape} bf16: kernel {graph_us(lambda t: op(t, BLOCK), [(x,)]):.1f} us, the graph's chain "
              f"{baseline_us('reference', reference, [(x,)]):.1f} us")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
