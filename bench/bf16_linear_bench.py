"""`dsv4c::bf16_linear` on a GPU: correctness first (PASS/FAIL lines), then time and bandwidth on DeepSeek-V4-Flash's
bf16-weight linears (the LM head, a C4 compressor projection, the indexer's weights_proj) at M = 1, 8, 64, beside
what the plan did before the bf16_linear pass and cuBLAS's bf16 matmul.

Checks, for each shape and M (outputs poisoned with NaN first: the allocator's next block of the output's size is
filled with NaN and freed just before each kernel call, so an element the kernel leaves unwritten reads NaN):
  accuracy   the kernel (codegen/bf16_linear.py's CUDA implementation: the batch-invariant matmul reading the
             weight as bf16) for bf16 x ("native") and fp32 x ("bf16x3") against an fp64 reference: relative norm
             error <= 1e-5 for fp32 outputs (fp32 sums of K exact products), <= 2^-8 for bf16 outputs; torch's
             fp32 matmul's own error printed beside.
  invariant  the rows of the M-row call equal the same rows of a 1-row and a 3-row call, bit for bit.
Then it times, each the median of CUDA-graph replays over rotating input sets (together several times the L2, so no
weight is read from cache):
  bf16_linear       the kernel, bf16 x, fp32 out (the LM head's form)
  bf16_linear_x32   the kernel, fp32 x ("bf16x3"), fp32 out
  widened           `x.float() @ W.float().T`: the plan before the pass (the weight widened to fp32 each step),
                    the product on cuBLAS in fp32
  widened_invariant the same inside runtime/batch_invariant.py's block, as the runtime ran it (the fp32 product
                    on the batch-invariant matmul's fp32 FMAs)
  cublas_bf16       `torch.mm(x, W.T)` in bf16 (cuBLAS, bf16 out: a bandwidth reference, not the same value)
and reports the bytes the kernel must move (the bf16 weight once, x read, output written), GB/s, and their fraction
of the device-to-device copy bandwidth measured in the same run.
With --sweep it also times other tilings of the same kernel (bf16 x) and says whether a 64-row tile (one program
for all 64 rows, the weight tile loaded once) gives the same bits as the 16-row tile (a question for batch
invariance: whether the wgmma's N changes a row's sums).
Usage (from the repository root or bench/):
  python bench/bf16_linear_bench.py [--m 1 8 64] [--shapes lm_head compressor_wkv weights_proj] [--sweep]
                                    [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import copy_gbps, environment, graph_us  # noqa: E402  (bench/gpu_common.py)

from dsv4c.codegen import bf16_linear as op  # noqa: E402
from dsv4c.codegen.kernels.batch_invariant_launch import MatmulLaunch, bf16_weight_launch, k_slices  # noqa: E402
from dsv4c.codegen.kernels.batch_invariant_matmul import invariant_bmm  # noqa: E402
from dsv4c.codegen.targets import target_for_device  # noqa: E402
from dsv4c.runtime.batch_invariant import batch_invariant  # noqa: E402

# DeepSeek-V4-Flash's bf16-weight linears: name -> (N = out features, K = in features)
SHAPES = {"lm_head": (129280, 4096), "compressor_wkv": (1024, 4096), "weights_proj": (64, 4096)}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8}
SWEEP = [dict(block_cols=c, block_k=k, num_stages=s, num_warps=w)
         for c in (64, 128) for k in (64, 128) for s in (3, 4) for w in (4, 8)]


# ---- inputs ------------------------------------------------------------------------------------------------
def make_set(m: int, n: int, k: int, gen: torch.Generator) -> dict:
    """bf16 activations O(1) with a few large channels (as a trained model's), a bf16 weight ~ N(0, 0.02)."""
    x = torch.randn(m, k, generator=gen, device="cuda")
    x[:, torch.randint(0, k, (max(1, k // 256),), generator=gen, device="cuda")] *= 20
    weight = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    return dict(x=x.to(torch.bfloat16), x32=x, weight=weight)


def input_sets(m: int, n: int, k: int, l2_bytes: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(m * 100003 + n * 7 + k)
    count = max(2, min(64, -(-4 * l2_bytes // (n * k * 2))))
    return [make_set(m, n, k, gen) for _ in range(count)]


def kernel_bytes(m: int, n: int, k: int, x_bytes: int) -> int:
    """Bytes the kernel must move: the bf16 weight once, x read once, the fp32 output written once."""
    return n * k * 2 + m * k * x_bytes + m * n * 4


# ---- correctness -------------------------------------------------------------------------------------------
def poisoned_call(fn, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """fn() with the allocator's next block of `shape` / `dtype` filled with NaN first (the kernel allocates its
    output there): an element it leaves unwritten reads NaN."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    return fn()


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.isnan().any():
        return float("nan")
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check(s: dict, m: int) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) for the accuracy and batch invariance of one input set."""
    out = []
    n = s["weight"].shape[0]
    for x_name, x_label in (("x", "bf16 x"), ("x32", "fp32 x")):
        x = s[x_name]
        ref64 = x.double() @ s["weight"].double().T
        ref32 = x.float() @ s["weight"].float().T
        for out_dtype in (torch.float32, torch.bfloat16):
            call = lambda rows: poisoned_call(  # noqa: E731
                lambda: op.cuda_impl(x[:rows], s["weight"], out_dtype), (rows, n), out_dtype)
            got = call(m)
            err = rel_error(got, ref64)
            ok = err <= TOLERANCE[out_dtype]  # NaN fails
            out.append((f"accuracy {x_label}, {dtype_name(out_dtype)} out", ok,
                        f"rel err {err:.2e} (torch fp32 {rel_error(ref32, ref64):.2e}) <= {TOLERANCE[out_dtype]:.0e}"))
            same = all(torch.equal(call(rows), got[:rows]) for rows in (1, 3) if rows <= m)
            out.append((f"invariant {x_label}, {dtype_name(out_dtype)} out", same,
                        "rows of the 1- and 3-row calls equal the M-row call's"))
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- timing ------------------------------------------------------------------------------------------------
def time_paths(sets: list[dict]) -> dict[str, float]:
    f32, args = torch.float32, [(s,) for s in sets]
    widened = lambda s: s["x"].float() @ s["weight"].float().T  # noqa: E731
    times = {"bf16_linear": graph_us(lambda s: op.cuda_impl(s["x"], s["weight"], f32), args),
             "bf16_linear_x32": graph_us(lambda s: op.cuda_impl(s["x32"], s["weight"], f32), args),
             "widened": graph_us(widened, args)}
    with batch_invariant():  # as the runtime runs every step: the fp32 product on the batch-invariant matmul
        times["widened_invariant"] = graph_us(widened, args)
    times["cublas_bf16"] = graph_us(lambda s: torch.mm(s["x"], s["weight"].T), args)
    return times


def sweep(sets: list[dict], m: int, n: int, k: int) -> list[dict]:
    """Other tilings of the kernel (bf16 x, the default K split rule): microseconds and accuracy each (or the
    error a tiling fails with); the 64-row tile's bits against the default 16-row tile's."""
    base = bf16_weight_launch(target_for_device("cuda"), m, n, k, torch.bfloat16)
    x, weight = sets[0]["x"], sets[0]["weight"]
    rows = []
    for fields in SWEEP + ([dict(block_rows=64)] if m > 16 else []):
        launch = retiled(base, n, k, fields)
        run = lambda s, launch=launch: invariant_bmm(s["x"][None], s["weight"].t()[None], torch.float32,  # noqa: E731
                                                     launch=launch)
        try:
            got = run(sets[0])[0]
            row = dict(launch=dataclasses.asdict(launch), us=graph_us(run, [(s,) for s in sets]),
                       rel_err=rel_error(got, x.double() @ weight.double().T))
        except Exception as error:  # a tiling Triton cannot build for this card: reported, the sweep goes on
            rows.append(dict(launch=dataclasses.asdict(launch), error=f"{type(error).__name__}: {error}"[:200]))
            continue
        if fields.get("block_rows") == 64:
            default = invariant_bmm(x[None], weight.t()[None], torch.float32, launch=base)[0]
            row["same_bits_as_16_rows"] = torch.equal(got, default)
        rows.append(row)
    return rows


def retiled(base: MatmulLaunch, n: int, k: int, fields: dict) -> MatmulLaunch:
    """base with the tiles in `fields`, its K split recomputed by matmul_launch's rule for them (from N, K and
    the target only: still batch-invariant)."""
    cols, block_k = fields.get("block_cols", base.block_cols), fields.get("block_k", base.block_k)
    col_tiles = -(-n // cols)
    split_k, per_slice = k_slices(-(-k // block_k), -(-2 * target_for_device("cuda").sm_count // col_tiles))
    return dataclasses.replace(base, **{**fields, "split_k": split_k, "blocks_per_split": per_slice})


# ---- main --------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    env = environment()
    copy_bw = copy_gbps()
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{env['card']} ({env['target']}), torch {env['torch']}, triton {env['triton']}; copy {copy_bw:.0f} GB/s")
    results, failures = [], 0
    for name in args.shapes:
        n, k = SHAPES[name]
        for m in args.m:
            sets = input_sets(m, n, k, l2_bytes)
            for check_name, ok, detail in check(sets[0], m):
                failures += not ok
                print(f"{'PASS' if ok else 'FAIL'} {name} M={m} {check_name}: {detail}")
            times = time_paths(sets)
            floor = {path: kernel_bytes(m, n, k, 4 if path == "bf16_linear_x32" else 2) for path in times}
            launch = bf16_weight_launch(target_for_device("cuda"), m, n, k, torch.bfloat16)
            row = dict(shape=name, n=n, k=k, m=m, us=times, gbps={p: floor[p] / times[p] / 1e3 for p in times},
                       launch=dataclasses.asdict(launch))
            if args.sweep:
                row["sweep"] = sweep(sets, m, n, k)
            results.append(row)
            del sets
            torch.cuda.empty_cache()
    print(f"\n{'shape':<16}{'M':>4}  {'path':<16}{'us':>10}{'GB/s':>8}{'of copy':>9}")
    for row in results:
        for path, us in row["us"].items():
            gbps = row["gbps"][path]
            print(f"{row['shape']:<16}{row['m']:>4}  {path:<16}{us:>10.1f}{gbps:>8.0f}{gbps / copy_bw:>9.0%}")
    print("(GB/s: the kernel's bytes - the bf16 weight once, x, the fp32 output - over each path's time)")
    for row in results:
        for s in row.get("sweep", []):
            launch = {f: s["launch"][f] for f in ("block_rows", "block_cols", "block_k", "split_k", "num_stages",
                                                  "num_warps")}
            if "error" in s:
                print(f"sweep {row['shape']} M={row['m']} {launch}: {s['error']}")
                continue
            extra = f", same bits as 16 rows: {s['same_bits_as_16_rows']}" if "same_bits_as_16_rows" in s else ""
            print(f"sweep {row['shape']} M={row['m']} {launch}: {s['us']:.1f} us, rel err {s['rel_err']:.1e}{extra}")
    if args.json:
        args.json.write_text(json.dumps(dict(environment=env, copy_gbps=copy_bw, results=results), indent=1))
    print(f"\n{'PASS' if failures == 0 else 'FAIL'}: {failures} failed checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
