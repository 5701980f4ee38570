"""The fused MoE's kernels built ahead of time (no GPU: Triton's `GPUTarget`, in a spawned child without
TRITON_INTERPRET), checked in the PTX: on sm_90a W4A8 multiplies on Hopper's FP8 tensor cores (wgmma with
e4m3 operands) and never through bf16; on sm_103a native W4A4 multiplies MXFP4 x MXFP4 with block scales
(tcgen05.mma kind::mxf4), the shared expert's FP8 on kind::f8f6f4. The down kernel carries both the routed
and the shared expert's products (the gate/up kernel has the same two K loops twice); its launch is the
target's own (codegen/kernels/moe_fp4_launch.py) at Flash's sizes. The routing kernels build for sm_90a too:
the router's logits of bf16 activations on bf16 wgmma (exact products, fp32 sums), the selection (score- and
hash-routed) without an MMA. Blackwell code is never run here.

The sm_90a SASS of the expert GEMMs (cuobjdump from Triton's wheel; h100's launch at Flash's sizes), what a
memory-bound step needs to approach its byte floor (bench/moe_sass.py measures it): each kernel's K loops (the
innermost loops holding the MMAs) are an MXFP4 loop whose one FP8 wgmma a weight and step is N = 4 block_m wide
(the four scale groups' diagonal operand) and the shared expert's FP8 loop (its rows split over two programs, the
down kernel's rounding its operand on load) of N = block_m (block_m / 2 in the gate/up kernel: its 64 rows are
one warpgroup's M, so the two warpgroups share the N side); both stream their weights with 16-byte
cp.async (LDGSTS.128, pipelined; mutation run: the MXFP4 rows' alignment hint removed, 8-byte copies), the
MXFP4 loop loads nothing synchronously (no LDG: its scales and operand are pipelined too; mutation run: the
scales loaded byte by byte); nothing spills (no local memory, no stack; mutation run: four warps)."""

import importlib.util
import os
import re

import pytest
import torch
from child_pool import child_pool

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
MMA = re.compile(r"(tcgen05\.mma[.\w:]*|wgmma\.mma_async[.\w]*|mma\.sync[.\w]*)")


def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _down_kernel_mmas(target_name: str, activations: str) -> tuple[list[str], str, bool]:
    """The distinct MMA instructions of the down kernel built for `target_name` (bf16 activations, faithful
    shared expert), its `.target` line, and whether it waits for its predecessor grid (programmatic dependent
    launch: `griddepcontrol.wait`)."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import moe_fp4 as kernels
    from dsv4c.codegen.kernels.moe_fp4_launch import moe_fp4_launch
    from dsv4c.codegen.targets import target, triton_gpu_target

    launch = moe_fp4_launch(target(target_name), 256, 6, 4096, 2048, activations, True)
    fn = kernels._down_kernel
    signature = {"hidden_ptr": "*bf16", "sorted_ptr": "*i32", "tile_expert_ptr": "*i32", "n_tiles_ptr": "*i32",
                 "table_ptr": "*i64", "sw2_ptr": "*fp8e4nv", "ss2_ptr": "*u8", "part_ptr": "*fp32", "D": "i32",
                 "I": "i32", "K": "i32", "E": "i32", "S": "i32", "BLOCKS_PER_SPLIT": "i32"}
    constexprs = dict(BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, ROUTED_ACT=kernels.ACT_ROUNDING[activations],
                      SHARED_ACT="fp8", PRODUCT=launch.product, NATIVE_FP4=launch.native_fp4,
                      SHARED_SPLIT=launch.shared_split, ALIGNED=True, NUM_STAGES=launch.num_stages, PDL=launch.pdl)
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*") or name in ("D", "I")}
    source = ASTSource(fn, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs, aligned)
    ptx = triton.compile(source, target=triton_gpu_target(target(target_name)),
                         options={"num_warps": launch.num_warps, "num_stages": launch.num_stages}).asm["ptx"]
    return (sorted(set(MMA.findall(ptx))), next(line for line in ptx.splitlines() if line.startswith(".target")),
            "griddepcontrol.wait" in ptx)


def _mmas(fn, signature: dict[str, str], constexprs: dict, target_name: str, num_warps: int) -> list[str]:
    """The distinct MMA instructions of `fn` built for `target_name` (pointers and D 16-byte aligned)."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.targets import target, triton_gpu_target

    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*") or name == "D"}
    source = ASTSource(fn, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs, aligned)
    ptx = triton.compile(source, target=triton_gpu_target(target(target_name)),
                         options={"num_warps": num_warps}).asm["ptx"]
    return sorted(set(MMA.findall(ptx)))


