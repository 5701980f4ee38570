"""Static measure of the block-scaled FP8 GEMM's sm_90a build on DeepSeek-V4-Flash's FP8 linears (no GPU needed).

    python bench/fp8_gemm_sass.py                        # every Flash shape at M = 1, 8, 64, 128
    python bench/fp8_gemm_sass.py --m 1 64 --shapes wq_a wo_b --sass /tmp/sass --json out.json

For each shape (N, K) and row count M it records the launches `fp8_gemm.fp8_linear` makes on meta tensors with
its default launch for h100 (the rounding kernel where x is prequantised, the GEMM, the split sum where K is
split), builds the GEMM with Triton's `GPUTarget` for sm_90a (integer arguments divisible by 16 marked so, as
Triton's JIT specialises them), reads its TTGIR, SASS (cuobjdump, shipped with Triton) and resource usage, and
prints:
  grid        programs of the GEMM (n tiles x m tiles x splits, or x 1 where the splits fold) against 132 SMs
  regs/spl    registers a thread; spl: local-memory instructions (STL/LDL, spills) in the kernel
  smem        shared memory a program (Triton's dynamic allocation + static); prog/SM: programs an SM can hold
              (registers, shared memory, threads, whichever binds first) / those it holds in the first wave
              (the grid spread over the SMs)
  trips       K iterations (128 columns) a program runs; ahead: weight tiles the pipeline's prologue copies
              before the first MMA (num_stages - 1, at most the trips of a split); B/trip: weight bytes a trip
              (e4m3, DRAM) and activation bytes (bf16 x, or e4m3 codes where prequantised; L2)
  in flight   weight + activation bytes in flight an SM in the first wave: resident programs x tiles ahead x
              bytes a trip (an H100 needs ~25-40 KB an SM to approach its bandwidth: 3.35 TB/s x ~1 us / 132)
  load        the K loop's cp.async copy widths a thread (16 B: LDGSTS.128, vectorised; 4 B: the activation
              scales) or TMA (UTMALDG), and the bytes of one weight row a warp's copy covers (128: every 128-byte
              line read whole, coalesced)
  mma         the MMA instruction of the K loop (QGMMA: wgmma on FP8 e4m3; HMMA: mma.sync)
  insts/trip  SASS instructions a thread issues in one K iteration (the innermost loop holding the MMAs;
              fewest - most over the loop body's paths); cyc/KB: the SM issue cycles they cost a KB of weight:
              trip instructions x warps / 4 schedulers / (weight bytes a trip / m tiles: the m tiles of a weight
              tile read it once from DRAM between them); at most ~71 keeps up with 3.35 TB/s, without stalls
  partials    fp32 split-K partials written and read again by the split sum (split_k x M x N x 4 bytes each way,
              0 where the splits fold), against the weight bytes; sum: the split sum's launch (pdl: as the
              GEMM's programmatic dependent); round: the rounding kernel's grid (row blocks x K blocks)

Then an estimate of the fraction of the byte floor (bench/fp8_gemm_bench.py's bytes at PEAK_TBPS), from a
model with stated constants, not a timing: the streaming time is the longest of the DRAM time at peak, the
busiest SM's bytes at the bandwidth its bytes in flight sustain (Little's law at LOADED_LATENCY_US, at most
SM_L2_GBPS), and the busiest SM's issue time at CLOCK_GHZ (no stalls), plus the partials' L2 writes; `stream`
is the floor over that time alone; `total` adds the fixed costs: a launch in a CUDA graph (LAUNCH_US), the
first loads' DRAM latency (DRAM_LATENCY_US), and for the split sum and the rounding kernel each L2_LATENCY_US,
their L2 traffic at L2_TBPS, and a launch unless PDL chains them. Run it under each Triton (the GPU image's
3.6, CI's 3.9): they pipeline and allocate differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds for a GPU it lacks

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_gemm_bench import SHAPES, fp8_bytes  # noqa: E402 -- bench/fp8_gemm_bench.py, the timed shapes

# H100 SXM: per SM 64K registers (4 partitions of 16K), 228 KiB shared memory (1 KiB reserved a block),
# 2048 threads, 32 blocks
REGS_PER_PARTITION, PARTITIONS, SMEM_PER_SM, SMEM_RESERVED, MAX_THREADS, MAX_BLOCKS = 16384, 4, 233472, 1024, 2048, 32
SCHEDULERS = 4  # warp instructions an SM issues a cycle
# the estimate's constants (assumptions, not measurements)
PEAK_TBPS = 3.35  # HBM3 bandwidth
CLOCK_GHZ = 1.755  # SM clock under load
LOADED_LATENCY_US = 1.0  # DRAM latency under load (Little's law: bytes in flight / latency)
DRAM_LATENCY_US = 0.7  # the first loads' latency
LAUNCH_US = 0.8  # a kernel node's launch in a CUDA graph
SM_L2_GBPS = 110.0  # what one SM can pull from L2 (~64 B a cycle)
L2_TBPS, L2_LATENCY_US = 5.5, 0.5  # the split sum: L2 read bandwidth; its wait for the GEMM grid and first read
TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float8_e4m3fn: "*fp8e4nv", torch.uint8: "*u8"}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)\s*([^;]*);")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    predicated: bool
    opcode: str  # without modifiers
    modifiers: str  # ".E.BYPASS.128", ...
    text: str

    def branch_target(self) -> int | None:
        if self.opcode != "BRA":
            return None
        found = re.search(r"0x([0-9a-f]+)", self.text)
        return int(found.group(1), 16) if found else None


# ---- building ------------------------------------------------------------------------------------------------
def record_launches(m: int, n: int, k: int) -> list:
    """The KernelLaunch records of `fp8_linear`'s default h100 launch (act_quant, bf16 in and out) on meta tensors."""
    from dsv4c.codegen.kernels import fp8_gemm
    from dsv4c.codegen.kernels.fp8_gemm_launch import fp8_gemm_launch
    from dsv4c.codegen.targets import target

    meta, launches = dict(device="meta"), []
    fp8_gemm.fp8_linear(torch.empty(m, k, dtype=torch.bfloat16, **meta),
                        torch.empty(n, k, dtype=torch.float8_e4m3fn, **meta),
                        torch.empty(-(-n // 128), -(-k // 128), dtype=torch.float8_e8m0fnu, **meta), True,
                        torch.bfloat16, launch=fp8_gemm_launch(target("h100"), m, n, k), launcher=launches.append)
    return launches


def compile_launch(launch):
    """Triton's compiled kernel of one recorded launch, for sm_90a."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.targets import target, triton_gpu_target

    signature = {name: "constexpr" if name in launch.constexprs else
                 TYPES[launch.args[name].dtype] if isinstance(launch.args[name], torch.Tensor) else "i32"
                 for name in launch.fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(launch.fn.arg_names)
             if signature[name] != "constexpr" and (signature[name].startswith("*") or launch.args[name] % 16 == 0)}
    options = {key: value for key, value in launch.options.items() if key != "launch_pdl"}
    return triton.compile(ASTSource(launch.fn, signature, launch.constexprs, attrs),
                          target=triton_gpu_target(target("h100")), options=options)


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def disassemble(cubin: bytes) -> tuple[list[Instruction], dict[str, int]]:
    """The SASS instructions of the cubin's kernel and its resource usage (REG, STACK, SHARED, LOCAL, ...)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], check=True, capture_output=True, text=True).stdout
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], check=True, capture_output=True,
                               text=True).stdout
    instructions = [Instruction(int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(4), m.group(0).strip())
                    for m in map(_SASS_LINE.search, sass.splitlines()) if m]
    resources = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", usage.split("Function", 1)[-1])}
    return instructions, resources


