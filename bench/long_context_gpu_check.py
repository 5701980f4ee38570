"""GPU check of the decode kernels at 2^20 positions (Flash row layouts), run on the GPU machine:
`python3 bench/long_context_gpu_check.py [--batch 16]`.

A C4 layer's pool at max_seq_len 2^20 holds, per sequence, 262,145 main-KV rows of 584 B (153 MB) and as many
indexer rows of 68 B (17.8 MB): from the 15th sequence on, a row lies more than 2^31 bytes past the pool's start,
where index arithmetic done in int32 (a program id times a sequence stride) wraps. Each check fills such a pool with
random packed rows and compares, for the first and the last sequence, the op on the whole batch (the Triton kernels
on CUDA tensors) with the op's reference on that one sequence (offsets below 2^31):
1. sparse_decode_attention, C4: 512 selected entries (the newest ones among them) and the 128-position window, at
   position 2^20 - 1; relative norm error <= 2e-2 (the kernels agree with the reference within the bf16 rounding
   of the probabilities; a wrapped offset reads other rows: errors of order 1).
2. sparse_decode_attention, C128: all 8,192 visible entries at position 2^20 - 1 (strides below 2^31 here).
3. lightning_indexer over 262,145 FP4 keys at position 2^20 - 1: the kernel's top 512 carry, by the reference's
   own scores, the reference's top-512 scores (sorted; within 1e-4 of the largest score: fp32 summation order).
Each check runs in a process of its own (a read out of bounds can end the CUDA context) and prints CHECK OK or
CHECK FAILED; the script exits 1 if one failed. `--device cpu --rows N` runs the same script logic on the CPU
(where the op is its reference) with N rows a cache, as a smoke test of the script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops)
from dsv4c.codegen import lightning_indexer, sparse_attention
from dsv4c.codegen.kv_cache import pack_reference

POSITIONS = 2 ** 20
HEADS, D, ROUNDED, BLOCK, WINDOW = 64, 512, 448, 64, 128
INDEX_HEADS, INDEX_D, INDEX_BLOCK, TOPK = 64, 128, 32, 512
ATTENTION_TOLERANCE = 2e-2
SCORE_TOLERANCE = 1e-4


def packed(batch: int, rows: int, width: int, fmt: str, rounded: int, block: int, device: str,
           gen: torch.Generator) -> torch.Tensor:
    """[batch, rows, row_bytes] of random rows, packed one sequence at a time (bounded temporaries)."""
    out = []
    for _ in range(batch):
        values = torch.randn(rows, width, generator=gen, device=device).to(torch.bfloat16)
        out.append(pack_reference(values, fmt, rounded, block))
    return torch.stack(out)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return float("inf")  # NaN never passes
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def attention(ratio: int, batch: int, rows: int, device: str) -> tuple[bool, str]:
    gen = torch.Generator(device).manual_seed(ratio)
    start = torch.full((batch,), POSITIONS - 1, device=device)
    entries = rows // ratio + 1
    cache = packed(batch, entries, D, "e4m3", ROUNDED, BLOCK, device, gen)
    new = packed(batch, 1, D, "e4m3", ROUNDED, BLOCK, device, gen)
    ring = packed(batch, WINDOW + 2, D, "e4m3", ROUNDED, BLOCK, device, gen)
    q = (torch.randn(batch, 1, HEADS, D, generator=gen, device=device) * 0.1).to(torch.bfloat16)
    sink = torch.randn(HEADS, generator=gen, device=device)
    if ratio == 4:
        visible = rows // ratio  # at position rows - 1 or later: every entry but the spill row
        ids = torch.stack([torch.randperm(visible, generator=gen, device=device)[:TOPK] for _ in range(batch)])
        ids[:, -8:] = torch.arange(visible - 8, visible, device=device)  # the newest entries
        ids = ids.unsqueeze(1)
    else:
        ids = torch.empty(batch, 1, 0, dtype=torch.int64, device=device)
    args = (sink, D ** -0.5, WINDOW, ratio, ROUNDED, BLOCK)
    whole = torch.ops.dsv4c.sparse_decode_attention(q, new, ring, cache, ids, start, *args)
    errors = []
    for b in (0, batch - 1):
        one = (t[b:b + 1] for t in (q, new, ring, cache, ids, start))
        errors.append(rel_err(whole[b:b + 1], sparse_attention.reference(*one, *args)))
    return max(errors) <= ATTENTION_TOLERANCE, f"relative error first/last sequence {errors[0]:.2e} / {errors[1]:.2e}"


def indexer(batch: int, rows: int, device: str) -> tuple[bool, str]:
    gen = torch.Generator(device).manual_seed(4)
    start = torch.full((batch,), POSITIONS - 1, device=device)
    cache = packed(batch, rows // 4 + 1, INDEX_D, "e2m1", INDEX_D, INDEX_BLOCK, device, gen)
    q = torch.randn(batch, 1, INDEX_HEADS, INDEX_D, generator=gen, device=device).to(torch.bfloat16)
    head_w = torch.rand(batch, 1, INDEX_HEADS, generator=gen, device=device) * INDEX_D ** -0.5 * INDEX_HEADS ** -0.5
    ids, valid = torch.ops.dsv4c.lightning_indexer(q, head_w, cache, start, 4, TOPK, INDEX_BLOCK)
    gaps = []
    for b in (0, batch - 1):
        scores = lightning_indexer.scores(q[b:b + 1], head_w[b:b + 1], cache[b:b + 1], start[b:b + 1], 4,
                                          INDEX_BLOCK)[0, 0]
        want = scores.topk(TOPK).values
        got = scores[ids[b, 0]].sort(descending=True).values
        ok = bool(valid[b].all()) and bool(torch.isfinite(got).all())
        gaps.append(((got - want).abs().max() / want.abs().max()).item() if ok else float("inf"))
    return max(gaps) <= SCORE_TOLERANCE, f"top-{TOPK} score gap first/last sequence {gaps[0]:.2e} / {gaps[1]:.2e}"


CHECKS = {
    "sparse_decode_attention C4": lambda a: attention(4, a.batch, a.rows, a.device),
    "sparse_decode_attention C128": lambda a: attention(128, a.batch, a.rows, a.device),
    "lightning_indexer": lambda a: indexer(a.batch, a.rows, a.device),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences in the pool (16: past the int32 range)")
    parser.add_argument("--rows", type=int, default=POSITIONS, help="positions a cache holds (the smoke test: fewer)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--one", choices=sorted(CHECKS), help=argparse.SUPPRESS)  # a check in this process
    args = parser.parse_args()
    if args.one:
        ok, detail = CHECKS[args.one](args)
        print(f"CHECK {'OK' if ok else 'FAILED'}: {args.one} at {args.rows:,} positions, batch {args.batch}: {detail}",
              flush=True)
        return 0 if ok else 1
    failed = 0
    for name in CHECKS:
        command = [sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--rows", str(args.rows),
                   "--device", args.device]
        result = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("CHECK")]
        failure = f"CHECK FAILED: {name}: exit {result.returncode}\n{result.stderr[-2000:]}"
        print("\n".join(lines) or failure, flush=True)
        failed += result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
