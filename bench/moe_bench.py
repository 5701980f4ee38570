"""The fused FP4 MoE (`dsv4c::moe_fp4`) on a GPU at DeepSeek-V4-Flash's sizes: correctness against the
reference, then time and bandwidth beside the path it replaces, in the same run on the same card.

One MoE layer: D = 4096, I = 2048, 256 routed experts (MXFP4, random codes, scales 2^-9 .. 2^-4), top 6, the
FP8 shared expert, bf16 activations. For each T it checks moe_fp4 (W4A8, faithful) against codegen/moe_fp4.py's
reference on the GPU (normwise relative error, NaN never passes), then times, each as the median of CUDA-graph
replays over rotating input sets (each set its own x, ids and routing weights, so the experts read differ from
set to set and the 3.4 GB of routed weights are not served from L2):
  moe_fp4_w4a8   the fused op's kernels (routed + shared + combine), W4A8
  moe_fp4_w4a16  the same, bf16 activations (W4A16)
  routed_moe     the fast-step issue's routed experts alone (act_quant), codegen/kernels/routed_moe.py
  before         what the graph ran before the lowering: routed_moe + the shared expert as three fp8_linear
                 calls and its SwiGLU in torch, + the combine
and reports the bytes a call must read (the distinct selected experts' FP4 codes and e8m0 scales of w1, w3,
w2, the shared expert's FP8 weights and scales, x), GB/s and the fraction of the device-to-device copy
bandwidth measured in the same run (the byte floor is bytes / that bandwidth).
Usage: python bench/moe_bench.py [--t 1 8 32 64 128] [--sets 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops)
from dsv4c.codegen.kernels import moe_fp4 as kernels
from dsv4c.codegen.kernels import routed_moe as routed_kernels
from dsv4c.codegen.kernels.fp8_gemm import fp8_linear
from dsv4c.codegen.moe_fp4 import reference
from gpu_common import copy_gbps, environment, graph_us  # bench/gpu_common.py (scripts run from bench/)

D, I, E, K, LIMIT = 4096, 2048, 256, 6, 10.0


def routed_weights(gen: torch.Generator) -> list[list[torch.Tensor]]:
    """The six per-expert lists (w1, s1, w3, s3, w2, s2), made on the GPU."""
    lists: list[list[torch.Tensor]] = [[] for _ in range(6)]
    for _ in range(E):
        for index, (rows, cols) in ((0, (I, D)), (2, (I, D)), (4, (D, I))):
            lists[index].append(torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, device="cuda",
                                              generator=gen))
            lists[index + 1].append(torch.randint(118, 124, (rows, cols // 32), dtype=torch.uint8, device="cuda",
                                                  generator=gen).view(torch.float8_e8m0fnu))
    return lists


def shared_weights(gen: torch.Generator) -> list[torch.Tensor]:
    """The shared expert's e4m3 w1, w3, w2 (no NaN codes) with e8m0 scales near 2^-6 per 128 x 128 block."""
    out = []
    for rows, cols in ((I, D), (I, D), (D, I)):
        magnitude = torch.randint(0, 0x7F, (rows, cols), dtype=torch.uint8, device="cuda", generator=gen)
        sign = torch.randint(0, 2, (rows, cols), dtype=torch.uint8, device="cuda", generator=gen) << 7
        scale = torch.randint(118, 122, (rows // 128, cols // 128), dtype=torch.uint8, device="cuda", generator=gen)
        out += [(magnitude | sign).view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu)]
    return out


def input_sets(t: int, count: int, gen: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    sets = []
    for _ in range(count):
        x = torch.randn(t, D, device="cuda", generator=gen).to(torch.bfloat16)
        ids = torch.rand(t, E, device="cuda", generator=gen).topk(K, dim=-1).indices
        sets.append((x, ids, torch.rand(t, K, device="cuda", generator=gen) + 0.5))
    return sets


def bytes_read(ids: torch.Tensor) -> int:
    """The selected experts' FP4 codes + scales, the shared expert's FP8 weights + scales, x (bf16)."""
    per_expert = 3 * (I * D // 2 + I * D // 32)
    shared = 3 * (I * D + (I // 128) * (D // 128))
    return ids.unique().numel() * per_expert + shared + ids.shape[0] * D * 2


def before(x, ids, weights, lists, shared):
    """The graph before the lowering: routed_moe, then the shared expert's three fp8_linears and SwiGLU."""
    routed = routed_kernels.routed_moe(x, ids, weights, lists, LIMIT, True)
    gate = fp8_linear(x, shared[0], shared[1], True, torch.bfloat16).float().clamp(max=LIMIT)
    up = fp8_linear(x, shared[2], shared[3], True, torch.bfloat16).float().clamp(-LIMIT, LIMIT)
    down = fp8_linear((F.silu(gate) * up).to(torch.bfloat16), shared[4], shared[5], True, torch.bfloat16)
    return (routed + down.float()).to(torch.bfloat16)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.isnan().any() or want.isnan().any():
        return float("nan")
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--sets", type=int, default=8, help="rotating input sets a graph replay runs")
    parser.add_argument("--json", help="write the rows and the environment here")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    lists, shared = routed_weights(gen), shared_weights(gen)
    gbps, rows = copy_gbps(), []
    variants = {
        "moe_fp4_w4a8": lambda x, i, w: kernels.moe_fp4(x, i, w, lists, shared, LIMIT, LIMIT, "w4a8", True),
        "moe_fp4_w4a16": lambda x, i, w: kernels.moe_fp4(x, i, w, lists, shared, LIMIT, LIMIT, "w4a16", True),
        "routed_moe": lambda x, i, w: routed_kernels.routed_moe(x, i, w, lists, LIMIT, True),
        "before": lambda x, i, w: before(x, i, w, lists, shared),
    }
    for t in args.t:
        sets = input_sets(t, args.sets, gen)
        x, ids, weights = sets[0]
        want = reference(x, ids, weights, *lists, shared, LIMIT, LIMIT, "w4a8", True)
        row = dict(t=t, bytes=sum(bytes_read(s[1]) for s in sets) // len(sets),
                   rel_err_w4a8=rel_err(variants["moe_fp4_w4a8"](*sets[0]), want),
                   rel_err_before=rel_err(variants["before"](*sets[0]), want))
        for name, fn in variants.items():
            row[f"{name}_us"] = graph_us(fn, sets)
        row["w4a8_gbps"] = row["bytes"] / row["moe_fp4_w4a8_us"] / 1e3
        row["floor_us"] = row["bytes"] / gbps / 1e3
        row["floor_fraction"] = row["floor_us"] / row["moe_fp4_w4a8_us"]
        rows.append(row)
        print(f"T={t:4d} bytes {row['bytes'] / 1e6:7.1f} MB  floor {row['floor_us']:6.1f} us  "
              f"w4a8 {row['moe_fp4_w4a8_us']:7.1f} us ({row['w4a8_gbps']:6.0f} GB/s, {row['floor_fraction']:.0%} of "
              f"floor)  w4a16 {row['moe_fp4_w4a16_us']:7.1f}  routed_moe {row['routed_moe_us']:7.1f}  "
              f"before {row['before_us']:7.1f} us  err {row['rel_err_w4a8']:.1e} / {row['rel_err_before']:.1e}",
              flush=True)
    env = dict(environment(), copy_gbps=gbps)
    print(json.dumps(env))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
