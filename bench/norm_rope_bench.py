"""RMSNorm and RoPE on a GPU: the fused row kernel against the aten chains it replaces and torch.compile of them.

At DeepSeek-V4-Flash sizes, for each token count T (batch 1), four calls a decode step makes per layer:
  hidden_norm   rms_norm of a [1, T, 4096] hidden state with a weight (MTP's enorm / hnorm; q_norm is 1024 wide)
  query         rms_norm_rope of a [1, T, 64, 512] query, no weight, rope on the last 64 dims (YaRN frequencies)
  kv            rms_norm_rope of a [1, T, 512] KV row with a weight
  output        rope of the [1, T, 64, 512] attention output, inverse
Checks first, per case, printing a PASS/FAIL line: the kernel (output poisoned with NaN) against an fp64 reference
of the op's math (angles the fp32 product position * inv_freq, positions up to 2^20) with relative norm error
<= 1e-2 (bf16) and against the aten chain on the GPU (the model's own functions) with the same bound, and the
registered dsv4c op (what a plan calls) bit-equal to the kernel; the share of elements bit-equal to the aten chain
is printed. Then times, as the median of CUDA-graph replays over rotating input sets
(bench/gpu_common.py): the kernel (codegen/kernels/norm_rope.py), the eager aten chain (model/layers.py rms_norm /
apply_rope: every aten op its own kernel, even in a graph), and torch.compile of that chain; with the kernels each
variant launches (torch.profiler) and the kernel's byte floor (x read + output written over the copy bandwidth).
Usage: python bench/norm_rope_bench.py [--tokens 1 2 4 8 16 32 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops and their CUDA kernels)
from dsv4c.codegen.kernels import norm_rope
from dsv4c.model import layers
from dsv4c.model.config import YarnScaling
from gpu_common import copy_gbps, environment, graph_us

HIDDEN, HEADS, HEAD_DIM, ROPE_DIM, EPS = 4096, 64, 512, 64, 1e-6
MAX_POSITION = 2 ** 20
TOL = 1e-2  # bf16 outputs: the op's own roundings to bf16
YARN = YarnScaling(factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1)
INV_FREQ = layers.rope_inv_freq(ROPE_DIM, 160000.0, YARN).cuda()
CASES = ("hidden_norm", "query", "kv", "output")


def inputs(case: str, steps: int) -> dict:
    """One input set of a case: x (bf16), weight or None, positions or None."""
    shape = {"hidden_norm": (1, steps, HIDDEN), "kv": (1, steps, HEAD_DIM)}.get(case, (1, steps, HEADS, HEAD_DIM))
    positions = torch.randint(0, MAX_POSITION, (1, steps), device="cuda")
    return dict(x=(torch.randn(shape, device="cuda") * 3).bfloat16(),
                weight=(torch.rand(shape[-1], device="cuda") + 0.5).bfloat16() if case in ("hidden_norm", "kv")
                else None,
                positions=positions.unsqueeze(-1) if case in ("query", "output") else positions)


def kernel(case: str, s: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    if case == "hidden_norm":
        return norm_rope.rms_norm(s["x"], s["weight"], EPS, out=out)
    if case == "output":
        return norm_rope.rope(s["x"], s["positions"], INV_FREQ, True, out=out)
    return norm_rope.rms_norm_rope(s["x"], s["weight"], EPS, s["positions"], INV_FREQ, False, out=out)


def registered_op(case: str, s: dict) -> torch.Tensor:
    """The dsv4c op as a compiled plan calls it (its CUDA implementation: the same kernel)."""
    if case == "hidden_norm":
        return torch.ops.dsv4c.rms_norm(s["x"], s["weight"], EPS)
    if case == "output":
        return torch.ops.dsv4c.rope(s["x"], s["positions"], INV_FREQ, True)
    return torch.ops.dsv4c.rms_norm_rope(s["x"], s["weight"], EPS, s["positions"], INV_FREQ, False)


def aten_chain(case: str, s: dict) -> torch.Tensor:
    """What the graph computes without the fusion: the model's own functions, op by op."""
    if case == "hidden_norm":
        return layers.rms_norm(s["x"], s["weight"], EPS)
    if case == "output":
        return layers.apply_rope(s["x"], s["positions"], INV_FREQ, inverse=True)
    return layers.apply_rope(layers.rms_norm(s["x"], s["weight"], EPS), s["positions"], INV_FREQ)


