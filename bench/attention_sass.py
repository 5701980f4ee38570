"""Static instruction count of the sparse decode attention kernel's key loops in its sm_90a build (no GPU needed).

    python bench/attention_sass.py                  # the four Flash builds, one table
    python bench/attention_sass.py --sass /tmp/s    # also write each build's SASS there
    python bench/attention_sass.py --kernels _split_kernel --layers C4

Builds codegen/kernels/attention.py's split and folded kernels with Triton's `GPUTarget` for sm_90a (h100), at
Flash's sizes: 64 heads, 512 dims (448 e4m3 in blocks of 64 + 64 bf16: 584-byte rows), a window of 128, and
both compressed layers, C4 (top-512 selected entries) and C128 (every complete entry), with h100's launch for
640 keys (the launch's tiles and warps do not depend on the key count). It disassembles the cubin with the
cuobjdump that ships with Triton and finds the key loops: the innermost backward branches whose bodies hold
the MMAs (HGMMA / HMMA; the window's loop, then the entries', where the kernel has two). It prints, a build:
the registers and stack frame (`cuobjdump -res-usage`), the spill instructions (LDL / STL) of the whole
kernel, and per loop the instructions of its body per key, split by kind (each SASS opcode counts once,
predicated or not, as the schedulers issue it). `path min` and `path max` are the fewest and the most
instructions one trip through the body issues (forward branches inside it skip blocks: the output's rescale,
taken only when a running maximum grows past the slack); `static` counts every instruction of the body once;
`outside the loops` counts the rest of the kernel (a program's set-up, pipeline prologues, epilogue), once a
program. Then a query's 640 keys (128 window keys, 512 entries: C4 and C128 alike at 64K context) weighted by
loop.

Issue estimate: a program of W warps issues (instructions a thread per tile) x W warp-instructions a tile on
an SM's 4 schedulers, one a cycle each, one program an SM (255 registers a thread), so
cycles a key = instructions per tile x W / 4 / BLOCK_N. It is a lower bound (no stalls) to set against the
tensor-core time and the byte floor (584 bytes a key at the copy bandwidth), an estimate, not a timing.
Run it under each Triton (the GPU image's 3.6 and CI's 3.9): they pipeline and allocate differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path

HEADS, WIDTH, ROUNDED, QBLOCK, WINDOW, ROW_BYTES, KEYS = 64, 512, 448, 64, 128, 584, 640
WINDOW_KEYS, ENTRY_KEYS = 128, 512  # a query's keys at 64K context, C4 (top-512) and C128 (65536 / 128) alike
LAYERS = {"C4": dict(ratio=4, sparse=True), "C128": dict(ratio=128, sparse=False)}
KERNELS = ("_split_kernel", "_folded_kernel")
POINTER_TYPES = {"q_ptr": "*bf16", "out_ptr": "*bf16", "new_ptr": "*u8", "ring_ptr": "*u8", "cache_ptr": "*u8",
                 "ids_ptr": "*i64", "start_ptr": "*i64", "sink_ptr": "*fp32", "acc_ptr": "*fp32", "ml_ptr": "*fp32",
                 "merged_ptr": "*fp32"}
SCHEDULERS = 4  # warp schedulers an SM, one instruction a cycle each
KINDS = {  # SASS opcode (before the first '.') -> kind; anything else is "other"
    "mma": {"HGMMA", "HMMA", "WARPGROUP"},
    "load/store": {"LDG", "LDGSTS", "LDS", "LDSM", "STS", "STG", "LD", "ST", "STSM", "LDGDEPBAR", "DEPBAR", "UBLKCP",
                   "UTMALDG", "SYNCS"},
    "spill": {"LDL", "STL"},
    "int/addr": {"IMAD", "IADD3", "IADD", "LEA", "SHF", "LOP3", "ISETP", "SEL", "IMNMX", "VIMNMX", "IABS", "ICMP",
                 "FLO", "POPC", "BMSK", "SGXT", "BREV", "R2UR", "UIADD3", "UIMAD", "ULEA", "USHF", "ULOP3", "UISETP",
                 "USEL", "UMOV", "S2UR", "S2R", "CS2R", "VIADD", "IMUL", "VIADDMNMX", "UPRMT", "UFLO", "UPOPC",
                 "PLOP3", "P2R", "R2P", "MOV", "MOV32I"},
    "convert": {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "PRMT", "I2I", "I2IP", "HADD2", "HMUL2", "HFMA2"},
    "exp/fp32": {"MUFU", "FMUL", "FADD", "FFMA", "FMNMX", "FSETP", "FSEL", "FSWZADD", "FCHK", "FRND"},
    "shuffle": {"SHFL", "VOTE", "VOTEU", "REDUX", "MATCH"},
    "barrier": {"BAR", "MEMBAR", "WARPSYNC", "BSSY", "BSYNC", "FENCE", "ERRBAR", "CCTL", "NANOSLEEP"},
    "branch": {"BRA", "EXIT", "RET", "CALL", "JMP", "BRX"},
}
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)\s*([^;]*);")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    predicated: bool
    opcode: str  # without modifiers
    text: str

    @property
    def kind(self) -> str:
        return next((kind for kind, ops in KINDS.items() if self.opcode in ops), "other")

    def branch_target(self) -> int | None:
        if self.opcode != "BRA":
            return None
        found = re.search(r"0x([0-9a-f]+)", self.text)
        return int(found.group(1), 16) if found else None


def build(kernel: str, layer: str) -> tuple[bytes, object]:
    """The sm_90a cubin of `kernel` for `layer` at Flash's sizes, and its launch."""
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds for a GPU it lacks
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import attention
    from dsv4c.codegen.targets import target, triton_gpu_target

    gpu = target("h100")
    launch = attention.attention_launch(1, HEADS, KEYS, gpu.sm_count)
    constexprs = {**attention.kernel_constexprs(WINDOW, LAYERS[layer]["ratio"], LAYERS[layer]["sparse"], WIDTH,
                                                ROUNDED, QBLOCK, ROW_BYTES, launch), "PDL": True}
    fn = getattr(attention, kernel)
    signature = {name: "constexpr" if name in constexprs else POINTER_TYPES.get(name, "fp32" if name == "scale"
                                                                                  else "i32")
                 for name in fn.arg_names}
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in POINTER_TYPES
               if name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, aligned), target=triton_gpu_target(gpu),
                              options=launch.options())
    return compiled.asm["cubin"], launch


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def disassemble(cubin: bytes) -> tuple[list[Instruction], dict[str, int]]:
    """The SASS instructions of the cubin's one kernel, and its resource usage (REG, STACK, SHARED, ...)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True, capture_output=True, text=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                               text=True).stdout
    instructions = [Instruction(int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(0))
                    for m in map(_LINE.search, sass.splitlines()) if m]
    resources = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage.split("Function", 1)[-1])}
    return instructions, resources


def key_loops(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The bodies of the innermost loops (backward branches) that hold MMAs, in address order: the window's and
    the entries' key loops (a body runs from its head to its backward branch)."""
    loops = []
    for i, ins in enumerate(instructions):
        head = ins.branch_target()
        if head is not None and head < ins.address:
            loops.append([x for x in instructions[:i + 1] if x.address >= head])
    inner = [body for body in loops if any(x.kind == "mma" for x in body)
             and not any(other is not body and body[0].address <= other[0].address
                         and other[-1].address <= body[-1].address for other in loops)]
    if not inner:
        raise ValueError("no loop with MMAs in the SASS")
    return sorted(inner, key=lambda body: body[0].address)


