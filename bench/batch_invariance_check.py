"""GPU check of batch invariance (issue 16): a row's result must not depend on the rows beside it.

    python bench/batch_invariance_check.py [--artifact ART] [--max-new-tokens 24] [--batches 1 8 32] [--json out.json]

(a) Kernels, on random inputs: every row span of calls over rows 0..M-1 (M in 1, 2, 3, 4, 8, 64, 256) and at
    other offsets equals bit for bit the same rows of the largest call.
      fp8_gemm   codegen/kernels/fp8_gemm.py at Flash shapes, act_quant and plain, fp32 and bf16 output, the
                 default launch of each M (16- to 64-row tiles; split-K programs, then folded splits)
      attention  codegen/kernels/attention.py at Flash sizes (64 heads x 512 dims, window 128; C4 top-512, C128):
                 sequences alone and in batches of 2 to 64, and 4-token steps against one-token steps
      aten       inside runtime/batch_invariant.py's block: fp32 and bf16 `x @ w.T`, bmm, addmm, mean and sum over
                 the last and a middle dim, softmax, log_softmax; the same calls without the block (cuBLAS,
                 PyTorch's reductions) are printed as INFO
      mhc        the mHC ops hc_pre, hc_post_pre, hc_head (every output) as the runtime's executors call them
                 (runtime/loader.py `mhc_implementations`: the batch-invariant launch, codegen/kernels/mhc_launch.py);
                 the registered ops (the tuned launches, token-count dependent above 8 tokens) printed as INFO
(b) End to end, through the engine (runtime/engine.py, CUDA graphs on): greedy decoding of --artifact (compiled
    with --target h100; without one, the embedded demo model's reference model in bf16) with --mtp 1..max
    must give the tokens of --mtp 0, and prompts decoded together the tokens each gets alone.
(c) Cost: with --artifact, the decode and verification steps at each --batches size, with and without the
    block: CUDA-graph replays (device time) and eager calls (host and device); the attention and FP8 GEMM
    kernels with their launches against the token-dependent launches they replaced.
Prints PASS / FAIL / INFO / COST lines; `--json` writes them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time
from typing import Callable

import torch

from dsv4c.codegen.kernels import attention, fp8_gemm
from dsv4c.codegen.kernels.fp8_gemm_launch import Fp8GemmLaunch, fp8_gemm_launch, split_blocks
from dsv4c.codegen.kv_cache import kv_pack
from dsv4c.codegen.targets import target_for_device
from dsv4c.model import layers, quant
from dsv4c.model.checkpoint import Checkpoint
from dsv4c.model.demo import DEMO_PROMPTS, demo_checkpoint
from dsv4c.model.numerics import Numerics
from dsv4c.model.step import dequantize_weights
from dsv4c.runtime.batch_invariant import batch_invariant
from dsv4c.runtime.eager_runner import EagerRunner, state_specs
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.loader import mhc_implementations
from dsv4c.runtime.loader import load
from gpu_common import environment, graph_us

ROWS = (1, 2, 3, 4, 8, 64, 256)
SPANS = [(0, m) for m in ROWS] + [(5, 6), (17, 20), (100, 164)]
FP8_SHAPES = {"wq_a": (1024, 4096), "wkv": (512, 4096), "wo_b": (4096, 8192)}  # Flash (N, K)
HEADS, WIDTH, ROUNDED, WINDOW, SLOTS, TOPK, RAW_BLOCK = 64, 512, 448, 128, 130, 512, 64
RESULTS: list[dict] = []


def report(kind: str, name: str, ok: bool | None = None, detail: str = "", **numbers) -> None:
    """One PASS / FAIL line (ok given), or INFO / COST; kept for --json."""
    label = kind if ok is None else ("PASS" if ok else "FAIL")
    print(f"{label:<5} {name}  {detail}", flush=True)
    RESULTS.append(dict(label=label, name=name, detail=detail, **numbers))


def in_block(fn: Callable) -> Callable:
    """`fn` run inside runtime/batch_invariant.py's block."""
    def run(*args):
        with batch_invariant():
            return fn(*args)
    return run


