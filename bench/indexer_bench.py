"""The Lightning Indexer on a GPU: the packed-FP4 Triton kernels against their byte floor and the aten path.

For each context (4K, 64K, 256K) and batch (1, 32) at Flash sizes (64 heads x 128 dims, top-512 of context / 4
entries, 68-byte packed keys), it first checks the kernels against the op's reference (codegen/lightning_indexer.py's
formula, in fp64 on the same CUDA inputs) and prints a PASS or FAIL line per case and key decode: scores within 1e-5
(relative norm error, -inf at the same places) and the same selected set wherever the k-th and k+1-th reference
scores are further apart than that. Then it times, as the median of CUDA-graph replays over rotating input sets
(bench/gpu_common.py):
  kernel    codegen/kernels/lightning_indexer.py, scores + top-k with its default launch (keys decoded in
            registers, bf16 dots), and its two launches apart (scores, topk); the top-k also forced to one program
            a row (`1-prog`) and spread over several programs a row (`spans`, the launch few long rows get), after
            PASS / FAIL lines that both select exactly the default launch's ids (on the scores, and on the scores
            rounded to eighths: many ties); `mxfp`: the same with the keys decoded by `tl.dot_scaled` (a decode
            that fails to compile prints FAIL and times nothing)
  aten      unpack the packed keys (e2m1 codes by table, e8m0 scales) + einsum + relu + head sum + mask + topk, as
            the op's reference computes them (eager; the table lives on the device so the graph can hold it)
  compiled  torch.compile of that aten function (dynamic shapes: one compile for every case)
and the byte floor: the packed keys every query reads (plus q, head_w in and ids, valid out) over the copy
bandwidth of this run.
Usage: python bench/indexer_bench.py [--contexts 4096 65536 262144] [--batches 1 32] [--steps 1] [--no-compile]
                                     [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from dsv4c.codegen.kernels import lightning_indexer as kernels
from dsv4c.codegen.kernels.lightning_indexer_launch import (IndexerLaunch, indexer_launch, with_one_program_topk,
                                                            with_parallel_topk)
from dsv4c.codegen.kv_cache import PackedLayout, kv_pack, unpack_reference
from dsv4c.codegen.targets import target_for_device
from dsv4c.model import quant
from dsv4c.model.attention import visible_entries
from gpu_common import baseline_us, copy_gbps, environment, graph_us

HEADS, DIM, TOPK, RATIO, BLOCK = 64, 128, 512, 4, 32
LAYOUT = PackedLayout("e2m1", DIM, DIM, BLOCK, torch.bfloat16)
SCORE_TOL = 1e-5


def case(batch: int, steps: int, context: int, sets: int) -> list[tuple]:
    """Rotating op argument sets of one (batch, steps, context): queries and keys on the FP4 grid, each sequence's
    last query at context - 1."""
    out = []
    entries = context // RATIO + 1
    for _ in range(sets):
        q = quant.fake_quant_fp4(quant.hadamard(torch.randn(batch, steps, HEADS, DIM, device="cuda")), BLOCK)
        keys = quant.fake_quant_fp4(quant.hadamard(torch.randn(batch, entries, DIM, device="cuda")), BLOCK)
        head_w = torch.randn(batch, steps, HEADS, device="cuda") * (DIM ** -0.5 * HEADS ** -0.5)
        start = torch.full((batch,), context - steps, device="cuda")
        out.append((q.bfloat16(), head_w, kv_pack(keys.bfloat16(), "e2m1", DIM, BLOCK), start, RATIO, TOPK, BLOCK))
    return out


def aten_indexer(q, head_w, cache, start, table, k: int):
    """The aten path: unpack (e2m1 codes through `table`, e8m0 scales as powers of two), einsum, relu, head sum,
    mask, topk; the same values as the op's reference."""
    codes = cache[..., :LAYOUT.code_bytes]
    nibbles = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2).long()
    scale = torch.exp2(cache[..., LAYOUT.scale_offset:LAYOUT.scale_offset + LAYOUT.scale_bytes].float() - 127)
    keys = (table[nibbles].unflatten(-1, (-1, BLOCK)) * scale.unsqueeze(-1)).flatten(-2).bfloat16()
    logits = torch.einsum("bthd,bsd->bths", q.float(), keys.float()).relu()
    scores = (logits * head_w.unsqueeze(-1)).sum(dim=2)
    positions = start.unsqueeze(1) + torch.arange(q.shape[1], device=q.device)
    scores = scores.masked_fill(~visible_entries(positions, cache.shape[1], RATIO), float("-inf"))
    top = scores.topk(k, dim=-1)
    return top.indices, top.values > float("-inf")


