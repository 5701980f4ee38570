"""GPU check of the FP8 GEMM's activation rounding where only a GPU runs it (codegen/kernels/fp8_gemm.py).

    python bench/fp8_gemm_gpu_check.py          # PASS / FAIL lines; exit status 1 on any FAIL

On GPUs the kernels convert fp32 -> e4m3 with the hardware's cvt.rn.satfinite (the CPU interpreter's tests run
the hand rounding instead), in two places: each GEMM program (up to 32 rows) and the rounding kernel
(`prequantise`, past 32 rows). Checked here, on the GPU:
  rounding   through an identity weight (e4m3 1.0, scale 1), the fp32 output is the rounded activations: it must
             equal `fake_quant_rows` bit for bit, both placements, on the edge rows of tests/test_fp8_linear.py
             (ties, amax at and one step past 448 x 2^e, the 1e-4 floor, subnormals, a partial block) and on
             random rows of wide dynamic range
  placement  at Flash shapes and 64-128 rows, the default launch (x rounded by its own kernel) and the same
             launch rounding in the GEMM give the same fp32 output bit for bit (batch invariance: the placement
             follows M), within fp8_gemm_bench.TOLERANCE (normwise) of the fp32 reference (the FP8 tensor cores'
             in-block summation)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from dsv4c.codegen import fp8_linear as op
from dsv4c.codegen.kernels import fp8_gemm
from dsv4c.codegen.kernels.fp8_gemm_launch import fp8_gemm_launch
from dsv4c.codegen.targets import target_for_device
from dsv4c.model import quant

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_fp8_linear import _rounding_rows  # noqa: E402 -- the edge rows the interpreter's test uses

from fp8_gemm_bench import TOLERANCE  # noqa: E402 -- the FP8 tensor cores' in-block summation (bench/)

SHAPES = {"wq_a": (1024, 4096), "wkv": (512, 4096), "wo_b": (4096, 8192), "indexer_wq_b": (8192, 1024)}
FAILED: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def identity_output(x: torch.Tensor, prequantise: bool) -> torch.Tensor:
    """x [M, K] through an identity weight, fp32 output (NaN-poisoned first), rounding placed as asked."""
    m, k = x.shape
    weight = torch.eye(k, device="cuda").to(torch.float8_e4m3fn)
    blocks = -(-k // 128)
    scale = torch.full((blocks, blocks), 127, dtype=torch.uint8, device="cuda").view(torch.float8_e8m0fnu)
    launch = dataclasses.replace(fp8_gemm_launch(target_for_device(x.device), m, k, k), prequantise=prequantise,
                                 pdl=True)
    out = torch.full((m, k), float("nan"), device="cuda")
    return fp8_gemm.fp8_linear(x, weight, scale, True, torch.float32, launch=launch, out=out)


def check_rounding(gen: torch.Generator) -> None:
    wide = torch.randn(64, 1024, generator=gen, device="cuda") * torch.exp2(
        torch.randint(-30, 30, (64, 1), generator=gen, device="cuda").float())
    wide[:, ::7] *= torch.exp2(torch.randint(-20, 8, (64, 1), generator=gen, device="cuda").float())
    for name, x in (("edge rows", _rounding_rows(200).cuda()), ("wide random rows", wide)):
        for prequantise in (False, True):
            got, expected = identity_output(x, prequantise), op.fake_quant_rows(x)
            differ = int((got != expected).sum())  # a NaN (an element left unwritten) differs; -0 == 0
            report(f"rounding {name} ({'own kernel' if prequantise else 'in the GEMM'})", differ == 0,
                   f"{differ} of {got.numel()} values differ from fake_quant_rows")


def check_placement(gen: torch.Generator) -> None:
    t = target_for_device("cuda")
    for shape, (n, k) in SHAPES.items():
        weight, scale = quant.quantize_fp8_weight(torch.randn(n, k, generator=gen, device="cuda") * 0.05)
        for m in (48, 64, 128):
            x = torch.randn(m, k, generator=gen, device="cuda")
            x[:, torch.randint(0, k, (3,), generator=gen, device="cuda")] *= 30
            x = x.bfloat16()
            launch = fp8_gemm_launch(t, m, n, k)
            got = {pre: fp8_gemm.fp8_linear(x, weight, scale, True, torch.float32,
                                            launch=dataclasses.replace(launch, prequantise=pre))
                   for pre in (True, False)}
            expected = op.reference(x, weight, scale, True, torch.float32).double()
            error = ((got[True].double() - expected).norm() / expected.norm()).item()
            same = torch.equal(got[True], got[False])
            report(f"placement {shape} M={m}", launch.prequantise and same and error <= TOLERANCE,
                   f"prequantise {launch.prequantise}, equal bits {same}, rel error {error:.1e}")


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    gen = torch.Generator(device="cuda").manual_seed(13)
    check_rounding(gen)
    check_placement(gen)
    print(f"{'FAIL' if FAILED else 'PASS'}: {len(FAILED)} failed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
