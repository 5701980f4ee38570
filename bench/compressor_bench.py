"""The KV compressor's step on a GPU: the fused Triton kernel against the aten path, torch.compile of it, and its byte
floor.

For each compressor at Flash sizes (C4: 512 dims from 2 x 512 columns, FP8 rows; C4's indexer: 128 dims, Hadamard +
FP4 rows; C128: 512 dims, FP8 rows), batch (1, 32) and step length (1 token: decode; 4: MTP verification of 3
drafts), it first checks the kernel against the op's reference (codegen/compressor.py) on the same inputs (rings bit
for bit, written rows by relative norm error within the format's tolerance: PASS/FAIL lines), then times, as the
median of CUDA-graph replays over rotating input sets (bench/gpu_common.py), a step that completes no block
("append") and one that completes a block ("pool"):
  fused     codegen/kernels/compressor.py: one launch writing the rings and the packed cache in place
  aten      the op's reference: the model's `compress` math after the projections, on aten ops (the unfused graph)
  compile   torch.compile of that reference (Inductor)
The projections (two matmuls) are the same in every path and left out. `avg` weighs append and pool by how often a
step of T tokens at a random position completes a block (1/128 of C128 decode steps, every C4 MTP step); the floor
is what a step must move at the least (its rows in, its ring rows out, and on pooling the window's ring rows in and
the packed row out) over the copy bandwidth of this run.
Usage: (cd bench && python compressor_bench.py [--batches 1 32] [--steps 1 4] [--context 4096] [--json out.json])
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv4c.codegen import compressor
from dsv4c.codegen.kernels import compressor as kernels
from dsv4c.codegen.kv_cache import PackedLayout, kv_pack, unpack_reference
from dsv4c.model.step import RING_SLACK
from gpu_common import copy_gbps, environment, graph_us

ROPE_PAIRS, EPS = 32, 1e-6
KINDS = {  # ratio, width, format, rounded dims, block, Hadamard
    "C4": (4, 512, "e4m3", 448, 64, False),
    "C4 indexer": (4, 128, "e2m1", 128, 32, True),
    "C128": (128, 512, "e4m3", 448, 64, False),
}
TOLERANCE = {"e4m3": 2e-2, "e2m1": 1e-1}  # as tests/test_compressor_fusion.py states them


def op_args(kind: str, batch: int, steps: int, start: int, context: int) -> tuple:
    """Fresh state (cache rows packed from random values) and step inputs for sequences at `start`."""
    ratio, width, fmt, rounded, block, rotate = KINDS[kind]
    coff = 2 if ratio == 4 else 1
    features, slots, dev = coff * width, coff * ratio + RING_SLACK, "cuda"
    cache = kv_pack((torch.randn(batch, context // ratio + 1, width, device=dev) * 2).bfloat16(), fmt, rounded, block)
    angles = torch.randn(batch, steps, ROPE_PAIRS, device=dev) * 100
    return (cache, torch.randn(batch, slots, features, device=dev), torch.randn(batch, slots, features, device=dev),
            torch.randn(batch, steps, features, device=dev), torch.randn(batch, steps, features, device=dev),
            torch.randn(ratio, features, device=dev), torch.rand(width, device=dev) + 0.5, angles.cos(), angles.sin(),
            torch.full((batch,), start, device=dev), ratio, EPS, fmt, rounded, block, rotate, torch.bfloat16)


def check(kind: str, batch: int, steps: int, start: int, context: int) -> tuple[bool, float]:
    """(rings and every row the step does not write bit-equal, written rows within tolerance; their relative norm
    error) of the kernel against the reference on the same step."""
    args = op_args(kind, batch, steps, start, context)
    want = [t.clone() for t in args[:3]]
    compressor.reference(*want, *args[3:])
    kernels.compress_step(*args)
    ratio, width, fmt, rounded, block, _ = KINDS[kind]
    written = torch.zeros(args[0].shape[:2], dtype=torch.bool, device=args[0].device)
    written[:, [p // ratio for p in range(start, start + steps) if (p + 1) % ratio == 0]] = True
    exact = torch.equal(args[1], want[1]) and torch.equal(args[2], want[2]) and torch.equal(args[0][~written],
                                                                                            want[0][~written])
    if not written.any():
        return exact, 0.0
    unpack = lambda c: unpack_reference(c[written], fmt, width, rounded, block, torch.bfloat16).double()  # noqa: E731
    got_rows, want_rows = unpack(args[0]), unpack(want[0])
    error = ((got_rows - want_rows).norm() / want_rows.norm()).item()
    return exact and error <= TOLERANCE[fmt] and not torch.isnan(got_rows).any(), error


def completing_fraction(ratio: int, steps: int) -> float:
    """The share of start positions at which a step of `steps` tokens completes a block."""
    return sum(any((p + t + 1) % ratio == 0 for t in range(steps)) for p in range(ratio)) / ratio


def floor_bytes(kind: str, batch: int, steps: int, pools: bool) -> int:
    """What a step moves at the least: kv and score rows in, ring rows out, the spill or entry row; pooling adds the
    window's ring rows (kv and scores of the columns it reads) and the norm weight."""
    ratio, width, fmt, rounded, block, _ = KINDS[kind]
    coff = 2 if ratio == 4 else 1
    row = PackedLayout(fmt, width, rounded, block, torch.bfloat16).row_bytes
    moved = batch * (4 * steps * coff * width * 4 + row)
    return moved + (batch * (coff * ratio * width * 4 * 2 + row) + width * 4 if pools else 0)


