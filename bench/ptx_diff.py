"""Check that a change leaves the mHC kernels' PTX unchanged: build it before, build it after, diff.

    python bench/ptx_diff.py build /tmp/ptx_before       # with the code before the change
    python bench/ptx_diff.py build /tmp/ptx_after        # with the code after it
    python bench/ptx_diff.py diff /tmp/ptx_before /tmp/ptx_after

`build` compiles, through the ahead-of-time path itself (codegen/aot.py `build_kernels`, Triton's `GPUTarget`:
no GPU needed), every specialisation that path builds for each configuration in `CONFIGS` and each target
(default h100 = sm_90a and gb300 = sm_103a), and writes `<out>/<config>/<sm>/<spec name>.ptx`. A spec's name
hashes the kernel name, its signature, constexprs and launch options (codegen/kernels/launcher.py), so the
same file name before and after means the same specialisation, launched the same way.

`diff` compares the two trees file by file on their instruction text: `normalised_ptx` drops what records
where in the Python source an instruction came from (`.file` / `.loc` directives, `//` comments, the DWARF
`.section .debug_*` blocks), which moves whenever the kernel source is edited or moved, and nothing else.
It prints the count of specialisations compared and every difference, and exits 1 on any (a file only on one
side included).

The configurations cover every branch of the launch heuristics (codegen/kernels/mhc_launch.py: 1-2, 3-8,
9-16 and more tokens), every mHC op, bf16 activations with bf16 and fp32 norm weights at Flash's dimensions,
fp32 activations at the tiny preset's, and n = 3 streams (the unrolled n = 4 paths and the tile paths).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

CONFIGS = {
    "flash_bf16": dict(hidden=4096, hc=4, iters=20, dtype="bfloat16", norm_dtypes=("bfloat16", "float32"),
                       tokens=(1, 2, 3, 8, 9, 16, 17, 64, 65, 256)),
    "tiny_fp32": dict(hidden=128, hc=4, iters=20, dtype="float32", norm_dtypes=("float32",),
                      tokens=(1, 2, 8, 16, 64)),
    "n3_bf16": dict(hidden=200, hc=3, iters=7, dtype="bfloat16", norm_dtypes=("bfloat16",), tokens=(1, 5, 20)),
}
TARGETS = ("h100", "gb300")
_SOURCE_LOCATION = re.compile(r"^\s*\.(loc|file)\b")
_DEBUG_SECTION = re.compile(r"^\s*\.section\s+\.debug")


def build(out: Path, targets: tuple[str, ...]) -> int:
    """Write the PTX of every specialisation of `CONFIGS` for `targets` under `out`; returns how many."""
    os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: this process compiles
    import torch

    from dsv4c.codegen import aot

    count = 0
    for config, c in CONFIGS.items():
        files, _ = aot.build_kernels(targets, hidden=c["hidden"], hc=c["hc"], iters=c["iters"],
                                     dtype=getattr(torch, c["dtype"]), variant_tokens=c["tokens"],
                                     norm_dtypes=[getattr(torch, d) for d in c["norm_dtypes"]],
                                     progress=lambda message, config=config: print(f"{config}: {message}",
                                                                                   flush=True))
        for rel, data in files.items():
            if rel.endswith(".ptx"):
                sm, name = rel.split("/")[-2:]  # kernels/<sm>/<name>.ptx
                path = out / config / sm / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                count += 1
    return count


def normalised_ptx(text: str) -> list[str]:
    """The PTX's instruction text: without source locations (`.loc`, `.file`), comments and debug sections."""
    lines, in_debug = [], False
    for line in text.splitlines():
        if _DEBUG_SECTION.match(line):
            in_debug = True
        if in_debug:
            in_debug = line.strip() != "}"
            continue
        line = line.split("//", 1)[0].rstrip()
        if line.strip() and not _SOURCE_LOCATION.match(line):
            lines.append(line)
    return lines


def diff(before: Path, after: Path) -> int:
    """Print every difference between two `build` trees; returns how many specialisations differ or are
    missing on one side."""
    old = {p.relative_to(before) for p in before.rglob("*.ptx")}
    new = {p.relative_to(after) for p in after.rglob("*.ptx")}
    problems = 0
    for rel in sorted(old ^ new):
        print(f"only in {'before' if rel in old else 'after'}: {rel}")
        problems += 1
    for rel in sorted(old & new):
        a, b = normalised_ptx((before / rel).read_text()), normalised_ptx((after / rel).read_text())
        if a != b:
            problems += 1
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"differs: {rel} ({len(a)} / {len(b)} lines), first at line {first}:\n"
                  f"  before: {a[first] if first < len(a) else '<end>'}\n"
                  f"  after:  {b[first] if first < len(b) else '<end>'}")
    print(f"{len(old & new)} specialisations compared, {problems} differ or are missing on one side")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="write the PTX of every specialisation under OUT")
    build_cmd.add_argument("out", type=Path)
    build_cmd.add_argument("--targets", nargs="+", default=list(TARGETS))
    diff_cmd = commands.add_parser("diff", help="compare two build trees on their instruction text")
    diff_cmd.add_argument("before", type=Path)
    diff_cmd.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        print(f"{build(args.out, tuple(args.targets))} PTX files written under {args.out}")
    else:
        sys.exit(1 if diff(args.before, args.after) else 0)


if __name__ == "__main__":
    main()