def _routing_kernel_mmas() -> dict[str, list[str]]:
    """The MMAs of the router (bf16 activations and router, h100's launch at Flash's sizes) and of the
    selection kernel, score- and hash-routed, built for sm_90a."""
    from dsv4c.codegen.kernels import moe_route
    from dsv4c.codegen.kernels.moe_fp4_launch import moe_fp4_launch
    from dsv4c.codegen.targets import target

    launch = moe_fp4_launch(target("h100"), 256, 6, 4096, 2048, "w4a8", True)
    router = {"x_ptr": "*bf16", "router_ptr": "*bf16", "part_ptr": "*fp32", "N": "i32", "D": "i32", "E": "i32",
              "BLOCKS_PER_SPLIT": "i32"}
    found = {"router": _mmas(moe_route._router_kernel, router, dict(BLOCK_T=launch.block_m,
                             BLOCK_E=launch.router_block_e, PRODUCT=launch.product, PDL=launch.pdl), "h100",
                             launch.num_warps)}
    select = {"part_ptr": "*fp32", "bias_ptr": "*fp32", "table_ptr": "*i32", "tokens_ptr": "*i64", "ids_ptr": "*i32",
              "weights_ptr": "*fp32", "N": "i32", "E": "i32", "scale": "fp32"}
    for hashed in (False, True):
        constexprs = dict(SPLITS=launch.router_splits, TOP_K=6, BLOCK_E=256, BLOCK_K=8, SCORING="sqrtsoftplus",
                          HASH=hashed, NORMALIZE=True, PDL=launch.pdl)
        found["hash" if hashed else "score"] = _mmas(moe_route._route_kernel, select, constexprs, "h100", 4)
    return found


@pytest.fixture(scope="module")
def built():
    with child_pool(_start_compiler) as pool:
        found = {key: pool.submit(_down_kernel_mmas, *key).result() for key in (("h100", "w4a8"), ("gb300", "w4a4"))}
        return {**found, "routing": pool.submit(_routing_kernel_mmas).result()}


def test_sm90a_w4a8_multiplies_on_fp8_wgmma(built):
    mmas, target_line, waits = built["h100", "w4a8"]
    assert target_line == ".target sm_90a" and waits  # launched as its predecessor's programmatic dependent
    assert mmas and all(m.startswith("wgmma.mma_async") and m.endswith(".f32.e4m3.e4m3") for m in mmas), mmas


def test_sm103a_w4a4_multiplies_on_tcgen05_mxf4(built):
    mmas, target_line, waits = built["gb300", "w4a4"]
    assert target_line == ".target sm_103a" and waits
    assert any("kind::mxf4.block_scale" in m for m in mmas), mmas  # the routed experts: MXFP4 x MXFP4
    assert any("kind::f8f6f4" in m for m in mmas), mmas  # the shared expert: FP8 x FP8
    assert not any(m.startswith(("wgmma", "mma.sync")) for m in mmas), mmas


def test_sm90a_routing_builds_with_the_router_on_bf16_wgmma(built):
    routing = built["routing"]
    assert routing["router"] and all(m.startswith("wgmma.mma_async") and m.endswith(".f32.bf16.bf16")
                                     for m in routing["router"]), routing["router"]
    assert routing["score"] == routing["hash"] == []


# ---- the sm_90a SASS of the expert GEMMs -----------------------------------------------------------------------
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.\w+)*)\s*([^;]*);")


