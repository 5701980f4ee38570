"""GPU check of the activation roundings' Triton kernel (codegen/kernels/act_rounding.py), run on the GPU machine:
`python3 bench/act_rounding_gpu_check.py`.

`dsv4c::fake_quant_fp8` / `fake_quant_fp4` on CUDA tensors (the registered Triton kernel) against model/quant.py's
reference on the same values on the CPU, bit for bit (NaN where the reference has NaN), in fp32 and bf16, at the
block sizes the model uses, on the decode-step shapes and on blocks of every magnitude with NaN and inf; then
the time of one call beside the reference's on the GPU (CUDA graphs). Prints CHECK OK / CHECK FAILED lines and
exits 1 if a check failed.
"""

from __future__ import annotations

import sys

import torch

from dsv4c.codegen import ops  # noqa: F401  (registers the ops and their CUDA kernels)
from dsv4c.model import quant
from gpu_common import baseline_us, graph_us  # bench/gpu_common.py (scripts run from bench/)

CASES = (("fp8", 64, (64, 1, 512)), ("fp8", 128, (64, 1, 4096)), ("fp4", 32, (64, 64, 128)), ("fp8", 64, (1, 1, 512)))
OPS = {"fp8": (torch.ops.dsv4c.fake_quant_fp8, quant.fake_quant_fp8),
       "fp4": (torch.ops.dsv4c.fake_quant_fp4, quant.fake_quant_fp4)}


def values(shape: tuple[int, ...], block: int, dtype: torch.dtype) -> torch.Tensor:
    """Random blocks of magnitudes 2^-30 .. 2^60, one block zero, one with a NaN, one with an inf."""
    x = torch.randn(*shape).unflatten(-1, (-1, block))
    x = x * 2.0 ** torch.randint(-30, 60, (*x.shape[:-1], 1)).float()
    flat = x.view(-1, block)
    flat[0] = 0.0
    flat[1, 3] = float("nan")
    flat[2, 5] = float("inf")
    return x.flatten(-2).to(dtype)


def main() -> int:
    failed = False
    for fmt, block, shape in CASES:
        op, reference = OPS[fmt]
        for dtype in (torch.float32, torch.bfloat16):
            x = values(shape, block, dtype)
            got, want = op(x.cuda(), block).cpu(), reference(x, block)
            same = torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
            failed |= not same
            print(f"CHECK {'OK' if same else 'FAILED'}: fake_quant_{fmt} block {block} {tuple(shape)} {dtype} "
                  f"cuda kernel == reference")
        x = values(shape, block, torch.bfloat16).cuda()
        print(f"  {fmt} {tuple(shape)} bf16: kernel {graph_us(lambda t: op(t, block), [(x,)]):.1f} us, reference "
              f"{baseline_us('reference', lambda t: reference(t, block), [(x,)]):.1f} us")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
