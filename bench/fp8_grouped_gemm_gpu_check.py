"""GPU check of `dsv4c::fp8_grouped_linear` (codegen/fp8_grouped_linear.py: one launch of the FP8 GEMM over every
group), run on the GPU machine: `python3 bench/fp8_grouped_gemm_gpu_check.py`.

For Flash's and flash-mini's grouped output projection `wo_a` (G groups of N = 1024 rows, K = 4096 / 2048) and
tiny's (G = 2, N = 64, K = 192), at 1, 4 and 64 rows, bf16 x, without activation rounding (the model's) and with:
the CUDA kernel against the op's reference on the same CUDA tensors (fp8_linear's reference per group; the
kernel sums the same exact products in another order: normwise relative error <= 1e-2 for bf16 output, as the
bf16 rounding of the output allows) and against the G separate `fp8_linear` calls and the cat it replaces;
then the time of one call beside those G calls and the cat (CUDA graphs). Prints CHECK OK / CHECK FAILED lines
and exits 1 if a check failed.
"""

from __future__ import annotations

import sys

import torch

from dsv4c.codegen import fp8_grouped_linear as op
from dsv4c.codegen.fp8_operands import group_scale_rows
from dsv4c.codegen.kernels.fp8_gemm_launch import fp8_gemm_launch
from dsv4c.codegen.targets import target_for_device
from dsv4c.model import quant
from gpu_common import graph_us  # bench/gpu_common.py (scripts run from bench/)

SHAPES = {"flash wo_a": (8, 1024, 4096), "flash-mini wo_a": (4, 1024, 2048), "tiny wo_a": (2, 64, 192)}
ROWS = (1, 4, 64)
TOLERANCE = 1e-2


def per_group(x, weight, scale, act_quant):
    """The G fp8_linear calls and the cat that the fp8_grouped_linear pass replaces."""
    rows = weight.shape[0] // x.shape[-2]
    return torch.cat([torch.ops.dsv4c.fp8_linear(x[..., g, :], weight[g * rows:(g + 1) * rows],
                                                 scale[slice(*group_scale_rows(g, rows))], act_quant, torch.bfloat16)
                      for g in range(x.shape[-2])], dim=-1)


def relative(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def main() -> int:
    failed = False
    gen = torch.Generator().manual_seed(0)
    for name, (groups, rows, k) in SHAPES.items():
        weight, scale = quant.quantize_fp8_weight(torch.randn(groups * rows, k, generator=gen) * 0.05)
        weight, scale = weight.cuda(), scale.cuda()
        for m in ROWS:
            x = torch.randn(m, groups, k, generator=gen).to(torch.bfloat16).cuda()
            for act_quant in (False, True):
                got = torch.ops.dsv4c.fp8_grouped_linear(x, weight, scale, act_quant, torch.bfloat16)
                want = op.reference(x, weight, scale, act_quant, torch.bfloat16)
                split = per_group(x, weight, scale, act_quant)
                errors = relative(got, want), relative(split, want)
                ok = not got.isnan().any() and errors[0] <= TOLERANCE
                failed |= not ok
                print(f"CHECK {'OK' if ok else 'FAILED'}: {name} M={m} act_quant={act_quant}: kernel vs reference "
                      f"{errors[0]:.2e} (the G fp8_linear calls: {errors[1]:.2e})", flush=True)
            launch = fp8_gemm_launch(target_for_device(x.device), m, groups * rows, k, False, x.dtype, group_rows=rows)
            grouped = graph_us(lambda t: torch.ops.dsv4c.fp8_grouped_linear(t, weight, scale, False, torch.bfloat16),
                               [(x,)])
            separate = graph_us(lambda t: per_group(t, weight, scale, False), [(x,)])
            print(f"  {name} M={m}: grouped {grouped:.1f} us (grid {-(-groups * rows // launch.block_n)} x "
                  f"{-(-m // launch.block_m)} x {1 if launch.fold_splits else launch.split_k}, {launch}), "
                  f"{groups} fp8_linear + cat {separate:.1f} us", flush=True)
    print(torch.cuda.get_device_name(), torch.__version__)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
