"""Static figures of the fused FP4 MoE's sm_90a build: can `dsv4c::moe_fp4` reach its byte floor on an H100?
No GPU needed.

    python bench/moe_sass.py                 # the kernels' figures, then the estimate per step size
    python bench/moe_sass.py --sass DIR      # also write each kernel's SASS (with source lines) there
    python bench/moe_sass.py --json out.json

Builds codegen/kernels/moe_fp4.py's kernels (and the two routing kernels of moe_route.py) with Triton's
`GPUTarget` for sm_90a at one DeepSeek-V4-Flash layer (256 experts, top 6, D 4096, I 2048, bf16 activations,
W4A8 with the FP8 shared expert's inputs rounded: the faithful default) with h100's launch, disassembles each
cubin with the cuobjdump / nvdisasm that ship with Triton, and prints per kernel:
- programs launched and programs with work at T = 1, 8, 64, 128 tokens (tiles: the expected number of distinct
  experts T top-6 picks of 256 hit, plus T / 16 shared-expert tiles, each `shared_split` times), against 132 SMs;
- registers, spills (local-memory instructions, stack), shared memory, programs an SM (by registers, shared
  memory, warps);
- per GEMM K loop (an innermost backward branch whose body holds the MMAs): the MMA instructions, its global
  loads by width (LDGSTS: cp.async into shared memory, pipelined; LDG: a load into registers), instructions a
  trip, of which the MXFP4 widening (SASS lines of moe_fp4_tiles.py `mxfp4_block`, `_packed_words`, `_bytes`)
  and the e8m0 scales (`e8m0_values`); the weight bytes a trip streams (the design: 128 or 256 rows x 64 bytes of
  codes + 4 of scales a weight for MXFP4, x 128 bytes + scale for FP8), stages (the launch's `num_stages`:
  num_stages - 1 trips in flight), hence bytes in flight a program;
- the issue estimate: warp instructions a weight byte, and the bandwidth an SM's four schedulers could feed at
  1.755 GHz if issuing were the only limit (an SM's share of 3.35 TB/s is 25.4 GB/s).
Then, per T: for each GEMM kernel its programs, waves (programs / (programs an SM x 132)), bytes in flight an
SM in its first wave (resident programs x in flight a program / 132) against Little's law (25.4 GB/s x 1 us
= 25.4 KB), and an estimate of the step's time and of the fraction of the byte floor (the distinct experts',
the shared expert's and the router's bytes at 3.35 TB/s): a GEMM wave of n programs moves their bytes at
min(peak, n x in flight / 1 us, its SMs' issue bound at ISSUE_EFFICIENCY), every other launch takes
LAUNCH_US. The shared expert's weights, read once a tile of 16 selections, count once (L2). These are
estimates from a static model, not timings: the lead's GPU runs (bench/moe_bench.py) are the measure.
Run it under each Triton (3.9 here, 3.6 on the GPU image): they pipeline and allocate differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

E, K, D, I = 256, 6, 4096, 2048
TOKENS = (1, 8, 64, 128)
SMS, PEAK, LATENCY, CLOCK, SCHEDULERS = 132, 3.35e12, 1e-6, 1.755e9, 4
REGISTERS, SMEM, SMEM_RESERVED, MAX_WARPS, MAX_PROGRAMS = 65536, 233472, 1024, 64, 32
LAUNCH_US = 2.0  # least time a launch of a CUDA graph's dependent kernel takes (estimate)
ISSUE_EFFICIENCY = 0.7  # share of cycles an SM's schedulers issue in a GEMM loop (MMA waits, barriers; estimate)
NEEDED = PEAK / SMS * LATENCY  # bytes in flight an SM needs (Little's law)
MXFP4_EXPERT = 3 * I * (D // 2 + D // 32)  # codes and scales of w1, w3, w2 (D x I each)
SHARED_EXPERT = 3 * (I * D + (I // 128) * (D // 128))  # FP8 w1, w3, w2 and their scales
POINTER_TYPES = {"x_ptr": "*bf16", "xr_ptr": "*bf16", "xs_ptr": "*bf16", "hidden_ptr": "*bf16", "out_ptr": "*bf16",
                 "router_ptr": "*bf16", "weights_ptr": "*fp32", "part_ptr": "*fp32", "bias_ptr": "*fp32",
                 "table_ptr": "*i64", "tokens_ptr": "*i64", "sw1_ptr": "*fp8e4nv", "sw3_ptr": "*fp8e4nv",
                 "sw2_ptr": "*fp8e4nv", "ss1_ptr": "*u8", "ss3_ptr": "*u8", "ss2_ptr": "*u8"}
FLOATS = ("routed_limit", "shared_limit", "scale")
SIXTEENS = ("D", "I", "E", "BLOCKS_PER_SPLIT")  # integer arguments whose Flash values Triton specialises
WIDENING = ("mxfp4_block", "_packed_words", "_bytes")  # moe_fp4_tiles.py functions that widen MXFP4 codes
SCALES = ("_mxfp4_scales", "e8m0_values", "e8m0_bits")  # ... and that load and convert e8m0 scales
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[\w]+)*)\s*([^;]*);")
_SOURCE = re.compile(r'//## File "(.*?)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str
    modifiers: str
    operands: str
    source: tuple[str, int]  # (file name, line) of the innermost inlined function
    target: int | None  # a branch's target address


def kernel_specs(launch) -> dict[str, tuple]:
    """name -> (module, function, constexprs, num_warps) for h100's launch, as the host wrapper launches them."""
    import triton.language as tl

    from dsv4c.codegen.kernels import moe_fp4, moe_route
    from dsv4c.codegen.kernels.moe_fp4_launch import DOWN_ROWS

    gemm = dict(BLOCK_M=launch.block_m, ROUTED_ACT="fp8", SHARED_ACT="fp8", PRODUCT=launch.product,
                NATIVE_FP4=False, SHARED_SPLIT=launch.shared_split, ALIGNED=True, NUM_STAGES=launch.num_stages,
                PDL=launch.pdl)
    block_s, block_t = 1 << (7 * 128 - 1).bit_length(), 1 << (-(-7 * 128 // launch.block_m) - 1).bit_length()
    return {
        "router": (moe_route, "_router_kernel", dict(BLOCK_T=launch.block_m, BLOCK_E=launch.router_block_e,
                                                     PRODUCT=launch.product, PDL=launch.pdl), launch.num_warps),
        "route": (moe_route, "_route_kernel", dict(SPLITS=launch.router_splits, TOP_K=K, BLOCK_E=E, BLOCK_K=8,
                                                   SCORING="sqrtsoftplus", HASH=False, NORMALIZE=True,
                                                   PDL=launch.pdl), 4),
        "prepare": (moe_fp4, "_prepare_kernel", dict(BLOCK_M=launch.block_m, BLOCK_S=block_s, BLOCK_E=512,
                                                     BLOCK_T=block_t, ROUTED_ACT="fp8", SHARED_ACT="fp8",
                                                     NATIVE_FP4=False, SHARED_SPLIT=launch.shared_split,
                                                     PDL=launch.pdl), 4),
        "gate_up": (moe_fp4, "_gate_up_kernel", dict(gemm, BLOCK_N=launch.block_n, ACT_DTYPE=tl.bfloat16),
                    launch.num_warps),
        "down": (moe_fp4, "_down_kernel", dict(gemm, BLOCK_N=DOWN_ROWS), launch.num_warps),
        "combine": (moe_fp4, "_combine_kernel", dict(SPLITS=launch.split_k, BLOCK_D=moe_fp4.COMBINE_BLOCK,
                                                     ACT_DTYPE=tl.bfloat16, PDL=launch.pdl), 4),
    }


def build(module, name: str, constexprs: dict, num_warps: int, num_stages: int):
    """The sm_90a build of module.name (pointers and SIXTEENS 16-divisible, as a Flash launch specialises)."""
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds for a GPU it lacks
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.targets import target, triton_gpu_target

    fn = getattr(module, name)
    signature = {arg: "constexpr" if arg in constexprs else POINTER_TYPES.get(arg, "*i32" if arg.endswith("_ptr")
                                                                            else "fp32" if arg in FLOATS else "i32")
                 for arg in fn.arg_names}
    aligned = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg, kind in signature.items()
               if kind.startswith("*") or arg in SIXTEENS}
    return triton.compile(ASTSource(fn, signature, constexprs, aligned), target=triton_gpu_target(target("h100")),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def disassemble(cubin: bytes) -> tuple[list[Instruction], dict[str, int], str]:
    """The cubin's SASS instructions with their source lines, its resource usage (REG, STACK, ...), the listing."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([_tool("nvdisasm"), "-g", "-c", f.name], check=True, capture_output=True,
                                 text=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                               text=True).stdout
    source, parsed, labels, pending = ("", 0), [], {}, []
    for line in listing.splitlines():
        if found := _SOURCE.search(line):
            source = (Path(found.group(1)).name, int(found.group(2)))
        elif found := _LABEL.match(line):
            pending.append(found.group(1))
        elif found := _LINE.search(line):
            address = int(found.group(1), 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            parsed.append((address, found.group(3), found.group(4), found.group(5), source))
    instructions = [Instruction(address, opcode, modifiers, operands, where,
                                labels.get(target.group(1)) if (target := _TARGET.search(operands)) else None)
                    for address, opcode, modifiers, operands, where in parsed]
    resources = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", usage.split("Function", 1)[-1])}
    return instructions, resources, listing


def mma_loops(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The bodies of the innermost loops (backward branches) holding MMAs, in address order."""
    loops = []
    for i, ins in enumerate(instructions):
        head = ins.target if ins.opcode == "BRA" else None
        if head is not None and head < ins.address:
            loops.append([x for x in instructions[:i + 1] if x.address >= head])
    inner = [body for body in loops if any(x.opcode.endswith("GMMA") or x.opcode == "HMMA" for x in body)
             and not any(o is not body and body[0].address <= o[0].address and o[-1].address <= body[-1].address
                         for o in loops)]
    return sorted(inner, key=lambda body: body[0].address)


def _function_lines(*names: str) -> set[tuple[str, int]]:
    """(file name, line) of every line of the named functions that moe_fp4_tiles.py defines or imports."""
    from dsv4c.codegen.kernels import moe_fp4_tiles

    found = set()
    for name in names:
        fn = getattr(moe_fp4_tiles, name).fn
        lines, start = inspect.getsourcelines(fn)
        found |= {(Path(inspect.getsourcefile(fn)).name, start + i) for i in range(len(lines))}
    return found


def load_bytes(ins: Instruction) -> int:
    """Bytes a thread moves with a global load (LDG / LDGSTS), from its width modifier."""
    widths = {".U8": 1, ".S8": 1, ".U16": 2, ".S16": 2, ".64": 8, ".128": 16}
    return next((v for k, v in widths.items() if k in ins.modifiers), 4)


def loop_figures(body: list[Instruction], warps: int, weight_bytes: int, stages: int) -> dict:
    """One GEMM loop: MMAs, loads, instructions a trip (and the widening's, the scales'), bytes and issue."""
    widening, scales = _function_lines(*WIDENING), _function_lines(*SCALES)
    loads: dict[str, int] = {}
    for ins in body:
        if ins.opcode in ("LDG", "LDGSTS"):
            key = f"{ins.opcode}.{load_bytes(ins)}B"
            loads[key] = loads.get(key, 0) + 1
    mmas = sorted({ins.opcode + ins.modifiers for ins in body if ins.opcode.endswith("GMMA") or ins.opcode == "HMMA"})
    per_byte = len(body) * warps / weight_bytes
    return dict(mmas=mmas, mma_count=sum(ins.opcode.endswith("GMMA") or ins.opcode == "HMMA" for ins in body),
                loads=loads, requested=sum(load_bytes(ins) * 32 * warps for ins in body
                                           if ins.opcode in ("LDG", "LDGSTS")),
                instructions=len(body), widening=sum(ins.source in widening for ins in body),
                scales=sum(ins.source in scales for ins in body),
                sync=sum(ins.opcode in ("BAR", "MEMBAR", "DEPBAR", "WARPGROUP") for ins in body),
                weight_bytes=weight_bytes, in_flight=(stages - 1) * weight_bytes, per_byte=per_byte,
                issue_gbps=SCHEDULERS * CLOCK / per_byte / 1e9)


def occupancy(regs: int, smem: int, warps: int) -> int:
    """Programs an SM holds: registers (256 a warp granule), shared memory (1 KB reserved a program), warps."""
    per_warp = -(-regs * 32 // 256) * 256
    return max(0, min(REGISTERS // (per_warp * warps), SMEM // (smem + SMEM_RESERVED), MAX_WARPS // warps,
                      MAX_PROGRAMS))


def tiles(t: int, block_m: int) -> tuple[float, int]:
    """(routed tiles, shared tiles) a step of t tokens expects: distinct experts of t x K uniform picks (none
    picked more than block_m times at these sizes), and the shared expert's t selections in tiles."""
    return E * (1 - (1 - K / E) ** t), -(-t // block_m)


def grids(launch, t: int) -> dict[str, tuple[int, float, float]]:
    """kernel -> (programs launched, routed programs with work, shared programs with work) at t tokens."""
    from dsv4c.codegen.kernels.moe_fp4_launch import DOWN_ROWS

    s, bm = t * (K + 1), launch.block_m
    most = -(-s // bm) + min(E + 1, s) + (launch.shared_split - 1) * -(-t // bm)
    routed, shared = tiles(t, bm)
    shared *= launch.shared_split
    gate_up, down = I // launch.block_n, -(-D // DOWN_ROWS) * launch.split_k
    router = -(-t // bm) * -(-E // launch.router_block_e) * launch.router_splits
    return {"router": (router, router, 0), "route": (t, t, 0), "prepare": (E + 1, E + 1, 0),
            "gate_up": (most * gate_up, routed * gate_up, shared * gate_up),
            "down": (most * down, routed * down, shared * down),
            "combine": (t * -(-D // 1024), t * -(-D // 1024), 0)}


def stream_bytes(launch) -> dict[tuple[str, str], int]:
    """(kernel, loop) -> weight bytes a trip streams (codes and scales), by the kernels' design."""
    from dsv4c.codegen.kernels.moe_fp4_launch import DOWN_ROWS

    mxfp4, fp8 = 128 // 2 + 128 // 32, 128
    shared_rows = {"gate_up": launch.block_n // launch.shared_split, "down": DOWN_ROWS // launch.shared_split}
    return {("gate_up", "mxfp4"): 2 * launch.block_n * mxfp4, ("gate_up", "fp8"): 2 * shared_rows["gate_up"] * fp8,
            ("down", "mxfp4"): DOWN_ROWS * mxfp4, ("down", "fp8"): shared_rows["down"] * fp8}


def measure(launch, sass_dir: Path | None) -> dict[str, dict]:
    """Each kernel's build figures (and its GEMM loops', labelled by their MMA's N: 4 block_m the MXFP4 loop's
    diagonal operand, block_m or less the FP8 loop's: a share of block_m when its rows are one warpgroup's M)."""
    streams, out = stream_bytes(launch), {}
    for name, (module, fn, constexprs, warps) in kernel_specs(launch).items():
        compiled = build(module, fn, constexprs, warps, launch.num_stages)
        instructions, resources, listing = disassemble(compiled.asm["cubin"])
        if sass_dir:
            (sass_dir / f"{name}.sass").write_text(listing)
        smem = compiled.metadata.shared
        loops = {}
        for body in mma_loops(instructions):
            n = next(int(m.group(1)) for ins in body if (m := re.search(r"64x(\d+)x", ins.modifiers)))
            kind = "mxfp4" if n == 4 * launch.block_m else "fp8" if n <= launch.block_m else f"n{n}"
            weight = streams.get((name, kind), 0)
            loops[kind] = loop_figures(body, warps, weight, launch.num_stages) if weight else dict(
                instructions=len(body), mmas=sorted({i.opcode + i.modifiers for i in body if "MMA" in i.opcode}))
        out[name] = dict(regs=resources.get("REG", 0), stack=resources.get("STACK", 0),
                         spills=sum(ins.opcode in ("LDL", "STL") for ins in instructions), smem=smem, warps=warps,
                         occupancy=occupancy(resources.get("REG", 0), smem, warps), loops=loops)
    return out


def _gemm_seconds(loops: dict, occupancy: int, programs: tuple[float, float], trips: int) -> tuple[float, dict]:
    """A GEMM kernel's estimated seconds for (routed, shared) programs with work, wave by wave: a wave of n
    programs moves n x their mean bytes at min(peak, bytes in flight / LATENCY, what its SMs can issue)."""
    mx, fp = loops["mxfp4"], loops["fp8"]
    routed, shared = programs
    working, capacity = routed + shared, occupancy * SMS
    mean_flight = (routed * mx["in_flight"] + shared * fp["in_flight"]) / working
    mean_bytes = trips * (routed * mx["weight_bytes"] + shared * fp["weight_bytes"]) / working
    issue_per_sm = min(mx["issue_gbps"], fp["issue_gbps"]) * 1e9 * ISSUE_EFFICIENCY
    seconds, left, first = 0.0, working, None
    while left > 0:
        n = min(left, capacity)
        rate = min(PEAK, n * mean_flight / LATENCY, min(n, SMS) * issue_per_sm)
        seconds += n * mean_bytes / rate
        first = first or dict(programs=working, waves=working / capacity, resident_per_sm=n / SMS,
                              in_flight_kb=n * mean_flight / SMS / 1e3, bound=rate / PEAK)
        left -= n
    return seconds, first


def estimate(figures: dict, launch, t: int) -> dict:
    """The step's estimated time at t tokens (GEMMs wave by wave, every other launch LAUNCH_US) against its
    byte floor (the distinct experts' bytes, the shared expert's and the router's at the peak)."""
    routed = tiles(t, launch.block_m)[0]
    floor = (routed * MXFP4_EXPERT + SHARED_EXPERT + E * D * 2) / PEAK
    trips = {"gate_up": D // 128, "down": -(-(I // 128) // launch.split_k)}
    seconds, rows = 0.0, {}
    for name, (_, routed_programs, shared_programs) in grids(launch, t).items():
        if name in trips:
            kernel, rows[name] = _gemm_seconds(figures[name]["loops"], figures[name]["occupancy"],
                                               (routed_programs, shared_programs), trips[name])
            seconds += max(LAUNCH_US * 1e-6, kernel)
        else:
            seconds += LAUNCH_US * 1e-6
    return dict(t=t, floor_us=floor * 1e6, estimate_us=seconds * 1e6, fraction=floor / seconds, gemms=rows)


def report(figures: dict, launch, estimates: list[dict]) -> str:
    import triton

    lines = [f"triton {triton.__version__}, sm_90a (h100), E {E}, top {K}, D {D}, I {I}, bf16, W4A8 + FP8 shared; "
             f"{launch}"]
    for name, f in figures.items():
        grid = "  ".join(f"T={t}: {g[0]} launched / {g[1] + g[2]:.0f} with work"
                         for t in TOKENS for g in [grids(launch, t)[name]])
        lines += [f"\n{name}: {f['warps']} warps, {f['regs']} registers, stack {f['stack']} B, {f['spills']} spill "
                  f"instructions, {f['smem'] / 1024:.1f} KB shared, {f['occupancy']} programs an SM", f"  grid: {grid}"]
        for kind, loop in f["loops"].items():
            lines.append(f"  {kind} loop: {loop['instructions']} instructions a trip, MMA {', '.join(loop['mmas'])}")
            if "loads" in loop:
                lines.append(
                    f"    loads a trip: {loop['loads']} ({loop['requested'] / 1024:.1f} KB requested, all lanes); "
                    f"weights {loop['weight_bytes'] / 1024:.1f} KB a trip, {loop['in_flight'] / 1024:.1f} KB in "
                    f"flight a program ({launch.num_stages} stages)")
                lines.append(
                    f"    widening {loop['widening']}, e8m0 scales {loop['scales']}, sync {loop['sync']} of "
                    f"{loop['instructions']}; {loop['per_byte']:.3f} warp instructions a weight byte -> issue "
                    f"bound {loop['issue_gbps']:.0f} GB/s an SM (its share of the peak: {PEAK / SMS / 1e9:.1f})")
    lines.append(f"\nestimate (in flight needed an SM: {NEEDED / 1e3:.1f} KB; issue at {ISSUE_EFFICIENCY:.0%}; "
                 f"launches >= {LAUNCH_US} us):")
    for e in estimates:
        gemms = "; ".join(f"{k}: {r['programs']:.0f} programs ({r['waves']:.2f} waves), {r['resident_per_sm']:.2f} "
                          f"an SM, {r['in_flight_kb']:.0f} KB in flight an SM, {r['bound']:.0%} of the peak"
                          for k, r in e["gemms"].items())
        lines.append(f"  T={e['t']}: floor {e['floor_us']:.0f} us, estimate {e['estimate_us']:.0f} us = "
                     f"{e['fraction']:.0%} of the floor ({gemms})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", type=Path, help="write each kernel's SASS listing to this folder")
    parser.add_argument("--json", type=Path, help="write the figures and estimates here")
    args = parser.parse_args()
    from dsv4c.codegen.kernels.moe_fp4_launch import moe_fp4_launch
    from dsv4c.codegen.targets import target

    launch = moe_fp4_launch(target("h100"), E, K, D, I, "w4a8", True)
    if args.sass:
        args.sass.mkdir(parents=True, exist_ok=True)
    figures = measure(launch, args.sass)
    estimates = [estimate(figures, launch, t) for t in TOKENS]
    print(report(figures, launch, estimates))
    if args.json:
        args.json.write_text(json.dumps(dict(launch=dataclasses.asdict(launch), figures=figures,
                                             estimates=estimates), indent=1))


if __name__ == "__main__":
    main()
