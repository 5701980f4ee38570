"""The fused FP4 MoE (`dsv4c::moe_fp4`, routing included) on a GPU at DeepSeek-V4-Flash's sizes: correctness
against the reference, then time and bandwidth beside the path it replaces, in the same run on the same card.

One score-routed MoE layer: D = 4096, I = 2048, 256 routed experts (MXFP4, random codes, scales 2^-9 .. 2^-4),
top 6 of sqrt(softplus) scores plus a bias, normalised and scaled by 1.5, the bf16 router, the FP8 shared
expert, bf16 activations. For each T it checks moe_fp4 (W4A8, faithful) against codegen/moe_fp4.py's reference
on the GPU (normwise relative error, NaN never passes) and the share of tokens whose experts the op's routing
kernels select as torch does (random weights make near ties, where either choice is right, so not always 1),
then times, each as the median of CUDA-graph replays over rotating input sets (each set its own x, so the
experts read differ from set to set and the 3.4 GB of routed weights are not served from L2):
  moe_fp4_w4a8   the fused op's kernels (routing + routed + shared + combine), W4A8
  moe_fp4_w4a16  the same, bf16 activations (W4A16)
  route          the op's two routing launches alone (router logits, then selection and weights)
  route_torch    the routing as the graph ran it before the lowering: the model's torch ops
  routed_moe     the fast-step issue's routed experts alone (act_quant; ids and weights given)
  before         what the graph ran before the lowering: route_torch + routed_moe + the shared expert as three
                 fp8_linear calls and its SwiGLU in torch + the combine
  inductor       torch.compile (Inductor) of that graph, the dsv4c ops opaque to it (as `torch.compile(model,
                 backend="inductor")` sees them): it fuses the routing and the SwiGLU / combine around them; a
                 compile that fails is reported and its column left empty (--no-compile skips it)
and reports the bytes a call must read (the router, the distinct selected experts' FP4 codes and e8m0 scales
of w1, w3, w2, the shared expert's FP8 weights and scales, x), GB/s and the fraction of the device-to-device
copy bandwidth measured in the same run (the byte floor is bytes / that bandwidth).
With --launches, each T also lists the W4A8 op's device time kernel by kernel (graph-free, profiled).
With --sweep, each T also times the W4A8 op over a grid of launches around the target's choice (num_stages,
num_warps, the down GEMM's split_k), each checked against the reference first, and prints the five fastest
beside the target's: what to change in codegen/kernels/moe_fp4_launch.py (the launch must not depend on T).
Usage: python bench/moe_bench.py [--t 1 8 32 64 128] [--sets 8] [--no-compile] [--launches] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math

import torch
import torch.nn.functional as F

from dsv4c.codegen import moe_routing
from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops)
from dsv4c.codegen.kernels import moe_fp4 as kernels
from dsv4c.codegen.kernels import routed_moe as routed_kernels
from dsv4c.codegen.kernels.moe_fp4_launch import moe_fp4_launch
from dsv4c.codegen.kernels.moe_route import route
from dsv4c.codegen.moe_fp4 import reference
from dsv4c.codegen.moe_routing import Routing
from dsv4c.codegen.targets import target_for_device
from gpu_common import baseline_us, copy_gbps, environment, graph_us, kernel_us  # bench/gpu_common.py (scripts run from bench/)

D, I, E, K, LIMIT = 4096, 2048, 256, 6, 10.0
ROUTING = Routing(K, "sqrtsoftplus", True, 1.5)


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


def router_weights(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The router (bf16 [E, D]) and its selection bias (fp32 [E])."""
    router = (torch.randn(E, D, device="cuda", generator=gen) * D ** -0.5).to(torch.bfloat16)
    return router, torch.randn(E, device="cuda", generator=gen) * 0.1