def rows_invariant(name: str, run: Callable[[int, int], torch.Tensor], spans=SPANS, kind: str | None = None) -> None:
    """`run(lo, hi)`: the result for rows lo .. hi - 1 alone; each span must equal those rows of the largest."""
    top = max(hi for _, hi in spans)
    whole = run(0, top)
    bad = [f"{lo}..{hi - 1}" for lo, hi in spans if not torch.equal(run(lo, hi), whole[lo:hi])]
    detail = f"rows differing from the {top}-row call: {', '.join(bad)}" if bad else f"{len(spans)} spans equal"
    if torch.isnan(whole.float()).any():
        bad, detail = ["nan"], "NaN in the output"
    report(kind or "", name, None if kind else not bad, detail)


# ---- (a) kernels ---------------------------------------------------------------------------------------------
def check_fp8_gemm() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    t = target_for_device("cuda")
    for shape, (n, k) in FP8_SHAPES.items():
        x = torch.randn(max(ROWS), k, generator=gen, device="cuda")
        x[:, torch.randint(0, k, (3,), generator=gen, device="cuda")] *= 30
        weight, scale = quant.quantize_fp8_weight(torch.randn(n, k, generator=gen, device="cuda") * 0.05)
        launches = {fp8_gemm_launch(t, m, n, k) for m in ROWS}
        tiles = sorted({la.block_m for la in launches}), sorted({la.fold_splits for la in launches})
        for act_quant in (True, False):
            for out in (torch.float32, torch.bfloat16):
                x_in = x.bfloat16()
                rows_invariant(f"fp8_gemm {shape} act_quant={act_quant} out={str(out)[6:]} (block_m {tiles[0]}, "
                               f"fold {tiles[1]})",
                               lambda lo, hi: fp8_gemm.fp8_linear(x_in[lo:hi], weight, scale, act_quant, out))


@dataclasses.dataclass
class Contexts:
    """Packed key rows of positions p0 - SLOTS .. p0 + 3 for `seqs` sequences, their queries and top-k ids at
    p0 .. p0 + 3, and a compressed cache of `entries` rows."""

    rows: torch.Tensor
    queries: torch.Tensor
    ids: torch.Tensor
    cache: torch.Tensor
    p0: int
    ratio: int

    def step(self, seqs: int, first: int, steps: int) -> tuple:
        """The op's arguments for sequences 0..seqs-1 at position p0 + first, `steps` tokens."""
        start = self.p0 + first
        earlier = torch.arange(start - SLOTS, start, device="cuda")
        ring = torch.zeros(seqs, SLOTS, self.rows.shape[-1], dtype=torch.uint8, device="cuda")
        ring[:, earlier % SLOTS] = self.rows[:seqs, earlier - (self.p0 - SLOTS)]
        new = self.rows[:seqs, SLOTS + first:SLOTS + first + steps]
        ids = self.ids[:seqs, first:first + steps]
        return (self.queries[:seqs, first:first + steps].contiguous(), new.contiguous(), ring,
                self.cache[:seqs], ids.contiguous(), torch.full((seqs,), start, device="cuda"),
                torch.linspace(-1, 1, HEADS, device="cuda"), WIDTH ** -0.5, WINDOW, self.ratio, ROUNDED, RAW_BLOCK)


def contexts(ratio: int, seqs: int = 64) -> Contexts:
    gen = torch.Generator(device="cuda").manual_seed(ratio)
    pack = lambda *shape: kv_pack((torch.randn(*shape, WIDTH, generator=gen, device="cuda") * 2).bfloat16(),  # noqa
                                  "e4m3", ROUNDED, RAW_BLOCK)
    p0, entries = (70000, 600) if ratio == 128 else (8192, 2048)  # C128: 547 visible entries at p0
    if ratio == 4:
        ids = torch.stack([torch.randperm(entries, generator=gen, device="cuda")[:TOPK] for _ in range(seqs * 4)])
        ids = ids.view(seqs, 4, TOPK)
    else:
        ids = torch.zeros(seqs, 4, 0, dtype=torch.int64, device="cuda")
    queries = torch.randn(seqs, 4, HEADS, WIDTH, generator=gen, device="cuda").bfloat16()
    return Contexts(pack(seqs, SLOTS + 4), queries, ids, pack(seqs, entries), p0, ratio)