def same_selection(ids: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor, k: int) -> int:
    """How many query rows select a different set than `scores`' top-k where its k-th and k+1-th scores are
    further apart than the rounding (or mark validity wrongly)."""
    bad = 0
    for row_ids, row_valid, row in zip(ids.flatten(0, 1), valid.flatten(0, 1), scores.flatten(0, 1)):
        top = row.topk(min(k + 1, row.numel()))
        finite = torch.isfinite(row)
        scale = row[finite].abs().max() if finite.any() else 0.0
        clear = k == row.numel() or top.values[k - 1] - top.values[k] > SCORE_TOL * scale
        want = set(top.indices[:k][torch.isfinite(top.values[:k])].tolist())
        valid_ok = torch.equal(row_valid, torch.isfinite(row[row_ids])) and int(row_valid.sum()) == len(want)
        bad += not valid_ok or (clear and set(row_ids[row_valid].tolist()) != want)
    return bad


def fp64_scores(q, head_w, cache, start, ratio, topk, block) -> torch.Tensor:
    """The op's scores (codegen/lightning_indexer.py `scores`) evaluated in fp64 on the unpacked keys."""
    keys = unpack_reference(cache, "e2m1", DIM, DIM, block, q.dtype).double()
    logits = torch.einsum("bthd,bsd->bths", q.double(), keys).relu()
    total = (logits * head_w.double().unsqueeze(-1)).sum(dim=2)
    positions = start.unsqueeze(1) + torch.arange(q.shape[1], device=q.device)
    return total.masked_fill(~visible_entries(positions, cache.shape[1], ratio), float("-inf"))