# ---- reading the SASS and the TTGIR ---------------------------------------------------------------------------
def mma_loop(instructions: list[Instruction]) -> list[Instruction]:
    """The body of the innermost loop (head to backward branch) that holds the MMAs: the K loop."""
    loops = []
    for i, ins in enumerate(instructions):
        head = ins.branch_target()
        if head is not None and head < ins.address:
            loops.append([x for x in instructions[:i + 1] if x.address >= head])
    with_mma = [body for body in loops if any(x.opcode in ("QGMMA", "HGMMA", "HMMA") for x in body)]
    if not with_mma:
        raise ValueError("no loop with MMAs in the SASS")
    return min(with_mma, key=len)


def path_lengths(body: list[Instruction]) -> tuple[int, int]:
    """The fewest and the most instructions one trip from the body's head to its backward branch issues."""
    index = {ins.address: i for i, ins in enumerate(body)}
    shortest, longest = [0] * (len(body) + 1), [0] * (len(body) + 1)
    for i in range(len(body) - 1, -1, -1):
        ins, target = body[i], body[i].branch_target()
        if i == len(body) - 1:
            successors = [len(body)]
        elif target is not None and target > ins.address:
            successors = [index.get(target, len(body))] + ([i + 1] if ins.predicated else [])
        else:
            successors = [i + 1]
        shortest[i] = 1 + min(shortest[s] for s in successors)
        longest[i] = 1 + max(longest[s] for s in successors)
    return shortest[0], longest[0]


