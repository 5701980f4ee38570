"""The block-scaled FP8 GEMM (`dsv4c::fp8_linear`) on a GPU: correctness against the reference, then time and
bandwidth on DeepSeek-V4-Flash's FP8 linears, beside torch's bf16 matmul on the dequantised weight.

For each shape (N, K) and row count M it first checks the Triton kernel (codegen/kernels/fp8_gemm.py,
act_quant, bf16 activations) against codegen/fp8_linear.py's reference on the GPU (outputs poisoned with NaN
first): the fp32 output's normwise relative error against the fp32 reference and against an fp64 one (the
fp32 reference's own error beside it), and how many bf16 outputs differ from the reference's. Then it times,
each as the median of CUDA-graph replays over rotating input sets (each set its own x and weight; together
several times the L2, so no weight is read from cache):
  fp8     the Triton kernel, act_quant, bf16 in and out (the faithful decode path)
  torch   `x @ W.T` with W dequantised to bf16 (cuBLAS; the eager baseline's matmul)
and reports the bytes the FP8 kernel must move (e4m3 codes + e8m0 scales + x read, output written), its GB/s
and their fraction of the device-to-device copy bandwidth measured in the same run (bytes read + written).
Usage (Flash shapes, M = 1, 8, 32, 64, 128 by default; one command, a table at the end):
  python bench/fp8_gemm_bench.py [--m 1 8 32 64 128] [--shapes wq_a wo_b ...] [--plain] [--json out.json]
  python bench/fp8_gemm_bench.py --sweep --m 1 64 --shapes wq_a w2   # also time a grid of launches
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import traceback

import torch

from dsv4c.codegen import fp8_linear as op
from dsv4c.codegen.kernels import fp8_gemm
from dsv4c.codegen.kernels.fp8_gemm_launch import Fp8GemmLaunch, fp8_gemm_launch, split_blocks
from dsv4c.codegen.targets import target_for_device
from dsv4c.model import quant
from gpu_common import copy_gbps, environment, graph_us  # bench/gpu_common.py (scripts run from bench/)

# DeepSeek-V4-Flash's FP8 linears: name -> (N = out features, K = in features)
SHAPES = {"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096), "wo_b": (4096, 8192),
          "indexer_wq_b": (8192, 1024), "shared_w1_w3": (2048, 4096), "shared_w2": (4096, 2048),
          "mtp_e_h_proj": (4096, 4096)}


# ---- inputs ------------------------------------------------------------------------------------------
def make_set(m: int, n: int, k: int, gen: torch.Generator) -> dict:
    """One linear's inputs on the GPU: bf16 activations O(1) with a few large channels (as a trained model's),
    a weight quantised from Gaussian values like the release's, and its bf16 dequantisation."""
    x = torch.randn(m, k, generator=gen, device="cuda")
    x[:, torch.randint(0, k, (max(1, k // 256),), generator=gen, device="cuda")] *= 20
    weight, scale = quant.quantize_fp8_weight(torch.randn(n, k, generator=gen, device="cuda") * 0.02)
    return dict(x=x.to(torch.bfloat16), weight=weight, scale=scale,
                dense=quant.dequant_fp8_weight(weight, scale).to(torch.bfloat16))


def fp8_bytes(m: int, n: int, k: int) -> int:
    """Bytes the kernel must move: e4m3 codes, e8m0 scales, bf16 x read once; bf16 output written once."""
    return n * k + -(-n // 128) * -(-k // 128) + m * k * 2 + m * n * 2


def input_sets(m: int, n: int, k: int, l2_bytes: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(m * 100003 + n * 7 + k)
    count = max(3, min(64, -(-4 * l2_bytes // (n * k))))
    return [make_set(m, n, k, gen) for _ in range(count)]


# ---- timing --------------------------------------------------------------------------------------------
# ---- correctness ---------------------------------------------------------------------------------------
# Hopper's FP8 tensor cores sum a wgmma chain's products with about 14 bits of mantissa, not fp32's 24: on an
# H100 every Flash shape measured 1.6e-4 to 2.0e-4 normwise against the fp32 reference (the reference itself
# 5e-8 from fp64). One activation rounded to a neighbouring e4m3 code moves its row by about 2e-3, so 5e-4
# still catches a rounding that differs from the reference's.
TOLERANCE = 5e-4


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert not got.isnan().any(), "NaN in the kernel's output (an element left unwritten?)"
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def check(s: dict, act_quant: bool, launch: Fp8GemmLaunch | None = None, x_dtype=torch.bfloat16) -> dict:
    """The kernel against the reference on one set (outputs poisoned with NaN first): fp32 output's relative
    error against the fp32 and the fp64 reference, bf16 outputs that differ from the reference's."""
    x, weight, scale = s["x"].to(x_dtype), s["weight"], s["scale"]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        poisoned = torch.full((x.shape[0], weight.shape[0]), float("nan"), dtype=dtype, device="cuda")
        out[dtype] = fp8_gemm.fp8_linear(x, weight, scale, act_quant, dtype, launch=launch, out=poisoned)
    ref32 = op.reference(x, weight, scale, act_quant, torch.float32)
    values = op.fake_quant_rows(x) if act_quant else x.float()
    ref64 = values.double() @ quant.dequant_fp8_weight(weight, scale).double().T
    ref16 = op.reference(x, weight, scale, act_quant, torch.bfloat16)
    # one bf16 step of the reference (2^-7 of |value| bounds it) plus the fp32 tolerance, for values near zero
    step = ref16.float().abs() * 2.0 ** -7 + TOLERANCE * ref32.square().mean().sqrt()
    return dict(rel_fp32=rel_error(out[torch.float32], ref32), rel_fp64=rel_error(out[torch.float32], ref64),
                ref_rel_fp64=rel_error(ref32, ref64),
                bf16_diff=int((out[torch.bfloat16] != ref16).sum().item()),
                bf16_far=int(((out[torch.bfloat16].float() - ref16.float()).abs() > step).sum().item()),
                op_equal=bool(torch.equal(torch.ops.dsv4c.fp8_linear(x, weight, scale, act_quant, torch.bfloat16),
                                          out[torch.bfloat16])) if launch is None else None)


def check_ok(c: dict) -> bool:
    """fp32 output within TOLERANCE of the fp32 reference (normwise); every bf16 output within one bf16 step of
    the reference's (how many differ at all is reported, bf16_diff); the registered op's CUDA kernel gives the
    wrapper's output."""
    return c["rel_fp32"] <= TOLERANCE and c["bf16_far"] == 0 and c["op_equal"] is not False


# ---- the run ---------------------------------------------------------------------------------------------
def fp8_call(launch=None, act_quant=True):
    return lambda x, w, s, dense: fp8_gemm.fp8_linear(x, w, s, act_quant, torch.bfloat16, launch=launch)


def torch_call(x, w, s, dense):
    return x @ dense.T


def bench_row(name: str, m: int, args, gbps: float, l2_bytes: int) -> dict:
    n, k = SHAPES[name]
    launch = fp8_gemm_launch(target_for_device("cuda"), m, n, k)
    row = dict(shape=name, n=n, k=k, m=m, launch=dataclasses.asdict(launch), bytes=fp8_bytes(m, n, k))
    sets = input_sets(m, n, k, l2_bytes)
    row["sets"] = len(sets)
    row["check"] = check(sets[0], True)
    row["ok"] = check_ok(row["check"])
    arg_sets = [(s["x"], s["weight"], s["scale"], s["dense"]) for s in sets]
    row["fp8_us"] = graph_us(fp8_call(), arg_sets)
    row["torch_us"] = graph_us(torch_call, arg_sets)
    if args.plain:
        row["plain_check"] = {str(dtype): check(sets[0], False, x_dtype=dtype)
                              for dtype in (torch.bfloat16, torch.float32)}
        row["plain_bf16_us"] = graph_us(fp8_call(act_quant=False), arg_sets)
        row["plain_fp32_us"] = graph_us(fp8_call(act_quant=False), [(x.float(), *rest) for x, *rest in arg_sets])
    row["fp8_gbps"] = row["bytes"] / row["fp8_us"] / 1e3
    row["copy_fraction"] = row["fp8_gbps"] / gbps
    del sets, arg_sets
    return row


def candidate_launches(m: int, n: int, k: int) -> list[Fp8GemmLaunch]:
    """The default launch, then 32-128 weight rows a program at about 1, 2 or 4 programs an SM (split-K as
    needed), 3, 4 or 6 pipeline stages, 4 warps (and 8 with 128 rows)."""
    t = target_for_device("cuda")
    default = fp8_gemm_launch(t, m, n, k)
    found = {default: None}
    for block_n in (32, 64, 128):
        tiles = -(-n // block_n) * -(-m // default.block_m)
        for per_sm in (1, 2, 4):
            split_k, per_split = split_blocks(k, -(-per_sm * t.sm_count // tiles))
            for stages in (3, 4, 6):
                for warps in (4, 8):
                    if warps == 8 and block_n < 128:
                        continue
                    found.setdefault(dataclasses.replace(default, block_n=block_n, split_k=split_k,
                                                         blocks_per_split=per_split, num_stages=stages,
                                                         num_warps=warps, pdl=split_k > 1), None)
    return list(found)


def sweep(name: str, m: int, l2_bytes: int) -> list[dict]:
    n, k = SHAPES[name]
    sets = input_sets(m, n, k, l2_bytes)
    arg_sets = [(s["x"], s["weight"], s["scale"], s["dense"]) for s in sets]
    results = []
    for launch in candidate_launches(m, n, k):
        try:
            us = graph_us(fp8_call(launch), arg_sets, replays=10)
        except Exception as error:  # noqa: BLE001 -- a launch this GPU cannot run (shared memory): reported
            print(f"    skipped {launch}: {str(error)[:200]}", flush=True)
            continue
        results.append(dict(launch=dataclasses.asdict(launch), us=us))
    results.sort(key=lambda r: r["us"])
    default = dataclasses.asdict(fp8_gemm_launch(target_for_device("cuda"), m, n, k))
    default_us = next((r["us"] for r in results if r["launch"] == default), float("nan"))
    print(f"sweep {name} M={m}: default {default_us:.2f} us; best:", flush=True)
    for r in results[:5]:
        launch = Fp8GemmLaunch(**r["launch"])
        c = check(sets[0], True, launch)
        print(f"    {r['us']:7.2f} us  {'ok  ' if check_ok(c) else 'FAIL'} rel {c['rel_fp32']:.1e} bf16-diff "
              f"{c['bf16_diff']}  {launch}", flush=True)
    return results


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['shape']:<14}{r['m']:>5}  ERROR {r['error']}"
    c, la = r["check"], r["launch"]
    launch = f"{la['block_n']}x{la['block_m']} s{la['split_k']}x{la['blocks_per_split']} st{la['num_stages']}"
    text = (f"{r['shape']:<14}{r['m']:>5}{r['n']:>7}{r['k']:>6}  {'ok  ' if r['ok'] else 'FAIL'}"
            f"{c['rel_fp32']:>9.1e}{c['rel_fp64']:>9.1e}{c['ref_rel_fp64']:>9.1e}{c['bf16_diff']:>6}  "
            f"{launch:<20}{r['fp8_us']:>8.2f}{r['fp8_gbps']:>8.0f}{100 * r['copy_fraction']:>6.0f}%"
            f"{r['torch_us']:>9.2f}{r['torch_us'] / r['fp8_us']:>7.2f}x")
    if "plain_bf16_us" in r:
        rels = "/".join(f"{c['rel_fp64']:.0e}" for c in r["plain_check"].values())
        text += f"{r['plain_bf16_us']:>9.2f}{r['plain_fp32_us']:>9.2f}  {rels}"
    return text


HEADER = (f"{'shape':<14}{'M':>5}{'N':>7}{'K':>6}  {'chk':<4}{'rel32':>9}{'rel64':>9}{'ref64':>9}{'bf16d':>6}  "
          f"{'launch (n x m, split, stages)':<20}{'fp8 us':>8}{'GB/s':>8}{'copy':>7}{'torch us':>9}{'speed':>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--plain", action="store_true", help="also check and time plain numerics (no act_quant)")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launches per shape and M")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    env = environment()
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    gbps = copy_gbps()
    print(json.dumps(env), f"\ncopy bandwidth {gbps:.0f} GB/s (read + written), L2 {l2_bytes >> 20} MiB", flush=True)
    rows = []
    for name in args.shapes:
        for m in args.m:
            try:
                rows.append(bench_row(name, m, args, gbps, l2_bytes))
            except Exception as error:  # noqa: BLE001 -- one failing row is reported, the table goes on
                traceback.print_exc()
                rows.append(dict(shape=name, m=m, error=f"{type(error).__name__}: {str(error)[:200]}"))
            print(format_row(rows[-1]), flush=True)
    sweeps = {f"{name}/M={m}": sweep(name, m, l2_bytes) for name in args.shapes for m in args.m} if args.sweep else {}
    print(f"\ncopy bandwidth {gbps:.0f} GB/s; rel32/rel64: fp32 output vs the fp32/fp64 reference, ref64: the fp32 "
          f"reference vs fp64, bf16d: bf16 outputs unlike the reference's; times in us (CUDA graphs, median)")
    print(HEADER + ("  plain-bf16 plain-fp32 (us)  rel64 bf16/fp32 x" if args.plain else ""))
    for row in rows:
        print(format_row(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, copy_gbps=gbps, args=vars(args), rows=rows, sweeps=sweeps), f, indent=1)


if __name__ == "__main__":
    main()