def path_lengths(body: list[Instruction]) -> tuple[int, int]:
    """The fewest and the most instructions one trip from the body's head to its backward branch issues."""
    index = {ins.address: i for i, ins in enumerate(body)}
    shortest, longest = [0] * (len(body) + 1), [0] * (len(body) + 1)  # from instruction i to the trip's end
    for i in range(len(body) - 1, -1, -1):
        ins = body[i]
        target = ins.branch_target()
        successors = []
        if i == len(body) - 1:
            successors = [len(body)]  # the backward branch ends the trip (taken or not)
        elif target is not None and target > ins.address:  # forward branch inside the body (or out of it)
            successors = [index.get(target, len(body))]
            if ins.predicated:
                successors.append(i + 1)
        elif ins.opcode in ("EXIT", "RET") and not ins.predicated:
            successors = [len(body)]
        else:
            successors = [i + 1]
        shortest[i] = 1 + min(shortest[s] for s in successors)
        longest[i] = 1 + max(longest[s] for s in successors)
    return shortest[0], longest[0]


def loop_counts(body: list[Instruction]) -> dict:
    kinds = {kind: 0 for kind in (*KINDS, "other")}
    for ins in body:
        kinds[ins.kind] += 1
    shortest, longest = path_lengths(body)
    return dict(kinds=kinds, static=len(body), shortest=shortest, longest=longest)