def time_paths(kind: str, batch: int, steps: int, start: int, context: int, compiled) -> dict:
    """Microseconds per step of the fused kernel, the aten reference and its compiled form at one start."""
    sets = [op_args(kind, batch, steps, start, context) for _ in range(2)]
    return dict(fused=graph_us(lambda *a: kernels.compress_step(*a), sets),
                aten=graph_us(lambda *a: compressor.reference(*a), sets),
                compile=graph_us(lambda *a: compiled(*a), sets))


def compiled_reference():
    """torch.compile of the reference, from a clean Dynamo cache: each configuration specialises it anew (ints and
    shapes), and a function past Dynamo's recompile limit would silently run eagerly."""
    torch._dynamo.reset()
    return torch.compile(compressor.reference, dynamic=False)


def measure(kind: str, batch: int, steps: int, context: int, gbps: float) -> dict:
    ratio, compiled = KINDS[kind][0], compiled_reference()
    base = context // 2
    pool_start = base + ratio - steps  # the last token completes a block
    checks = [check(kind, batch, steps, at, context) for at in (base, pool_start)]
    ok, error = all(c[0] for c in checks), max(c[1] for c in checks)
    fraction = completing_fraction(ratio, steps)
    pool = time_paths(kind, batch, steps, pool_start, context, compiled)
    append = time_paths(kind, batch, steps, base, context, compiled) if fraction < 1 else pool
    avg = {path: (1 - fraction) * append[path] + fraction * pool[path] for path in pool}
    floor = ((1 - fraction) * floor_bytes(kind, batch, steps, False)
             + fraction * floor_bytes(kind, batch, steps, True)) / gbps / 1e3
    return dict(kind=kind, batch=batch, steps=steps, ok=ok, rel_err=error, pooling_fraction=fraction,
                fused_append_us=append["fused"], fused_pool_us=pool["fused"], fused_us=avg["fused"],
                aten_us=avg["aten"], compile_us=avg["compile"], floor_us=floor, fused_of_floor=floor / avg["fused"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gbps = copy_gbps()
    print(f"copy bandwidth {gbps:.0f} GB/s")
    rows = []
    header = (f"{'kind':>10} {'B':>3} {'T':>2} {'err':>8} {'append':>8} {'pool':>8} {'fused':>8} {'aten':>8} "
              f"{'compile':>8} {'floor':>7} {'%':>4}   (us per step; fused/aten/compile: avg)")
    for kind in KINDS:
        for batch in args.batches:
            for steps in args.steps:
                r = measure(kind, batch, steps, args.context, gbps)
                rows.append(r)
                verdict = "PASS" if r["ok"] else "FAIL"
                print(f"{verdict} {kind} B={batch} T={steps}: rings and unwritten rows bit-equal, written rows "
                      f"rel err {r['rel_err']:.1e} (tolerance {TOLERANCE[KINDS[kind][2]]:g})")
    print(header)
    for r in rows:
        print(f"{r['kind']:>10} {r['batch']:>3} {r['steps']:>2} {r['rel_err']:8.1e} {r['fused_append_us']:8.1f} "
              f"{r['fused_pool_us']:8.1f} {r['fused_us']:8.1f} {r['aten_us']:8.1f} {r['compile_us']:8.1f} "
              f"{r['floor_us']:7.2f} {100 * r['fused_of_floor']:4.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=environment(), copy_gbps=gbps, context=args.context, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
