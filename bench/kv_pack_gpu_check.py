"""GPU check of kv_pack's Triton kernel (codegen/kernels/kv_pack.py), run on the GPU machine:
`python3 bench/kv_pack_gpu_check.py`.

`dsv4c::kv_pack` on CUDA tensors (the registered Triton kernel) against its reference (codegen/kv_cache.py
`pack_reference`) run on the same CUDA tensors, byte for byte, in fp32 and bf16, for Flash's two packed caches
(main KV: e4m3 448 of 512 dims, blocks of 64; indexer keys: e2m1 128 dims, blocks of 32), on the decode step's rows
and on blocks of every magnitude with NaN and inf (on the GPU the reference's NaN codes are 0x7F, as the
kernel's); then the time of one call beside the reference's on the GPU (CUDA graphs). Prints CHECK OK / CHECK
FAILED lines and exits 1 if a check failed.
"""

from __future__ import annotations

import sys

import torch

from dsv4c.codegen import ops  # noqa: F401  (registers the ops and their CUDA kernels)
from dsv4c.codegen.kv_cache import pack_reference
from gpu_common import baseline_us, graph_us  # bench/gpu_common.py (scripts run from bench/)

LAYOUTS = {"main kv": ("e4m3", 512, 448, 64), "indexer key": ("e2m1", 128, 128, 32)}
ROWS = ((1, 1), (64, 1), (4, 1024))  # leading dims: one decode token, 64 sequences' tokens, a prefill's rows


def values(lead: tuple[int, ...], width: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Random blocks of magnitudes 2^-30 .. 2^60, one block zero, one with a NaN, one with an inf, one -inf."""
    x = torch.randn(*lead, width).unflatten(-1, (-1, block))
    x = x * 2.0 ** torch.randint(-30, 60, (*x.shape[:-1], 1)).float()
    flat = x.view(-1, block)
    flat[0] = 0.0
    if flat.shape[0] > 3:
        flat[1, 3], flat[2, 5], flat[3, 7] = float("nan"), float("inf"), -float("inf")
    return x.flatten(-2).to(dtype)


def differences(got: torch.Tensor, want: torch.Tensor) -> str:
    """How many bytes differ, and the first few (kernel byte, reference byte) pairs."""
    where = got != want
    pairs = sorted(set(zip(got[where].tolist(), want[where].tolist())))[:8]
    return f" ({int(where.sum())} bytes differ; (kernel, reference): {pairs})"


def main() -> int:
    failed = False
    for name, (fmt, width, rounded, block) in LAYOUTS.items():
        for lead in ROWS:
            for dtype in (torch.float32, torch.bfloat16):
                x = values(lead, width, block, dtype).cuda()
                got = torch.ops.dsv4c.kv_pack(x, fmt, rounded, block)
                want = pack_reference(x, fmt, rounded, block)
                same = torch.equal(got, want)
                failed |= not same
                print(f"CHECK {'OK' if same else 'FAILED'}: kv_pack {name} {fmt} {rounded}/{width} block {block} "
                      f"{lead} {dtype} cuda kernel == reference{'' if same else differences(got, want)}")
            x = values(lead, width, block, torch.bfloat16).cuda()
            kernel = graph_us(lambda t: torch.ops.dsv4c.kv_pack(t, fmt, rounded, block), [(x,)])
            reference = baseline_us("reference", lambda t: pack_reference(t, fmt, rounded, block), [(x,)])
            print(f"  {name} {lead} bf16: kernel {kernel:.1f} us, reference {reference:.1f} us")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