def check_attention() -> None:
    for ratio in (4, 128):
        c = contexts(ratio)
        rows_invariant(f"attention C{ratio}: sequences alone and in batches of 2..64 (one token)",
                       lambda lo, hi: attention.sparse_decode_attention(*c.step(hi, 0, 1))[lo:hi],
                       spans=[(0, b) for b in (1, 2, 3, 4, 8, 64)])
        for seqs in (8, 64):
            whole = attention.sparse_decode_attention(*c.step(seqs, 0, 4))
            bad = [j for j in range(4)
                   if not torch.equal(attention.sparse_decode_attention(*c.step(8, j, 1))[:, 0], whole[:8, j])]
            report("", f"attention C{ratio}: a 4-token step of {seqs} sequences against one-token steps of 8",
                   not bad, f"tokens differing: {bad}" if bad else "4 tokens equal")


def _aten_cases(gen: torch.Generator) -> dict[str, tuple[Callable, torch.Tensor]]:
    """name -> (op over leading rows, input whose first dim is the rows)."""
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)
    rows = max(ROWS)
    w32, w16, bias = randn(1024, 4096), randn(1024, 4096, dtype=torch.bfloat16), randn(1024, dtype=torch.bfloat16)
    router, grouped = randn(256, 4096), randn(8, 128, 96)
    return {
        "fp32 x @ w.T (head-like, N 1024)": (lambda x: x @ w32.T, randn(rows, 4096)),
        "fp32 x @ w.T (router, N 256)": (lambda x: x @ router.T, randn(rows, 4096)),
        "bf16 x @ w.T": (lambda x: x @ w16.T, randn(rows, 4096, dtype=torch.bfloat16)),
        "bf16 addmm": (lambda x: torch.addmm(bias, x, w16.T), randn(rows, 4096, dtype=torch.bfloat16)),
        "fp32 bmm over rows": (lambda x: torch.bmm(x.transpose(0, 1), grouped).transpose(0, 1), randn(rows, 8, 128)),
        "fp32 mean(-1) (RMS norm)": (lambda x: x.square().mean(-1, keepdim=True), randn(rows, 4096)),
        "fp32 sum(-1) (routing weights)": (lambda x: x.sum(-1, keepdim=True), randn(rows, 6)),
        "fp32 sum over a middle dim (pooling)": (lambda x: x.sum(2), randn(rows, 1, 16, 512)),
        "fp32 softmax over a middle dim": (lambda x: x.softmax(2), randn(rows, 1, 16, 512)),
        "fp32 log_softmax(-1)": (lambda x: x.log_softmax(-1), randn(rows, 32000)),
    }


def check_aten() -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    for name, (op, x) in _aten_cases(gen).items():
        rows_invariant(f"aten {name}, in the block", lambda lo, hi, op=in_block(op), x=x: op(x[lo:hi]))
        rows_invariant(f"aten {name}, without the block", lambda lo, hi, op=op, x=x: op(x[lo:hi]), kind="INFO")


def check_mhc() -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    hc, hidden, rows = 4, 4096, max(ROWS)
    k = hc * hidden
    streams = torch.randn(rows, hc, hidden, generator=gen, device="cuda").bfloat16()
    block_out = torch.randn(rows, hidden, generator=gen, device="cuda").bfloat16()
    post = 2 * torch.sigmoid(torch.randn(rows, hc, generator=gen, device="cuda"))
    comb = layers.sinkhorn(torch.randn(rows, hc, hc, generator=gen, device="cuda"), 20, 1e-6)
    fn = torch.randn((2 + hc) * hc, k, generator=gen, device="cuda") * 2 / k ** 0.5
    base = torch.randn((2 + hc) * hc, generator=gen, device="cuda") * 0.5
    scale = torch.rand(3, generator=gen, device="cuda") + 0.5
    norm = (torch.rand(hidden, generator=gen, device="cuda") + 0.5).bfloat16()
    mix = (fn, base, scale, norm, 1e-6, 1e-6, 20)
    head = (fn[:hc], base[:hc], scale[:1], norm, 1e-6, 1e-6)
    importlib.import_module("dsv4c.codegen.ops")  # defines torch.ops.dsv4c
    runtime = {name.split("::")[1]: impl for name, impl in mhc_implementations(None).items()}
    registered = {name: getattr(torch.ops.dsv4c, name) for name in runtime}
    for label, ops, kind in (("as the runtime runs them", runtime, None),
                             ("registered (tuned launches)", registered, "INFO")):
        calls = {"hc_pre": lambda lo, hi, ops=ops: ops["hc_pre"](streams[lo:hi], *mix),
                 "hc_post_pre": lambda lo, hi, ops=ops: ops["hc_post_pre"](block_out[lo:hi], streams[lo:hi],
                                                                           post[lo:hi], comb[lo:hi], *mix),
                 "hc_head": lambda lo, hi, ops=ops: ops["hc_head"](streams[lo:hi], *head)}
        for name, call in calls.items():
            rows = lambda lo, hi, call=call: token_rows(call(lo, hi))  # noqa: E731
            rows_invariant(f"mhc {name} (every output), {label}", in_block(rows), kind=kind)