def check(args: tuple, launch: IndexerLaunch, label: str) -> bool:
    """PASS / FAIL of the kernels on one argument set against an fp64 evaluation of the op's reference."""
    q, head_w, cache, start, ratio, topk, block = args
    want = fp64_scores(*args)
    try:
        got = kernels.indexer_scores(q, head_w, cache, start, ratio, block, launch).double()
        ids, valid = kernels.lightning_indexer(*args, launch=launch)
    except Exception as error:  # a decode this Triton cannot compile: reported, not fatal to the other rows
        print(f"FAIL indexer {label}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return False
    finite = torch.isfinite(want)
    same_inf = torch.equal(torch.isinf(got), torch.isinf(want)) and not torch.isnan(got).any()
    error = ((got[finite] - want[finite]).norm() / want[finite].norm()).item() if finite.any() else 0.0
    bad = same_selection(ids, valid, want, min(topk, cache.shape[1]))
    ok = same_inf and error <= SCORE_TOL and bad == 0
    print(f"{'PASS' if ok else 'FAIL'} indexer {label}: scores rel err {error:.1e}, infinities "
          f"{'equal' if same_inf else 'DIFFER'}, {bad} rows select another set")
    return ok


def same_topk(scores: torch.Tensor, k: int, launches: dict[str, IndexerLaunch], label: str) -> bool:
    """PASS / FAIL: every top-k launch selects exactly the ids and validity of the first one."""
    results = {name: kernels.select_topk(scores, k, launch) for name, launch in launches.items()}
    first = next(iter(results.values()))
    ok = all(torch.equal(ids, first[0]) and torch.equal(valid, first[1]) for ids, valid in results.values())
    print(f"{'PASS' if ok else 'FAIL'} top-k {label}: {', '.join(launches)} select the same ids")
    return ok


def measure(batch: int, steps: int, context: int, gbps: float, compiled) -> dict:
    sets = case(batch, steps, context, 2)
    entries, k = context // RATIO + 1, min(TOPK, context // RATIO + 1)
    gpu = target_for_device("cuda")
    launch = indexer_launch(gpu, batch, steps, HEADS, entries, BLOCK)
    topk_launches = {"default": launch, "1-prog": with_one_program_topk(launch, entries),
                     "spans": with_parallel_topk(launch, gpu, batch * steps, entries)}
    mxfp = dataclasses.replace(launch, decode="mxfp")
    label = f"B={batch} T={steps} context={context}"
    passed = check(sets[0], launch, f"{label} {launch.decode}")
    mxfp_passed = check(sets[0], mxfp, f"{label} mxfp")
    table = torch.tensor(quant.E2M1_MAGNITUDES + tuple(-v for v in quant.E2M1_MAGNITUDES), device="cuda")
    aten_args = [(q, w, c, s, table, k) for q, w, c, s, *_ in sets]
    scores = [kernels.indexer_scores(*a[:4], RATIO, BLOCK, launch) for a in sets]
    passed = same_topk(scores[0], k, topk_launches, label) and passed
    passed = same_topk(torch.round(scores[0] * 8), k, topk_launches, f"{label} scores rounded (ties)") and passed
    topk_us = {name: graph_us(lambda s, chosen=chosen: kernels.select_topk(s, k, chosen), [(s,) for s in scores])
               for name, chosen in topk_launches.items()}
    row = dict(batch=batch, steps=steps, context=context, entries=entries, passed=bool(passed),
               mxfp_passed=bool(mxfp_passed),
               topk_spans=launch.topk_spans, one_program_topk_us=topk_us["1-prog"], spans_topk_us=topk_us["spans"],
               kernel_us=graph_us(lambda *a: kernels.lightning_indexer(*a, launch=launch), sets),
               scores_us=graph_us(lambda *a: kernels.indexer_scores(*a[:4], RATIO, BLOCK, launch), sets),
               topk_us=topk_us["default"],
               mxfp_us=graph_us(lambda *a: kernels.lightning_indexer(*a, launch=mxfp), sets) if mxfp_passed
               else float("nan"),
               aten_us=graph_us(aten_indexer, aten_args),
               compiled_us=baseline_us("inductor", compiled, aten_args) if compiled is not None
               else float("nan"))
    io = batch * steps * (HEADS * DIM * 2 + HEADS * 4 + k * 9)  # q, head_w in; ids, valid out
    row["floor_us"] = (batch * entries * LAYOUT.row_bytes + io) / gbps / 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 65536, 262144])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=1, help="query tokens a sequence (1 decode, 2-4 MTP)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    compiled = None if args.no_compile else torch.compile(aten_indexer, dynamic=True)
    gbps = copy_gbps()
    rows = []
    print(f"copy bandwidth {gbps:.0f} GB/s")
    print(f"{'B':>3} {'context':>8} {'kernel us':>10} {'scores':>8} {'topk':>8} {'1-prog':>8} {'spans':>8} "
          f"{'mxfp':>8} {'floor':>8} {'%':>5} {'aten us':>10} {'compiled':>9}")
    for batch in args.batches:
        for context in args.contexts:
            try:
                r = measure(batch, args.steps, context, gbps, compiled)
            except torch.OutOfMemoryError:
                print(f"{batch:>3} {context:>8} out of memory")
                torch.cuda.empty_cache()
                continue
            rows.append(r)
            print(f"{batch:>3} {context:>8} {r['kernel_us']:10.1f} {r['scores_us']:8.1f} {r['topk_us']:8.1f} "
                  f"{r['one_program_topk_us']:8.1f} {r['spans_topk_us']:8.1f} "
                  f"{r['mxfp_us']:8.1f} {r['floor_us']:8.1f} {100 * r['floor_us'] / r['kernel_us']:5.0f} "
                  f"{r['aten_us']:10.1f} {r['compiled_us']:9.1f}")
            torch.cuda.empty_cache()
    print(f"{'PASS' if rows and all(r['passed'] for r in rows) else 'FAIL'} indexer bench: "
          f"{sum(r['passed'] for r in rows)} of {len(rows)} cases match the reference")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=environment(), copy_gbps=gbps, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
