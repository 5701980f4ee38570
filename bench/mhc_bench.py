"""Fused mHC layer boundaries on a GPU: correctness against the fp32 reference, then time and bandwidth.

For each batch T and each boundary (hc_pre: before the first sub-layer; hc_post_pre: between sub-layers, the
per-boundary cost of a layer; hc_head: before the LM head) it checks the fused Triton kernels against
codegen/mhc_reference.py, then times in the same run, each as the median of CUDA-graph replays over
rotating input sets (every set has its own streams and fn, as every layer has its own fn; together they
are several times the L2, so nothing is timed from cache):
  fused     codegen/kernels/mhc.py (2 launches)
  fused-ng  the same without a CUDA graph (host launch overhead included)
  eager     the unfused PyTorch sub-graph (compiler/layers.py hc_pre / hc_post / hc_head + rms_norm)
  inductor  torch.compile of that same sub-graph (default mode, static shapes); with --max-autotune also
            mode="max-autotune-no-cudagraphs" (our own CUDA graphs capture it)
and the byte floor: bytes that must move (streams read, fn read, outputs written) over the copy bandwidth
measured in this run. Usage (Flash dims by default):
  python bench/mhc_bench.py [--tokens 1 8 64 256] [--hidden 4096] [--hc 4] [--iters 20] [--json out.json]
  python bench/mhc_bench.py --sweep   # also time a grid of MhcLaunch configs of the fused kernels
  python bench/mhc_bench.py --invariant --tokens 1 8 16 64 128   # only the batch-invariant launch, below
With --invariant (runtime/batch_invariant.py's launch, `batch_invariant_launch`) it prints, instead of the table:
  PASS / FAIL  each op's rows of steps of every --tokens count (and of 9 and 17 tokens at other offsets) equal
               bit for bit the same tokens' rows of one step of the largest count, bf16 and fp32 streams (the
               tuned launch's result as INFO); and the runtime's implementations of the ops (runtime/loader.py
               `mhc_implementations`, eager and in a CUDA graph) equal the wrapper with that launch
  COST         each op at each --tokens count, tuned and batch-invariant launch side by side (CUDA graphs over
               rotating input sets, as the table), with the invariant launch's check against the reference
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json

import torch
import triton
import triton.language as tl

from dsv4c.codegen import mhc_reference as ref
from dsv4c.codegen.kernels import mhc
from dsv4c.codegen.kernels.launcher import JIT
from dsv4c.codegen.kernels.mhc_launch import MIN_DOT, batch_invariant_launch, dot_launch, mhc_launch, split_over
from dsv4c.codegen.targets import target_for_device
from gpu_common import copy_gbps, environment, graph_us  # bench/gpu_common.py (scripts run from bench/)

RMS_EPS = HC_EPS = 1e-6
OPS = ("hc_pre", "hc_post_pre", "hc_head")


# ---- inputs ------------------------------------------------------------------------------------------
def make_set(tokens: int, hc: int, hidden: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """One layer boundary's inputs on the GPU, random and O(1) like a trained model's."""
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device="cuda") * scale

    rows, k = (2 + hc) * hc, hc * hidden
    streams = randn(tokens, hc, hidden).to(dtype)
    post = 2 * torch.sigmoid(randn(tokens, hc))
    comb = ref.layers.sinkhorn(randn(tokens, hc, hc), 20, HC_EPS)
    return dict(streams=streams, block_out=randn(tokens, hidden).to(dtype), post=post, comb=comb,
                fn=randn(rows, k, scale=2 / k ** 0.5), base=randn(rows, scale=0.5),
                scale=torch.rand(3, generator=gen, device="cuda") + 0.5,
                head_fn=randn(hc, k, scale=2 / k ** 0.5), head_base=randn(hc, scale=0.5),
                head_scale=torch.rand(1, generator=gen, device="cuda") + 0.5,
                norm_w=(torch.rand(hidden, generator=gen, device="cuda") + 0.5).to(dtype))


def op_args(op: str, s: dict, iters: int) -> tuple:
    if op == "hc_pre":
        return s["streams"], s["fn"], s["base"], s["scale"], s["norm_w"], RMS_EPS, HC_EPS, iters
    if op == "hc_post_pre":
        return (s["block_out"], s["streams"], s["post"], s["comb"], s["fn"], s["base"], s["scale"], s["norm_w"],
                RMS_EPS, HC_EPS, iters)
    return s["streams"], s["head_fn"], s["head_base"], s["head_scale"], s["norm_w"], RMS_EPS, HC_EPS


def floor_bytes(op: str, tokens: int, hc: int, hidden: int, elt: int) -> int:
    """Bytes each input read once and each output written once."""
    mix = tokens * (hc + hc * hc) * 4                       # post + comb, fp32
    normed = tokens * hidden * elt + hidden * elt         # block input written, norm weight read
    if op == "hc_head":
        return tokens * hc * hidden * elt + hc * hc * hidden * 4 + normed
    fn = (2 + hc) * hc * hc * hidden * 4
    pre = tokens * hc * hidden * elt + fn + normed + mix
    if op == "hc_pre":
        return pre
    return pre + tokens * hidden * elt + mix + tokens * hc * hidden * elt  # block_out, post/comb in, new streams


# ---- timing --------------------------------------------------------------------------------------------
def launch_us(fn, arg_sets: list[tuple]) -> float:
    """Median microseconds per call launched from Python, no graph (rotating sets)."""
    it = iter(range(10**9))
    return triton.testing.do_bench(lambda: fn(*arg_sets[next(it) % len(arg_sets)]), warmup=25, rep=100,
                                   return_mode="median") * 1e3


# ---- correctness ---------------------------------------------------------------------------------------
def max_errors(got, expected) -> list[tuple[float, float]]:
    """(max abs error, normwise relative error) per output; NaN anywhere fails."""
    out = []
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert not g.isnan().any(), "NaN in a fused output"
        diff = (g.double() - e.double())
        out.append((diff.abs().max().item(), (diff.norm() / e.double().norm()).item()))
    return out


def check(op: str, s: dict, iters: int, bf16_tol: float = 1e-2, fp32_tol: float = 1e-5, launch=None) -> str:
    """Fused vs reference on one input set (outputs poisoned with NaN first); returns a one-line summary."""
    args = op_args(op, s, iters)
    expected = getattr(ref, op)(*args)
    poisoned = tuple(torch.full_like(e, float("nan")) for e in (expected if isinstance(expected, tuple) else (expected,)))
    got = getattr(mhc, op)(*args, launch=launch, out=poisoned if isinstance(expected, tuple) else poisoned[0])
    errors = max_errors(got, expected)
    tols = [bf16_tol if e.dtype == torch.bfloat16 else fp32_tol
            for e in (expected if isinstance(expected, tuple) else (expected,))]
    ok = all(rel <= tol for (_, rel), tol in zip(errors, tols))
    return ("ok  " if ok else "FAIL") + " ".join(f"{rel:.1e}" for _, rel in errors)


def writers_agree(tokens: int, hc: int, hidden: int, iters: int, dtype: torch.dtype) -> bool:
    """Whether hc_post_pre's new streams are bitwise the same whichever kernel writes them
    (`collapse_stores_new`): the collapse rebuilds them with the split-K kernel's own function."""
    s = make_set(tokens, hc, hidden, dtype, torch.Generator(device="cuda").manual_seed(11))
    args = op_args("hc_post_pre", s, iters)
    launch = mhc_launch(target_for_device("cuda"), tokens, hidden, hc)
    by_collapse, by_split_k = (mhc.hc_post_pre(*args, launch=dataclasses.replace(launch, collapse_stores_new=flag))[0]
                               for flag in (True, False))
    return torch.equal(by_collapse, by_split_k)