def weight_copy(ttgir: str, block_n: int) -> dict:
    """How the weight tile `w` reaches shared memory (TTGIR): cp.async copies (`async_copy_global_to_local`) or TMA
    (`async_tma_copy`), how many the prologue issues before the K loop, and the bytes of one weight row that one
    warp's copy covers (sizePerThread x threadsPerWarp along K, from the copy's blocked layout)."""
    layouts = dict(re.findall(r"^(#\w+) = #ttg\.blocked<\{([^}]*)\}>", ttgir, re.M))
    body = ttgir.split("tt.func public", 1)[-1]
    pattern = rf"%w_\d+ = ttg\.async_copy_global_to_local[^\n]*tensor<{block_n}x128x!tt\.ptr<f8E4M3FN>, (#\w+)>"
    copies = re.findall(pattern, body)  # `w`'s copies (Triton names values after the variables): the prologue's,
    # then the one the loop issues a trip
    tma = "async_tma_copy" in body or "tma_load" in body
    row_bytes = 0
    if copies:
        fields = {key: [int(v) for v in value.split(",")]
                  for key, value in re.findall(r"(\w+) = \[([\d, ]+)\]", layouts.get(copies[0], ""))}
        row_bytes = fields["sizePerThread"][1] * fields["threadsPerWarp"][1] if fields else 0
    return dict(kind="TMA" if tma else "cp.async" if copies else "ld.global", ahead=max(0, len(copies) - 1),
                row_bytes=row_bytes)