def input_sets(t: int, count: int, gen: torch.Generator, router: torch.Tensor,
               bias: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each set: x, and the ids and weights the model's routing gives it (for the variants that take them)."""
    sets = []
    for _ in range(count):
        x = torch.randn(t, D, device="cuda", generator=gen).to(torch.bfloat16)
        sets.append((x, *moe_routing.route(x, router, bias, None, None, ROUTING)))
    return sets


def bytes_read(ids: torch.Tensor) -> int:
    """The router (bf16), the selected experts' FP4 codes + scales, the shared expert's FP8 weights + scales,
    x (bf16)."""
    per_expert = 3 * (I * D // 2 + I * D // 32)
    shared = 3 * (I * D + (I // 128) * (D // 128))
    return E * D * 2 + ids.unique().numel() * per_expert + shared + ids.shape[0] * D * 2


def before(x, router, bias, lists, shared):
    """The graph before the lowering, through the registered ops (torch.ops.dsv4c.*) as a captured graph holds
    them: the torch routing, routed_moe, then the shared expert's three fp8_linears and SwiGLU. Timed as it is and
    compiled by Inductor (the dsv4c ops opaque to it)."""
    ids, weights = moe_routing.route(x, router, bias, None, None, ROUTING)
    routed = torch.ops.dsv4c.routed_moe(x, ids, weights, *lists, LIMIT, True)
    gate = torch.ops.dsv4c.fp8_linear(x, shared[0], shared[1], True, torch.bfloat16).float().clamp(max=LIMIT)
    up = torch.ops.dsv4c.fp8_linear(x, shared[2], shared[3], True, torch.bfloat16).float().clamp(-LIMIT, LIMIT)
    down = torch.ops.dsv4c.fp8_linear((F.silu(gate) * up).to(torch.bfloat16), shared[4], shared[5], True,
                                      torch.bfloat16)
    return (routed + down.float()).to(torch.bfloat16)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.isnan().any() or want.isnan().any():
        return float("nan")
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


SWEEP = dict(num_stages=(3, 4, 5), num_warps=(4, 8), split_k=(1, 2, 4), shared_split=(1, 2), pdl=(False, True))


def sweep(launch, t: int, sets: list[tuple], want: torch.Tensor, fused_at, bound: float) -> list[dict]:
    """The W4A8 op at every launch of the SWEEP grid (the target's own included), fastest first: each launch's
    median us over the rotating sets, after its output on the first set is checked against the reference
    (relative error within `bound`, NaN never passes); a launch that fails its check or does not compile is
    listed with its reason and no time."""
    out = []
    for values in itertools.product(*SWEEP.values()):
        trial = dataclasses.replace(launch, **dict(zip(SWEEP, values)))
        row = dict(t=t, **dict(zip(SWEEP, values)), chosen=trial == launch)
        try:
            err = rel_err(fused_at(trial)(*sets[0]), want)
            if not err <= bound:
                row["error"] = f"relative error {err:.1e} > {bound:.1e}"
            else:
                row["us"] = graph_us(fused_at(trial), sets)
        except Exception as error:  # a launch Triton cannot build (registers, shared memory): listed, not fatal
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        out.append(row)
    return sorted(out, key=lambda r: r.get("us", math.inf))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--sets", type=int, default=8, help="rotating input sets a graph replay runs")
    parser.add_argument("--no-compile", action="store_true", help="skip the Inductor baseline")
    parser.add_argument("--launches", action="store_true", help="also time the W4A8 op's kernels one by one")
    parser.add_argument("--sweep", action="store_true", help="also time the W4A8 op over a grid of launches")
    parser.add_argument("--json", help="write the rows and the environment here")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    lists, shared = routed_weights(gen), shared_weights(gen)
    router, bias = router_weights(gen)
    launch = moe_fp4_launch(target_for_device("cuda"), E, K, D, I, "w4a8", True)
    gbps, rows = copy_gbps(), []
    fused = lambda x, acts, at=None: kernels.moe_fp4(x, router, bias, None, None, ROUTING, lists, shared,  # noqa
                                                     LIMIT, LIMIT, acts, True, launch=at)
    fused_at = lambda at: lambda x, i, w: fused(x, "w4a8", at)  # noqa
    variants = {
        "moe_fp4_w4a8": lambda x, i, w: fused(x, "w4a8"),
        "moe_fp4_w4a16": lambda x, i, w: fused(x, "w4a16"),
        "route": lambda x, i, w: route(x, router, bias, None, None, ROUTING, launch),
        "route_torch": lambda x, i, w: moe_routing.route(x, router, bias, None, None, ROUTING),
        "routed_moe": lambda x, i, w: routed_kernels.routed_moe(x, i, w, lists, LIMIT, True),
        "before": lambda x, i, w: before(x, router, bias, lists, shared),
    }
    if not args.no_compile:
        compiled = torch.compile(before, dynamic=True)
        variants["inductor"] = lambda x, i, w: compiled(x, router, bias, lists, shared)
    for t in args.t:
        sets = input_sets(t, args.sets, gen, router, bias)
        x, ids, _ = sets[0]
        want = reference(x, router, bias, None, None, *lists, shared, ROUTING.top_k, ROUTING.scoring,
                         ROUTING.normalize, ROUTING.scale, LIMIT, LIMIT, "w4a8", True)
        got_ids, _ = variants["route"](*sets[0])
        row = dict(t=t, bytes=sum(bytes_read(s[1]) for s in sets) // len(sets),
                   rel_err_w4a8=rel_err(variants["moe_fp4_w4a8"](*sets[0]), want),
                   rel_err_before=rel_err(variants["before"](*sets[0]), want),
                   same_experts=(got_ids.long() == ids).all(-1).double().mean().item())
        for name, fn in variants.items():
            row[f"{name}_us"] = baseline_us(name, fn, sets) if name == "inductor" else graph_us(fn, sets)
        if not math.isnan(row.get("inductor_us", math.nan)):  # Inductor compiled and was captured
            row["rel_err_inductor"] = rel_err(variants["inductor"](*sets[0]), want)
        row["w4a8_gbps"] = row["bytes"] / row["moe_fp4_w4a8_us"] / 1e3
        row["floor_us"] = row["bytes"] / gbps / 1e3
        row["floor_fraction"] = row["floor_us"] / row["moe_fp4_w4a8_us"]
        rows.append(row)
        print(f"T={t:4d} bytes {row['bytes'] / 1e6:7.1f} MB  floor {row['floor_us']:6.1f} us  "
              f"w4a8 {row['moe_fp4_w4a8_us']:7.1f} us ({row['w4a8_gbps']:6.0f} GB/s, {row['floor_fraction']:.0%} of "
              f"floor)  w4a16 {row['moe_fp4_w4a16_us']:7.1f}  route {row['route_us']:5.1f} (torch "
              f"{row['route_torch_us']:5.1f})  routed_moe {row['routed_moe_us']:7.1f}  before {row['before_us']:7.1f} "
              f"(inductor {row.get('inductor_us', float('nan')):7.1f}) "
              f"us  err {row['rel_err_w4a8']:.1e} / {row['rel_err_before']:.1e}  same experts "
              f"{row['same_experts']:.0%}", flush=True)
        if args.launches:
            row["launches_us"] = kernel_us(variants["moe_fp4_w4a8"], sets)
            for name, us in row["launches_us"].items():
                print(f"    {us:7.1f} us  {name[:100]}")
        if args.sweep:
            row["sweep"] = sweep(launch, t, sets, want, fused_at, max(2 * row["rel_err_w4a8"], 1e-3))
            fastest = [r for r in row["sweep"] if "us" in r][:5]
            for r in fastest + [r for r in row["sweep"] if r["chosen"] and r not in fastest]:
                us = r.get("us", math.nan)
                mark = "  <- the target's launch" if r["chosen"] else ""
                print(f"    stages {r['num_stages']} warps {r['num_warps']} split_k {r['split_k']} "
                      f"shared_split {r['shared_split']} pdl {r['pdl']:d}: {us:7.1f} us "
                      f"({row['floor_us'] / us:.0%} of floor){mark} {r.get('error', '')}")
    env = dict(environment(), copy_gbps=gbps)
    print(json.dumps(env))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