# ---- the run ---------------------------------------------------------------------------------------------
def input_sets(tokens, hc, hidden, dtype, l2_bytes) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    per_set = floor_bytes("hc_post_pre", tokens, hc, hidden, dtype.itemsize)
    count = max(4, min(64, -(-4 * l2_bytes // per_set)))
    return [make_set(tokens, hc, hidden, dtype, gen) for _ in range(count)]


def bench_tokens(tokens, args, gbps, l2_bytes, compiled, compiled_max) -> list[dict]:
    sets = input_sets(tokens, args.hc, args.hidden, torch.bfloat16, l2_bytes)
    rows = []
    for op in OPS:
        arg_sets = [op_args(op, s, args.iters) for s in sets]
        floor = floor_bytes(op, tokens, args.hc, args.hidden, 2)
        row = dict(op=op, tokens=tokens, sets=len(sets), check=check(op, sets[0], args.iters),
                   floor_bytes=floor, floor_us=floor / gbps / 1e3,
                   fused_us=graph_us(getattr(mhc, op), arg_sets), fused_nograph_us=launch_us(getattr(mhc, op), arg_sets),
                   eager_us=graph_us(getattr(ref, op), arg_sets) if compiled else float("nan"),
                   inductor_us=graph_us(compiled[op], arg_sets) if compiled else float("nan"),
                   inductor_max_us=graph_us(compiled_max[op], arg_sets) if compiled_max else float("nan"),
                   launch=str(mhc_launch(target_for_device("cuda"), tokens, args.hidden)))
        row["fused_gbps"] = floor / row["fused_us"] / 1e3
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def candidate_launches(t, tokens: int, hidden: int, hc: int = 4) -> list:
    """The default launch, then variants of one kernel at a time: without PDL; the new streams written by the
    other kernel; the sums of squares in the other kernel; the split-K kernel launched without waiting on
    the kernel before it; the Sinkhorn dividing in full; the collapse at 4-16 warps; the
    split-K kernel with broadcast blocks of 1-4 tokens (up to 16 tokens) and 32-256 column chunks at 0.5 or 1
    program an SM, and tensor-core tf32x3 dots on 16 / 32 / 64-token blocks of 16-64 columns (and
    `dot_launch`'s width) at 1 or 2 programs an SM, 4 or 8 warps."""
    default = mhc_launch(t, tokens, hidden, hc)
    found = {default: None}
    found.setdefault(dataclasses.replace(default, pdl=False), None)
    found.setdefault(dataclasses.replace(default, collapse_stores_new=not default.collapse_stores_new), None)
    found.setdefault(dataclasses.replace(default, collapse_sums_squares=not default.collapse_sums_squares), None)
    found.setdefault(dataclasses.replace(default, split_k_pdl=False), None)
    found.setdefault(dataclasses.replace(default, fast_reciprocal=False), None)
    for warps in (4, 8, 16):
        found.setdefault(dataclasses.replace(default, collapse_warps=warps), None)
    split_fields = ("block_t", "block_d", "chunks", "split_k", "num_stages", "dot", "precision")
    if tokens <= 16:
        for block_t in sorted({1, 2, 4} & set(range(1, 2 * tokens))):
            for block_d in (32, 64, 128, 256):
                for programs in (t.sm_count // 2, t.sm_count):
                    chunks, split_k = split_over(hidden, block_d, programs)
                    found.setdefault(dataclasses.replace(default, block_t=block_t, block_d=block_d, chunks=chunks,
                                                         split_k=split_k, dot=False, precision="ieee"), None)
    for block_t in (16, 32, 64):
        if block_t <= 4 * tokens:
            for per_sm in (1, 2):
                dot = dot_launch(t, tokens, hidden, hc, block_t, per_sm)
                programs = max(1, per_sm * t.sm_count // triton.cdiv(tokens, block_t))
                for block_d in sorted({dot.block_d, 16, 32, 64}):
                    chunks, split_k = split_over(hidden, block_d, programs)
                    for warps in (4, 8):
                        fields = {f: getattr(dot, f) for f in split_fields}
                        fields.update(block_d=block_d, chunks=chunks, split_k=split_k, num_warps=warps)
                        found.setdefault(dataclasses.replace(default, **fields), None)
    return list(found)


def tf32x3_launch(t, tokens: int, hidden: int, hc: int):
    """The default tl.dot launch with tensor-core tf32x3 products (16-token blocks where the default has none)."""
    return dot_launch(t, tokens, hidden, hc, MIN_DOT)


def sweep(tokens, args, l2_bytes) -> None:
    """hc_post_pre (both kernels) over `candidate_launches`; prints the default and the best, each checked."""
    sets = input_sets(tokens, args.hc, args.hidden, torch.bfloat16, l2_bytes)
    t = target_for_device("cuda")
    for op in ("hc_post_pre",):
        arg_sets = [op_args(op, s, args.iters) for s in sets]
        results = {}
        for launch in candidate_launches(t, tokens, args.hidden, args.hc):
            fn = lambda *a, launch=launch: getattr(mhc, op)(*a, launch=launch)
            try:
                results[launch] = graph_us(fn, arg_sets, replays=10)
            except Exception as error:  # noqa: BLE001 -- a tile too large for this GPU, say: reported, skipped
                print(f"    skipped {launch}: {error}", flush=True)
        default = mhc_launch(t, tokens, args.hidden, args.hc)
        no_pdl = dataclasses.replace(default, pdl=False)
        print(f"sweep {op} T={tokens}: default {results.get(default, float('nan')):.2f} us {default}; "
              f"no PDL {results.get(no_pdl, float('nan')):.2f} us; best:", flush=True)
        for launch, us in sorted(results.items(), key=lambda r: r[1])[:6]:
            print(f"    {us:7.2f} us  {check(op, sets[0], args.iters, launch=launch)}  {launch}", flush=True)


@triton.jit
def _nop_kernel(x_ptr):
    tl.store(x_ptr + tl.program_id(0), 1.0)


def kernel_breakdown(tokens, args, l2_bytes) -> None:
    """Each kernel alone, in CUDA graphs over the rotating sets: an empty kernel (the launch gap), the split-K
    partials of hc_pre / hc_post_pre at the default launch, and the collapse (with its post / Sinkhorn
    program) over iterations and with the new streams rebuilt (hc_post_pre). What each hc_post_pre kernel
    does follows the default launch: from 3 tokens the collapse, not the split-K kernel, writes the new
    streams (`collapse_stores_new`), and from 9 to 64 tokens it also takes their sum of squares
    (`collapse_sums_squares`), so these figures compare across runs only at the same launch."""
    sets = input_sets(tokens, args.hc, args.hidden, torch.bfloat16, l2_bytes)
    t = target_for_device("cuda")
    default = mhc_launch(t, tokens, args.hidden, args.hc)
    rows = (2 + args.hc) * args.hc
    nop = torch.empty(132, device="cuda")
    out = [f"T={tokens:<4} nop {graph_us(lambda: _nop_kernel[(1,)](nop), [()] * len(sets)):.2f}"]
    work = [(s, mhc.mix_workspace(tokens, rows, default, "cuda"), torch.empty_like(s["streams"]))
            for s in sets]

    def partials(s, part, new, post=False):
        post_in = (s["streams"], s["post"], s["comb"], new) if post else None
        JIT(mhc.mix_partials_launch(s["block_out"] if post else s["streams"], post_in, s["fn"], part, default,
                                    args.hc))

    out.append(f"partials(pre) {graph_us(partials, work):.2f}")
    out.append(f"partials(post_pre) {graph_us(lambda *w: partials(*w, post=True), work):.2f}")
    for iters, post in ((1, False), (args.iters, False), (args.iters, True)):
        launch = dataclasses.replace(default, pdl=False)

        def collapse(s, part, new, launch=launch, iters=iters, post=post):
            normed = torch.empty((tokens, args.hidden), dtype=s["streams"].dtype, device="cuda")
            post_in = (s["block_out"], s["streams"], s["post"], s["comb"], new) if post else None
            JIT(mhc.collapse_launch(s["streams"], post_in, part, s["base"], s["scale"], s["norm_w"], normed,
                                    torch.empty_like(s["post"]), torch.empty_like(s["comb"]), RMS_EPS, HC_EPS,
                                    iters, launch))
        out.append(f"collapse(it{iters}{',post' if post else ''}) {graph_us(collapse, work):.2f}")
    print("  ".join(out), flush=True)


# ---- batch invariance (runtime/batch_invariant.py) -------------------------------------------------------
TOKEN_INPUTS = ("streams", "block_out", "post", "comb")  # make_set's tensors with a token dim


def token_rows(out) -> torch.Tensor:
    """An op's outputs as one fp32 row a token (bf16 widened exactly), every output side by side."""
    return torch.cat([o.float().flatten(1) for o in (out if isinstance(out, tuple) else (out,))], dim=1)


def tokens_of(s: dict, lo: int, hi: int) -> dict:
    """Input set `s` cut to tokens lo .. hi - 1 (contiguous copies: a step of its own)."""
    return {k: v[lo:hi].contiguous() if k in TOKEN_INPUTS else v for k, v in s.items()}


def report(label: str, name: str, detail: str = "") -> dict:
    print(f"{label:<5} {name}  {detail}", flush=True)
    return dict(label=label, name=name, detail=detail)


def steps_agree(args, dtype: torch.dtype) -> list[dict]:
    """Each op's rows of steps of every --tokens count, and of 9 and 17 tokens at other offsets, against the same
    rows of one step of the largest count: PASS / FAIL with `batch_invariant_launch`, INFO with the tuned one."""
    top = max(max(args.tokens), 17)
    s = make_set(top, args.hc, args.hidden, dtype, torch.Generator(device="cuda").manual_seed(13))
    spans = sorted({(0, t) for t in args.tokens} | {(5, 14), (top - 17, top)})
    results = []
    for op in OPS:
        for name, kw in (("batch-invariant", dict(launch_choice=batch_invariant_launch)), ("tuned", {})):
            def run(lo, hi, op=op, kw=kw):
                return token_rows(getattr(mhc, op)(*op_args(op, tokens_of(s, lo, hi), args.iters), **kw))
            whole = run(0, top)
            bad = [f"{lo}..{hi - 1}" for lo, hi in spans if not torch.equal(run(lo, hi), whole[lo:hi])]
            ok = not bad and not whole.isnan().any()
            detail = (f"rows differing from the {top}-token step: {', '.join(bad)}" if bad else
                      f"{len(spans)} steps ({', '.join(str(hi - lo) for lo, hi in spans)} tokens) equal")
            label = "INFO" if name == "tuned" else ("PASS" if ok else "FAIL")
            results.append(report(label, f"{op} {str(dtype)[6:]}, {name} launch: a token's bits in every step", detail))
    return results


def runtime_implementations(args) -> list[dict]:
    """The mHC ops as the runtime's executors call them (runtime/loader.py `mhc_implementations`, Triton's JIT)
    against the wrapper with `batch_invariant_launch`, eager and replayed from a CUDA graph."""
    from dsv4c.runtime.loader import mhc_implementations

    implementations = mhc_implementations(None)
    results = []
    for tokens in sorted({min(args.tokens), 9, max(args.tokens)}):
        s = make_set(tokens, args.hc, args.hidden, torch.bfloat16, torch.Generator(device="cuda").manual_seed(17))
        for op in OPS:
            a, run = op_args(op, s, args.iters), implementations[f"dsv4c::{op}"]
            want = token_rows(getattr(mhc, op)(*a, launch_choice=batch_invariant_launch))
            eager = token_rows(run(*a))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = run(*a)
            graph.replay()
            ok = torch.equal(eager, want) and torch.equal(token_rows(captured), want)
            results.append(report("PASS" if ok else "FAIL", f"{op} T={tokens}: the runtime's implementation",
                                  f"eager {torch.equal(eager, want)}, graph {torch.equal(token_rows(captured), want)}"))
    return results


def invariance_cost(args, l2_bytes: int) -> list[dict]:
    """Each op at each --tokens count: the tuned launch and `batch_invariant_launch` (the same up to 8 tokens),
    median microseconds of CUDA-graph replays over rotating input sets."""
    t, results = target_for_device("cuda"), []
    for tokens in args.tokens:
        sets = input_sets(tokens, args.hc, args.hidden, torch.bfloat16, l2_bytes)
        launch = batch_invariant_launch(t, tokens, args.hidden, args.hc)
        for op in OPS:
            arg_sets = [op_args(op, s, args.iters) for s in sets]
            tuned = graph_us(getattr(mhc, op), arg_sets)
            invariant = graph_us(functools.partial(getattr(mhc, op), launch=launch), arg_sets)
            same = launch == mhc_launch(t, tokens, args.hidden, args.hc)
            detail = (f"tuned {tuned:7.2f} us, batch-invariant {invariant:7.2f} us (x{invariant / tuned:.2f}"
                      f"{', the same launch' if same else ''}); check {check(op, sets[0], args.iters, launch=launch)}")
            results.append(dict(report("COST", f"{op:<12} T={tokens:<4}", detail), op=op, tokens=tokens,
                                tuned_us=tuned, invariant_us=invariant))
    return results


def invariant_mode(args, env: dict, l2_bytes: int) -> None:
    """--invariant: the bit-equality checks, then the cost; a final line counts the FAILs."""
    results = [*steps_agree(args, torch.bfloat16), *steps_agree(args, torch.float32), *runtime_implementations(args),
               *invariance_cost(args, l2_bytes)]
    failed = [r["name"] for r in results if r["label"] == "FAIL"]
    print(f"{len(failed)} FAIL: {failed}" if failed else "all PASS", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, args=vars(args), results=results), f, indent=1)


def format_row(r: dict) -> str:
    return (f"{r['op']:<12}{r['tokens']:>5}  {r['check']:<28}{r['floor_us']:>7.2f}{r['fused_us']:>8.2f}"
            f"{r['fused_gbps']:>8.0f}{r['fused_nograph_us']:>9.1f}{r['eager_us']:>9.1f}{r['inductor_us']:>9.1f}"
            f"{r['inductor_max_us']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--hc", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time a grid of launches of the fused ops")
    parser.add_argument("--kernels", action="store_true", help="time each kernel alone (launch gap, variants)")
    parser.add_argument("--no-baselines", action="store_true", help="skip eager and inductor (iterating)")
    parser.add_argument("--max-autotune", action="store_true",
                        help="also time Inductor's max-autotune-no-cudagraphs (autotuning takes minutes)")
    parser.add_argument("--check-tf32x3", action="store_true", help="check the tensor-core tf32x3 dots too")
    parser.add_argument("--invariant", action="store_true",
                        help="only the batch-invariant launch: bit-equality across steps and its cost (docstring)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env = environment()
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    if args.invariant:
        print(json.dumps(env), flush=True)
        return invariant_mode(args, env, l2_bytes)
    gbps = copy_gbps()
    print(json.dumps(env), f"\ncopy bandwidth {gbps:.0f} GB/s (read + written), L2 {l2_bytes >> 20} MiB", flush=True)
    # every token count is its own static-shape graph: past dynamo's default limit (8) it would silently
    # run the sub-graph eagerly and the Inductor columns would time eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(args.tokens))
    compiled = None if args.no_baselines else {op: torch.compile(getattr(ref, op), dynamic=False) for op in OPS}
    compiled_max = None if args.no_baselines or not args.max_autotune else {
        op: torch.compile(getattr(ref, op), dynamic=False, mode="max-autotune-no-cudagraphs") for op in OPS}
    print(f"{'op':<12}{'T':>5}  {'check (rel err per output)':<28}{'floor':>7}{'fused':>8}{'GB/s':>8}"
          f"{'no-graph':>9}{'eager':>9}{'inductor':>9}{'ind-max':>9}   (us)", flush=True)
    rows = [row for tokens in args.tokens for row in bench_tokens(tokens, args, gbps, l2_bytes, compiled, compiled_max)]
    for tokens in sorted({min(args.tokens), max(args.tokens)}):
        s = make_set(tokens, args.hc, args.hidden, torch.float32, torch.Generator(device="cuda").manual_seed(7))
        print(f"fp32 streams, T={tokens}: " + "; ".join(f"{op} {check(op, s, args.iters)}" for op in OPS), flush=True)
    print("new streams bitwise equal, written by the collapse or the split-K kernel: " + "; ".join(
        f"T={tokens} {dtype} {writers_agree(tokens, args.hc, args.hidden, args.iters, dtype)}"
        for tokens in args.tokens for dtype in (torch.bfloat16, torch.float32)), flush=True)
    for tokens in (1, 64, 256) if args.check_tf32x3 else ():
        launch = tf32x3_launch(target_for_device("cuda"), tokens, args.hidden, args.hc)
        for dtype in (torch.float32, torch.bfloat16):
            s = make_set(tokens, args.hc, args.hidden, dtype, torch.Generator(device="cuda").manual_seed(9))
            print(f"tf32x3 dots, {dtype}, T={tokens}: " + "; ".join(
                f"{op} {check(op, s, args.iters, launch=launch)}" for op in OPS), flush=True)
    for tokens in args.tokens if args.kernels else ():
        kernel_breakdown(tokens, args, l2_bytes)
    for tokens in args.tokens if args.sweep else ():
        sweep(tokens, args, l2_bytes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, copy_gbps=gbps, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