def _gemm_sass(kernel: str) -> tuple[list[list[str]], list[str], str]:
    """(the K loops' instructions, every instruction, the resource usage) of `kernel` (gate_up or down) built for
    sm_90a with h100's launch at Flash's sizes, bf16 activations, faithful numerics."""
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    import triton.language as tl
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import moe_fp4 as kernels
    from dsv4c.codegen.kernels.moe_fp4_launch import DOWN_ROWS, moe_fp4_launch
    from dsv4c.codegen.targets import target, triton_gpu_target

    launch = moe_fp4_launch(target("h100"), 256, 6, 4096, 2048, "w4a8", True)
    fn = kernels._gate_up_kernel if kernel == "gate_up" else kernels._down_kernel
    constexprs = dict(BLOCK_M=launch.block_m, BLOCK_N=launch.block_n if kernel == "gate_up" else DOWN_ROWS,
                      ROUTED_ACT="fp8", SHARED_ACT="fp8", PRODUCT=launch.product, NATIVE_FP4=False,
                      SHARED_SPLIT=launch.shared_split, ALIGNED=True, NUM_STAGES=launch.num_stages, PDL=launch.pdl,
                      **(dict(ACT_DTYPE=tl.bfloat16) if kernel == "gate_up" else {}))
    pointers = {"table_ptr": "*i64", "weights_ptr": "*fp32", "part_ptr": "*fp32", "sw1_ptr": "*fp8e4nv",
                "sw3_ptr": "*fp8e4nv", "sw2_ptr": "*fp8e4nv", "ss1_ptr": "*u8", "ss3_ptr": "*u8", "ss2_ptr": "*u8"}
    signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "*bf16" if arg.startswith(("x", "h"))
                                                                           else "*i32") if arg.endswith("_ptr")
                 else "fp32" if arg.endswith("limit") else "i32" for arg in fn.arg_names}
    aligned = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg, kind in signature.items()
               if kind.startswith("*") or arg in ("D", "I", "E", "BLOCKS_PER_SPLIT")}
    cubin = triton.compile(ASTSource(fn, signature, constexprs, aligned), target=triton_gpu_target(target("h100")),
                           options={"num_warps": launch.num_warps, "num_stages": launch.num_stages}).asm["cubin"]
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], check=True, capture_output=True, text=True).stdout
        usage = subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    lines = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(SASS_LINE.search, sass.splitlines()) if m]
    loops = []
    for i, (address, op, operands) in enumerate(lines):
        target_address = re.search(r"0x([0-9a-f]+)", operands) if op == "BRA" else None
        if target_address and int(target_address.group(1), 16) < address:
            head = int(target_address.group(1), 16)
            loops.append([x for x in lines[:i + 1] if x[0] >= head])
    inner = [[op for _, op, _ in body] for body in loops if any("GMMA" in op for _, op, _ in body)
             and not any(o is not body and body[0][0] <= o[0][0] and o[-1][0] <= body[-1][0] for o in loops)]
    return inner, [op for _, op, _ in lines], usage


@pytest.fixture(scope="module")
def gemm_sass():
    with child_pool(_start_compiler) as pool:
        return {kernel: pool.submit(_gemm_sass, kernel).result() for kernel in ("gate_up", "down")}


# the shared expert's FP8 loop (h100 splits its rows over two programs): 128 down rows a program, one M of 64 a
# warpgroup; 64 gate/up rows a program, one warpgroup's M, so the two warpgroups share the 16 selections
FP8_WGMMA = {"gate_up": "QGMMA.64x8x32.F32.E4M3.E4M3", "down": "QGMMA.64x16x32.F32.E4M3.E4M3"}


@pytest.mark.parametrize("kernel", ["gate_up", "down"])
def test_sm90a_gemm_loops_stream_16_byte_cp_async_without_spills(gemm_sass, kernel):
    loops, instructions, usage = gemm_sass[kernel]
    mmas = [sorted({op for op in body if "GMMA" in op}) for body in loops]
    assert mmas == [["QGMMA.64x64x32.F32.E4M3.E4M3"], [FP8_WGMMA[kernel]]], mmas  # MXFP4, then FP8
    mxfp4, fp8 = loops
    # a step's MXFP4 codes (16 KB: w1 and w3 of 128 rows, or w2 of 256) and its diagonal operand tile (64 x 128
    # e4m3) in 16-byte cp.async of 256 threads; the scales in 4-byte ones
    assert mxfp4.count("LDGSTS.E.BYPASS.128") * 16 * 256 >= 16 * 1024 + 64 * 128, mxfp4
    assert not [op for op in mxfp4 if op.startswith(("LDG.", "LDGSTS.E.64"))], [op for op in mxfp4 if "LDG" in op]
    assert "LDGSTS.E.BYPASS.128" in fp8
    assert not [op for op in instructions if op.startswith(("LDL", "STL"))] and "STACK:0 " in usage, usage