def token_rows(out) -> torch.Tensor:
    """An op's outputs as one fp32 row a token (bf16 widened exactly), every output side by side."""
    return torch.cat([o.float().flatten(1) for o in (out if isinstance(out, tuple) else (out,))], dim=1)


# ---- (b) end to end ------------------------------------------------------------------------------------------
def eager_engine() -> Engine:
    """The embedded demo model (trained: its drafts are mostly accepted) run by the reference model in bf16."""
    ckpt, num = Checkpoint.open(demo_checkpoint()), Numerics.faithful()
    weights = dequantize_weights({name: ckpt.get(name) for name in ckpt.headers}, num)
    return Engine(EagerRunner({k: v.to("cuda") for k, v in weights.items()}, ckpt.config, num),
                  state_specs(ckpt.config, 256, num), prefill_chunk=4, max_seq_len=256, device="cuda",
                  vocab_size=ckpt.config.vocab_size, max_batch=4)


def prompts(vocab_size: int) -> list[list[int]]:
    """The demo prompts' bytes where the vocabulary starts with the 256 bytes (the demo model), else random ids."""
    if vocab_size >= 256:
        return [list(text.encode()) for text in DEMO_PROMPTS]
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in (5, 9, 3, 12)]


def check_end_to_end(engine: Engine, source: str, new_tokens: int) -> None:
    texts = prompts(engine.vocab_size)
    base = engine.generate(texts, new_tokens, mtp=0)
    for k in range(1, engine.max_drafts + 1):
        run = engine.generate(texts, new_tokens, mtp=k)
        same = sum(a == b for a, b in zip(base.tokens, run.tokens))
        report("", f"end to end ({source}): greedy --mtp {k} equals --mtp 0, bf16", same == len(texts),
               f"{same}/{len(texts)} prompts equal; acceptance {run.acceptance_rate:.2f}")
    alone = [engine.generate([p], new_tokens, mtp=0).tokens[0] for p in texts]
    report("", f"end to end ({source}): {len(texts)} prompts together equal each alone, --mtp 0",
           alone == base.tokens, f"{sum(a == b for a, b in zip(alone, base.tokens))}/{len(texts)} equal")


