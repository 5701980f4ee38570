"""The compiled decode step on a GPU: CUDA-graph replay against the graph-free executor and the eager model.

Compiles a checkpoint (default: the tiny preset, written here) for the local GPU, loads it twice (CUDA graphs on
and off), checks that greedy generation (plain and MTP, prompts of whole prefill chunks and single tokens) gives
the same tokens on both paths and on the eager reference, then times one decode step (`main_t1`) at each batch
with CUDA events (median of many steps, warmed up) and the prefill of a 256-token prompt (time to first token).

    python3 bench/step_graph_bench.py [--preset tiny] [--batch 1 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.model.checkpoint import Checkpoint, write_synthetic
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import preset
from dsv4c.model.step import dequantize_weights
from dsv4c.runtime.eager_runner import EagerRunner, state_specs
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.loader import load

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14], list(range(20, 40))]  # 20 tokens: two chunks of 8, then 4


def step_ms(engine: Engine, batch: int, start: int, repeats: int) -> float:
    """Median ms of one main_t1 step at `batch` over the engine's runner (state from a fresh pool)."""
    state = engine.new_state(batch)
    tokens = torch.randint(0, engine.vocab_size, (batch, 1), device=engine.device)
    times = []
    for i in range(repeats + 5):
        inputs = {"tokens": tokens, "start": torch.full((batch,), start + i, device=engine.device),
                  **{f"state.{k}": v for k, v in state.items()}}
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = engine.runner.run("main_t1", inputs)
        end.record()
        torch.cuda.synchronize()
        state = {k: out[f"state.{k}"] for k in state}
        if i >= 5:
            times.append(begin.elapsed_time(end))
    return statistics.median(times)


def prefill_ms(engine: Engine, length: int, repeats: int) -> float:
    """Median ms from a `length`-token prompt's arrival to its first token (its prefill), on the host clock."""
    prompt = torch.randint(0, engine.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    times = []
    for i in range(repeats + 2):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        engine.generate([prompt], 1)
        torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg = preset(args.preset)
    num = Numerics()
    work = Path(tempfile.mkdtemp(prefix="dsv4c-step-"))
    ckpt = write_synthetic(cfg, work / "ckpt", seed=0)
    art = compile_checkpoint(ckpt, work / "art", CompileOptions(targets=("h100",), numerics=num, max_seq_len=512,
                                                                 prefill_chunk=8, mtp=True),
                             progress=lambda m: print(m, flush=True))
    biggest = max(args.batch + [len(PROMPTS)])
    graphs = load(art, device, max_batch=biggest, progress=lambda m: None)
    plain = load(art, device, max_batch=biggest, cuda_graphs=False)
    print("captured:", len(graphs.runner.captured), "graphs over the pool's rows,", graphs.runner.captured_prefill,
          "over the prefill row; skipped:", graphs.runner.skipped, flush=True)
    c = Checkpoint.open(ckpt)
    weights = {k: v.to(device) for k, v in dequantize_weights({n: c.get(n) for n in c.headers}, num).items()}
    eager = Engine(EagerRunner(weights, cfg, num), state_specs(cfg, 512, num), 8, 512, device,
                   vocab_size=cfg.vocab_size)
    tokens = {name: e.generate(PROMPTS, 16).tokens for name, e in
              (("graphs", graphs), ("no-graphs", plain), ("eager", eager))}
    mtp = {name: e.generate(PROMPTS, 16, mtp=1) for name, e in (("graphs", graphs), ("no-graphs", plain))}
    same = tokens["graphs"] == tokens["no-graphs"] and mtp["graphs"].tokens == mtp["no-graphs"].tokens
    same_drafts = [r.accepted_by_position for r in mtp.values()]
    print(f"CHECK {'OK' if same else 'FAILED'}: CUDA-graph tokens equal graph-free tokens (plain and MTP)", flush=True)
    print(f"eager tokens equal: {tokens['graphs'] == tokens['eager']}; MTP tokens equal plain: "
          f"{mtp['graphs'].tokens == tokens['graphs']} (accepted {mtp['graphs'].accepted}/{mtp['graphs'].drafted}; "
          f"graph-free {mtp['no-graphs'].accepted}/{mtp['no-graphs'].drafted}: "
          f"{'same' if same_drafts[0] == same_drafts[1] else 'DIFFERENT'} by position)", flush=True)
    ttft = {name: prefill_ms(e, 256, 5) for name, e in (("graphs", graphs), ("no-graphs", plain))}
    print(f"prefill of 256 tokens (time to first token): {ttft['graphs']:.2f} ms replayed, "
          f"{ttft['no-graphs']:.2f} ms graph-free", flush=True)
    rows = []
    for batch in args.batch:
        row = {"batch": batch, "graphs_ms": step_ms(graphs, batch, 64, args.repeats),
               "no_graphs_ms": step_ms(plain, batch, 64, args.repeats),
               "eager_ms": step_ms(eager, batch, 64, min(args.repeats, 20))}
        rows.append(row)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    print(f"{'batch':>5} {'graph ms':>9} {'no-graph ms':>12} {'eager ms':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['graphs_ms']:9.3f} {r['no_graphs_ms']:12.3f} {r['eager_ms']:9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "preset": args.preset, "rows": rows, "tokens_equal": same,
                                               "prefill_256_ms": ttft}, indent=2))


if __name__ == "__main__":
    main()