def measure(kernel: str, layer: str) -> dict:
    """One build's resources and its key loops' counts (the window's loop first where there are two)."""
    cubin, launch = build(kernel, layer)
    instructions, resources = disassemble(cubin)
    loops = key_loops(instructions)
    names = ["window", "entries"] if len(loops) == 2 else [f"loop {i}" for i in range(len(loops))]
    return dict(name=f"{kernel.strip('_').split('_')[0]} {layer}", block_n=launch.block_n, warps=launch.num_warps,
                regs=resources["REG"], stack=resources["STACK"],
                spills=sum(ins.kind == "spill" for ins in instructions),
                loops={name: loop_counts(body) for name, body in zip(names, loops)},
                outside=sum(ins.opcode != "NOP" and not any(body[0].address <= ins.address <= body[-1].address
                                                             for body in loops) for ins in instructions),
                sass="\n".join(ins.text for ins in instructions))


def issue_cycles(instructions: float, r: dict) -> float:
    """SM issue cycles a key for `instructions` a thread a tile (one program an SM, SCHEDULERS issue a cycle)."""
    return instructions * r["warps"] / SCHEDULERS / r["block_n"]


def report(rows: list[dict]) -> str:
    import triton

    columns = [(r, name, loop) for r in rows for name, loop in r["loops"].items()]
    cell = lambda values: "".join(f"{v:>14}" for v in values)  # noqa: E731
    lines = [f"triton {triton.__version__}, sm_90a, {HEADS} heads x {WIDTH} dims, {ROW_BYTES}-byte rows; "
             f"key loop instructions a thread ({WINDOW_KEYS} window keys + {ENTRY_KEYS} entries a query)",
             f"{'':24}" + cell(r["name"] for r, _, _ in columns),
             f"{'loop':24}" + cell(name for _, name, _ in columns),
             f"{'tile keys x warps':24}" + cell(f"{r['block_n']} x {r['warps']}" for r, _, _ in columns),
             f"{'registers / stack B':24}" + cell(f"{r['regs']} / {r['stack']}" for r, _, _ in columns),
             f"{'spill insts (kernel)':24}" + cell(r["spills"] for r, _, _ in columns)]
    for kind in (*KINDS, "other"):
        lines.append(f"{kind + ' a key':24}" + cell(f"{loop['kinds'][kind] / r['block_n']:.1f}"
                                                    for r, _, loop in columns))
    lines.append(f"{'static a tile':24}" + cell(loop["static"] for _, _, loop in columns))
    lines.append(f"{'path min / max a tile':24}" + cell(f"{loop['shortest']} / {loop['longest']}"
                                                        for _, _, loop in columns))
    lines.append(f"{'path min / max a key':24}" + cell(f"{loop['shortest'] / r['block_n']:.1f} / "
                                                       f"{loop['longest'] / r['block_n']:.1f}"
                                                       for r, _, loop in columns))
    lines.append(f"{'issue cycles a key (SM)':24}" + cell(f"{issue_cycles(loop['shortest'], r):.0f}-"
                                                          f"{issue_cycles(loop['longest'], r):.0f}"
                                                          for r, _, loop in columns))
    lines.append(f"{'outside the loops':24}" + cell(r["outside"] for r, _, _ in columns))
    lines.append("")
    lines.append(f"a query's {WINDOW_KEYS + ENTRY_KEYS} keys, weighted by loop (min path - max path):")
    for r in rows:
        loops = r["loops"]
        weights = ({"window": WINDOW_KEYS, "entries": ENTRY_KEYS} if set(loops) == {"window", "entries"}
                   else {name: WINDOW_KEYS + ENTRY_KEYS for name in loops} if len(loops) == 1 else None)
        if weights is None:
            continue
        per_key = [sum(weights[n] * loops[n][k] for n in loops) / (WINDOW_KEYS + ENTRY_KEYS) / r["block_n"]
                   for k in ("shortest", "longest")]
        cycles = [issue_cycles(k * r["block_n"], r) for k in per_key]
        lines.append(f"  {r['name']:12} {per_key[0]:6.1f} - {per_key[1]:6.1f} instructions a key a thread, "
                     f"{cycles[0]:4.0f} - {cycles[1]:4.0f} issue cycles a key an SM")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sass", type=Path, help="write each build's SASS (<kernel>_<layer>.sass) in this folder")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=KERNELS)
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    args = parser.parse_args()
    rows = [measure(kernel, layer) for kernel in args.kernels for layer in args.layers]
    if args.sass:
        args.sass.mkdir(parents=True, exist_ok=True)
        for r in rows:
            (args.sass / f"{r['name'].replace(' ', '_')}.sass").write_text(r["sass"] + "\n")
    print(report(rows))


if __name__ == "__main__":
    main()