def fp64_reference(case: str, s: dict) -> torch.Tensor:
    x = s["x"].double().cpu()
    if case != "output":
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)
        x = x if s["weight"] is None else x * s["weight"].double().cpu()
    if case == "hidden_norm":
        return x
    angles = (s["positions"].float().unsqueeze(-1) * INV_FREQ).double().cpu()
    cos, sin = angles.cos(), angles.sin() * (-1 if case == "output" else 1)
    even, odd = x[..., -ROPE_DIM::2], x[..., -ROPE_DIM + 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)
    return torch.cat((x[..., :-ROPE_DIM], rotated), -1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if torch.isnan(got).any():
        return float("nan")
    return ((got.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm()).item()


def check(case: str, steps: int) -> bool:
    """PASS/FAIL of the kernel against the fp64 reference and the GPU's aten chain."""
    s = inputs(case, steps)
    out = torch.full_like(s["x"], float("nan"))
    got = kernel(case, s, out)
    chain = aten_chain(case, s)
    to_fp64, to_chain = relative_error(got, fp64_reference(case, s)), relative_error(got, chain)
    same_as_op = torch.equal(registered_op(case, s), got)
    ok = to_fp64 <= TOL and to_chain <= TOL and same_as_op  # NaN compares False: fails
    equal = (got == chain).float().mean().item()
    print(f"{'PASS' if ok else 'FAIL'} {case} T={steps}: vs fp64 {to_fp64:.1e}, vs aten chain {to_chain:.1e} "
          f"(<= {TOL:g}), bit-equal to the aten chain {100 * equal:.2f}%, the registered op "
          f"{'runs' if same_as_op else 'does NOT run'} this kernel")
    return ok


def kernel_launches(fn, *args) -> int:
    """CUDA kernels one call launches (a warm call: compiles and autotuning done)."""
    fn(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def measure(case: str, steps: int, gbps: float, sets: int = 8) -> dict:
    arg_sets = [(inputs(case, steps),) for _ in range(sets)]
    compiled = torch.compile(lambda s: aten_chain(case, s), dynamic=False)
    variants = {"kernel": lambda s: kernel(case, s), "aten": lambda s: aten_chain(case, s), "compiled": compiled}
    row = dict(case=case, tokens=steps)
    for name, fn in variants.items():
        row[f"{name}_us"] = graph_us(fn, arg_sets)
        row[f"{name}_launches"] = kernel_launches(fn, *arg_sets[0])
    x = arg_sets[0][0]["x"]
    row["floor_us"] = 2 * x.numel() * x.element_size() / gbps / 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    passed = all([check(case, steps) for case in CASES for steps in args.tokens])
    print(f"{'PASS' if passed else 'FAIL'} all value checks")
    if not passed:
        raise SystemExit(1)
    gbps = copy_gbps()
    print(f"copy bandwidth {gbps:.0f} GB/s; times in us (launches), floor: bytes of x and the output")
    print(f"{'case':>12} {'T':>3} {'kernel':>12} {'aten':>12} {'compiled':>12} {'floor':>7}")
    rows = []
    for case in CASES:
        for steps in args.tokens:
            r = measure(case, steps, gbps)
            rows.append(r)
            cells = " ".join(f"{r[f'{v}_us']:7.1f} ({r[f'{v}_launches']:2d})" for v in ("kernel", "aten", "compiled"))
            print(f"{case:>12} {steps:>3} {cells} {r['floor_us']:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=environment(), copy_gbps=gbps, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