# ---- the figures ---------------------------------------------------------------------------------------------
def programs_per_sm(regs: int, smem: int, warps: int) -> dict:
    """Programs an SM holds, by each limit (registers: allocated 256 a warp at a time, per partition)."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (REGS_PER_PARTITION // regs_per_warp) * PARTITIONS // warps
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED) if smem else MAX_BLOCKS
    return dict(regs=by_regs, smem=by_smem, threads=MAX_THREADS // (32 * warps),
                limit=min(by_regs, by_smem, MAX_THREADS // (32 * warps), MAX_BLOCKS))


def measure(name: str, m: int, sms: int) -> dict:
    """The static figures of one shape at M rows."""
    n, k = SHAPES[name]
    launches = {launch.fn.__name__: launch for launch in record_launches(m, n, k)}
    gemm = launches["_fp8_gemm_kernel"]
    c = gemm.constexprs
    compiled = compile_launch(gemm)
    instructions, resources = disassemble(compiled.asm["cubin"])
    body = mma_loop(instructions)
    fewest, most = path_lengths(body)
    smem = compiled.metadata.shared + resources.get("SHARED", 0)
    warps = gemm.options["num_warps"]
    occupancy = programs_per_sm(resources["REG"], smem, warps)
    programs = math.prod(gemm.grid)
    resident = min(occupancy["limit"], -(-programs // sms))
    splits = gemm.args["SPLITS"]
    trips = c["BLOCKS_PER_SPLIT"] * (splits if c["FOLD"] else 1)
    copy = weight_copy(compiled.asm["ttgir"], c["BLOCK_N"])
    ahead = min(copy["ahead"], c["BLOCKS_PER_SPLIT"])
    w_trip, x_trip = c["BLOCK_N"] * 128, c["BLOCK_M"] * 128 * (1 if c["X_CODES"] else 2)  # e4m3 codes or bf16
    m_tiles = gemm.grid[1]
    mmas = sorted({ins.opcode + ins.text.split(ins.opcode, 1)[1].split()[0] for ins in body
                   if ins.opcode in ("QGMMA", "HGMMA", "HMMA")})
    copies = [ins for ins in body if ins.opcode == "LDGSTS"]
    widths = sorted({int(ins.modifiers.rsplit(".", 1)[-1]) // 8 if ins.modifiers.rsplit(".", 1)[-1].isdigit() else 4
                     for ins in copies})  # bytes a thread a copy (LDGSTS.E: 4)
    partial_bytes = splits * m * n * 4 if c["SPLIT_OUT"] else 0
    rounding = launches.get("_act_quant_kernel")
    row = dict(shape=name, m=m, n=n, k=k, block_n=c["BLOCK_N"], block_m=c["BLOCK_M"], split_k=splits,
               blocks_per_split=c["BLOCKS_PER_SPLIT"], fold=c["FOLD"], stages=c["NUM_STAGES"], warps=warps,
               grid=list(gemm.grid), programs=programs, regs=resources["REG"],
               spills=sum(ins.opcode in ("STL", "LDL") for ins in instructions), stack=resources.get("STACK", 0),
               smem=smem, occupancy=occupancy, resident=resident, trips=trips, ahead=ahead, weight_bytes_trip=w_trip,
               x_bytes_trip=x_trip, inflight_sm=resident * ahead * w_trip, inflight_x_sm=resident * ahead * x_trip,
               load=copy["kind"],
               load_widths=widths, copies_trip=len(copies), row_bytes=copy["row_bytes"], mma=mmas,
               insts_trip=[fewest, most],
               cycles_per_kb=[n_ * warps / SCHEDULERS / (w_trip / m_tiles) * 1024 for n_ in (fewest, most)],
               partial_bytes=partial_bytes, weight_bytes=n * k, kernels=len(launches),
               split_sum=("_split_sum_kernel" in launches and
                          ("pdl" if launches["_split_sum_kernel"].constexprs["PDL"] else "launch")),
               rounding=rounding and dict(grid=list(rounding.grid), pdl=bool(c["PDL_WAIT"]),
                                          bytes=m * k * 2 + m * k + m * -(-k // 128) * 4),
               sass="\n".join(ins.text for ins in instructions))
    row["estimate"] = estimate(row, sms)
    return row


def estimate(r: dict, sms: int) -> dict:
    """The modelled time (us) and fraction of the byte floor: see the module docstring. Not a measurement."""
    floor_us = dram_us = fp8_bytes(r["m"], r["n"], r["k"]) / PEAK_TBPS / 1e6
    busiest = -(-r["programs"] // sms)  # programs the busiest SM runs
    sm_bytes = busiest * r["trips"] * (r["weight_bytes_trip"] + r["x_bytes_trip"])
    sm_gbps = min(SM_L2_GBPS, max(r["inflight_sm"] + r["inflight_x_sm"], 1) / LOADED_LATENCY_US / 1e3)
    issue_us = busiest * r["trips"] * r["insts_trip"][0] * r["warps"] / SCHEDULERS / CLOCK_GHZ / 1e3
    partial_us = r["partial_bytes"] / L2_TBPS / 1e6
    stream_us = max(dram_us, sm_bytes / sm_gbps / 1e3, issue_us) + partial_us
    total_us = LAUNCH_US + DRAM_LATENCY_US + stream_us
    for kernel in (r["split_sum"], r["rounding"] and ("pdl" if r["rounding"]["pdl"] else "launch")):
        if kernel:  # a kernel before or after the GEMM: its L2 latency (+ a launch without PDL)
            total_us += L2_LATENCY_US + (0 if kernel == "pdl" else LAUNCH_US)
    if r["split_sum"]:
        total_us += partial_us
    if r["rounding"]:
        total_us += r["rounding"]["bytes"] / L2_TBPS / 1e6
    bound = max((("dram", dram_us), ("in-flight", sm_bytes / sm_gbps / 1e3), ("issue", issue_us)),
                key=lambda item: item[1])[0]
    return dict(floor_us=floor_us, stream_us=stream_us, total_us=total_us, stream_fraction=floor_us / stream_us,
                fraction=floor_us / total_us, bound=bound)


# ---- the report ---------------------------------------------------------------------------------------------
HEADER = (f"{'shape':<13}{'M':>4}{'NxK':>11} {'tile n x m':>10} {'split':>6} {'grid':>6} {'regs':>5} {'spl':>4} "
          f"{'smem KB':>7} {'prog/SM':>7} {'trips':>5} {'ahead':>5} {'B/trip w+x':>11} {'inflight KB w+x':>15} "
          f"{'load':>17} {'mma':>29} {'insts/trip':>10} {'cyc/KB':>7} {'partials':>14} {'sum':>6} {'round':>9} "
          f"{'floor us':>8} {'est us':>7} {'stream':>6} {'total':>6}  bound")


def format_row(r: dict) -> str:
    e = r["estimate"]
    split = f"{r['split_k']}x{r['blocks_per_split']}{'f' if r['fold'] else ''}"
    partials = f"{r['partial_bytes'] / 2**20:.2f}M ({r['partial_bytes'] / r['weight_bytes']:.2f}w)"
    load = f"{r['load']} {'/'.join(map(str, r['load_widths']))}B {r['row_bytes']}B"
    rounding = f"{r['rounding']['grid'][0]}x{r['rounding']['grid'][1]}" if r["rounding"] else "-"
    return (f"{r['shape']:<13}{r['m']:>4}{r['n']:>6}x{r['k']:<4} {r['block_n']:>5}x{r['block_m']:<4} {split:>6} "
            f"{r['programs']:>6} {r['regs']:>5} {r['spills']:>4} {r['smem'] / 1024:>7.1f} "
            f"{r['occupancy']['limit']:>3}/{r['resident']:<3} {r['trips']:>5} {r['ahead']:>5} "
            f"{r['weight_bytes_trip'] // 1024:>5}K+{r['x_bytes_trip'] // 1024:<3}K "
            f"{r['inflight_sm'] // 1024:>6}+{r['inflight_x_sm'] // 1024:<4} "
            f"{load:>17} {','.join(r['mma']):>29} {r['insts_trip'][0]:>4}-{r['insts_trip'][1]:<5} "
            f"{r['cycles_per_kb'][0]:>7.0f} {partials:>14} {r['split_sum'] or '-':>6} {rounding:>9} "
            f"{e['floor_us']:>8.2f} {e['total_us']:>7.2f} "
            f"{100 * e['stream_fraction']:>5.0f}% {100 * e['fraction']:>5.0f}%  {e['bound']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 64, 128])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sass", type=Path, help="write each GEMM build's SASS (<shape>_m<M>.sass) in this folder")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import triton

    from dsv4c.codegen.targets import target

    sms = target("h100").sm_count
    print(f"triton {triton.__version__}, sm_90a, {sms} SMs; SM issue budget at {PEAK_TBPS} TB/s: "
          f"{SCHEDULERS * CLOCK_GHZ * 1e9 * sms / PEAK_TBPS / 1e12 * 1024:.0f} warp-instructions a KB of weight an SM "
          f"= {CLOCK_GHZ * 1e9 * sms / PEAK_TBPS / 1e12 * 1024:.0f} cycles/KB")
    print(HEADER, flush=True)
    rows = []
    for name in args.shapes:
        for m in args.m:
            rows.append(measure(name, m, sms))
            print(format_row(rows[-1]), flush=True)
            if args.sass:
                args.sass.mkdir(parents=True, exist_ok=True)
                (args.sass / f"{name}_m{m}.sass").write_text(rows[-1]["sass"] + "\n")
    print("\nsplit: split_k x blocks a split (f: folded into one program); prog/SM: programs an SM holds / holds in "
          "the first wave; cyc/KB: SM issue cycles a KB of weight read from DRAM (fewest path; at most "
          f"{CLOCK_GHZ * 1e9 * sms / PEAK_TBPS / 1e12 * 1024:.0f} to keep up with {PEAK_TBPS} TB/s); partials: "
          "fp32 split-K bytes each way (and against the weight bytes); sum: the split sum's launch (pdl: as the "
          "GEMM's programmatic dependent); round: the rounding kernel's grid (prequantised x); load: copy widths "
          "a thread, bytes of a weight row a warp's copy covers; est us, stream, total: the model's time and "
          "fractions of the byte floor (estimates, see the docstring)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{key: value for key, value in r.items() if key != "sass"} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