# ---- (c) cost ------------------------------------------------------------------------------------------------
def step_cost(artifact: str, batches: list[int], drafts: int) -> None:
    engine = load(artifact, "cuda", max_batch=max(batches), cuda_graphs=False)
    for variant in ["main_t1"] + ([f"main_t{drafts + 1}"] if drafts else []):
        executor = engine.runner.executors[variant]
        steps = int(variant.split("_t")[1])
        for batch in batches:
            inputs = {f"state.{k}": v for k, v in engine.new_state(batch).items()}
            inputs.update(tokens=torch.zeros(batch, steps, dtype=torch.long, device="cuda"),
                          start=torch.full((batch,), engine.max_seq_len // 2, device="cuda"))
            invariant = in_block(executor.run)
            times = {"plain": graph_us(executor.run, [(inputs,)]), "invariant": graph_us(invariant, [(inputs,)])}
            for name, fn in (("plain eager", executor.run), ("invariant eager", invariant)):
                fn(inputs)
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(10):
                    fn(inputs)
                torch.cuda.synchronize()
                times[name] = (time.perf_counter() - started) / 10 * 1e6
            ratio = times["invariant"] / times["plain"]
            detail = ", ".join(f"{k} {v:.1f} us" for k, v in times.items()) + f"; graphs x{ratio:.2f}"
            report("COST", f"step {variant} batch {batch}", detail=detail, **times)


def previous_attention_launch(tokens: int, heads: int, keys: int, sms: int) -> attention.AttentionLaunch:
    """The launch before batch invariance: key ranges shrinking as the step's tokens grow."""
    tiles = -(-max(keys, 1) // 32)
    splits = max(1, min(tiles, (2 * sms) // (tokens * -(-heads // 16))))
    per_range = -(-tiles // splits) * 32
    return attention.AttentionLaunch(16, 32, -(-max(keys, 1) // per_range), per_range, 4)


def previous_fp8_launch(m: int, n: int, k: int) -> Fp8GemmLaunch:
    """The launch before batch invariance: K split less as M's tiles grow."""
    block_m = min(64, max(16, 1 << (m - 1).bit_length()))
    tiles = -(-n // 64) * -(-m // block_m)
    split_k, per_split = split_blocks(k, -(-2 * target_for_device("cuda").sm_count // tiles))
    return Fp8GemmLaunch(block_m, 64, split_k, per_split, "fp8", num_warps=4, num_stages=4, pdl=split_k > 1)


def kernel_cost() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    c = contexts(4)
    for seqs, steps in ((1, 1), (4, 1), (8, 4), (16, 1), (64, 1), (64, 4)):
        args = c.step(seqs, 0, steps)
        keys = WINDOW + TOPK
        new, old = attention.attention_launch(seqs * steps, HEADS, keys, sms), previous_attention_launch(
            seqs * steps, HEADS, keys, sms)
        us = {name: graph_us(lambda *a, la=la: attention.sparse_decode_attention(*a, launch=la), [args])
              for name, la in (("invariant", new), ("previous", old))}
        report("COST", f"attention C4 top-{TOPK}, {seqs * steps} tokens", detail=f"invariant {us['invariant']:.1f} us "
               f"({new.splits} ranges, fold {new.fold}), previous {us['previous']:.1f} us ({old.splits} ranges)", **us)
    gen = torch.Generator(device="cuda").manual_seed(5)
    for shape, (n, k) in FP8_SHAPES.items():
        weight, scale = quant.quantize_fp8_weight(torch.randn(n, k, generator=gen, device="cuda") * 0.05)
        for m in (1, 64, 128, 256, 512):
            x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
            new, old = fp8_gemm_launch(target_for_device("cuda"), m, n, k), previous_fp8_launch(m, n, k)
            us = {name: graph_us(lambda a, la=la: fp8_gemm.fp8_linear(a, weight, scale, True, torch.bfloat16,
                                                                      launch=la), [(x,)])
                  for name, la in (("invariant", new), ("previous", old))}
            report("COST", f"fp8_gemm {shape} M={m}", detail=f"invariant {us['invariant']:.1f} us (split "
                   f"{new.split_k}, fold {new.fold_splits}), previous {us['previous']:.1f} us (split {old.split_k})",
                   **us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", help="an artifact compiled with --target h100 (default: the eager demo model)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", help="write every line's result here")
    args = parser.parse_args()
    env = environment()
    print(env, flush=True)
    for check in (check_fp8_gemm, check_attention, check_aten, check_mhc):
        try:
            check()
        except Exception as error:  # noqa: BLE001 -- one broken check must not hide the others
            report("", f"{check.__name__} raised", False, f"{type(error).__name__}: {error}")
    engine = load(args.artifact, "cuda", max_batch=4) if args.artifact else eager_engine()
    check_end_to_end(engine, args.artifact or "eager demo model", args.max_new_tokens)
    if args.artifact:
        step_cost(args.artifact, args.batches, engine.max_drafts)
    kernel_cost()
    failed = [r["name"] for r in RESULTS if r["label"] == "FAIL"]
    print(f"{len(failed)} FAIL: {failed}" if failed else "all PASS", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, results=RESULTS), f, indent=1)


if __name__ == "__main__":
    main()
