"""Sparse decode attention on a GPU: the packed-FP8 Triton kernel against its byte floor and the uncompressed aten path.

For each context (4K, 64K, 256K), batch (1, 32) and layer kind (C4: window 128 + top-512 selected entries; C128:
window 128 + every complete entry) at Flash sizes (64 heads x 512 dims, one KV head), it first checks the kernel
against the op's reference (codegen/sparse_attention.py) on the same inputs, then times, as the median of
CUDA-graph replays over rotating input sets (bench/gpu_common.py):
  kernel   codegen/kernels/attention.py on the packed rows (584 bytes a key)
  aten     the model's `attend` (model/attention.py) on an uncompressed bf16 cache (1,024 bytes a key): gather the
           selected rows, then einsum / softmax / einsum, as the reference step does
  inductor torch.compile of that aten function (Inductor, dynamic shapes: one compile for every case; a compile
           that fails is reported and its column left empty; --no-compile skips it)
and each one's byte floor: the rows it must read (plus q and the output) over the copy bandwidth of this run.
Usage: python bench/attention_bench.py [--contexts 4096 65536 262144] [--batches 1 32] [--no-compile]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv4c.codegen import sparse_attention
from dsv4c.codegen.kernels import attention
from dsv4c.codegen.kv_cache import PackedLayout, kv_pack
from dsv4c.model.attention import attend
from dsv4c.model.numerics import Numerics
from gpu_common import baseline_us, copy_gbps, environment, graph_us

HEADS, WIDTH, ROUNDED, WINDOW, SLOTS, TOPK = 64, 512, 448, 128, 130, 512
LAYOUT = PackedLayout("e4m3", WIDTH, ROUNDED, 64, torch.bfloat16)


def case(batch: int, context: int, ratio: int, sets: int) -> list[dict]:
    """Rotating input sets of one (batch, context, ratio): packed and bf16 copies of the same rows."""
    out = []
    entries = context // ratio + 1
    for _ in range(sets):
        values = (torch.randn(batch, entries, WIDTH, device="cuda") * 2).bfloat16()
        ring_values = (torch.randn(batch, SLOTS, WIDTH, device="cuda") * 2).bfloat16()
        start = torch.full((batch,), context - 1, device="cuda")
        ids = torch.zeros(batch, 1, 0, dtype=torch.int64, device="cuda")
        if ratio == 4:
            ids = torch.randint(0, (context // 4), (batch, 1, TOPK), device="cuda")
        pack = lambda x: kv_pack(x, "e4m3", ROUNDED, 64)  # noqa: E731
        new_values = (torch.randn(batch, 1, WIDTH, device="cuda") * 2).bfloat16()
        out.append(dict(q=torch.randn(batch, 1, HEADS, WIDTH, device="cuda").bfloat16(), new=pack(new_values),
                        ring=pack(ring_values), cache=pack(values), ids=ids, start=start,
                        sink=torch.randn(HEADS, device="cuda"), bf16_cache=values, bf16_ring=ring_values,
                        bf16_new=new_values))
    return out


def kernel_args(s: dict, ratio: int) -> tuple:
    return (s["q"], s["new"], s["ring"], s["cache"], s["ids"], s["start"], s["sink"], WIDTH ** -0.5, WINDOW, ratio,
            ROUNDED, 64)


def aten_attention(q, window_keys, cache, ids, start, sink, ratio):
    """The reference step's attention on bf16 rows: window keys `[B, 1, W, D]`, then selected or visible entries."""
    positions = start.unsqueeze(1)
    key_pos = positions.unsqueeze(-1) - WINDOW + 1 + torch.arange(WINDOW, device=q.device)
    sets = [(window_keys, key_pos >= 0, "per_query")]
    if ratio == 4:
        chosen = cache.unsqueeze(1).gather(2, ids.unsqueeze(-1).expand(-1, -1, -1, WIDTH))
        sets.append((chosen, ids >= 0, "per_query"))
    else:
        visible = torch.arange(cache.shape[1], device=q.device) < ((positions + 1) // ratio).unsqueeze(-1)
        sets.append((cache, visible, "shared"))
    return attend(q, sets, sink, WIDTH ** -0.5, Numerics())


def row_count(context: int, ratio: int) -> int:
    return WINDOW + (TOPK if ratio == 4 else context // ratio)


def measure(batch: int, context: int, ratio: int, gbps: float, compiled) -> dict:
    sets = case(batch, context, ratio, 2)
    s = sets[0]
    got = attention.sparse_decode_attention(*kernel_args(s, ratio))
    want = sparse_attention.reference(*kernel_args(s, ratio))
    error = ((got.double() - want.double()).norm() / want.double().norm()).item()
    window = s["bf16_cache"].new_zeros(batch, 1, WINDOW, WIDTH)  # the window's bf16 rows (values do not matter)
    kernel_us = graph_us(lambda a: attention.sparse_decode_attention(*a), [(kernel_args(x, ratio),) for x in sets])
    aten_args = [(x["q"], window, x["bf16_cache"], x["ids"], x["start"], x["sink"]) for x in sets]
    aten_us = graph_us(lambda *a: aten_attention(*a, ratio), aten_args)
    inductor_us = (baseline_us(f"inductor C{ratio}", lambda *a: compiled(*a, ratio), aten_args)
                   if compiled is not None else float("nan"))
    io = 2 * batch * HEADS * WIDTH * 2  # q in, output out (bf16)
    rows = batch * row_count(context, ratio)
    floor_kernel = (rows * LAYOUT.row_bytes + io) / gbps / 1e3
    floor_aten = (rows * WIDTH * 2 + io) / gbps / 1e3
    return dict(batch=batch, context=context, kind=f"C{ratio}", rel_err=error, kernel_us=kernel_us, aten_us=aten_us,
                inductor_us=inductor_us, floor_kernel_us=floor_kernel, floor_aten_us=floor_aten,
                kernel_of_floor=floor_kernel / kernel_us, aten_of_floor=floor_aten / aten_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 65536, 262144])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--no-compile", action="store_true", help="skip the Inductor baseline")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    compiled = None if args.no_compile else torch.compile(aten_attention, dynamic=True)
    gbps = copy_gbps()
    rows = []
    print(f"copy bandwidth {gbps:.0f} GB/s")
    print(f"{'kind':>5} {'B':>3} {'context':>8} {'err':>8} {'kernel us':>10} {'floor':>8} {'%':>5} "
          f"{'aten us':>10} {'floor':>8} {'%':>5} {'inductor':>9}")
    for ratio in (4, 128):
        for batch in args.batches:
            for context in args.contexts:
                try:
                    r = measure(batch, context, ratio, gbps, compiled)
                except torch.OutOfMemoryError:
                    print(f"C{ratio:<4} {batch:>3} {context:>8} out of memory")
                    torch.cuda.empty_cache()
                    continue
                rows.append(r)
                print(f"{r['kind']:>5} {batch:>3} {context:>8} {r['rel_err']:8.1e} {r['kernel_us']:10.1f} "
                      f"{r['floor_kernel_us']:8.1f} {100 * r['kernel_of_floor']:5.0f} {r['aten_us']:10.1f} "
                      f"{r['floor_aten_us']:8.1f} {100 * r['aten_of_floor']:5.0f} {r['inductor_us']:9.1f}")
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=environment(), copy_gbps=gbps, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
