"""Ahead-of-time mHC kernels (codegen/aot.py) in the artifact, the loader's message about them, and the CUDA
implementations' registration (codegen/cuda_impls.py). Everything here runs without a GPU: Triton builds
sm_90a and sm_103a code through `GPUTarget` (Blackwell code is never run here); the artifact then loads and
runs on CPU with the reference implementations.

Triton kernels are built only in a spawned child process (the `child` fixture), as in test_mhc_kernels: Triton
decides at import whether it is interpreted; the CPU path never loads a kernel module (checked below)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from child_pool import child_pool
import torch

from dsv4c.codegen.kernel_catalog import KERNEL_SOURCE_FILE, kernel_source
from dsv4c.codegen.kernels.launcher import KernelSpec
from dsv4c.model.numerics import Numerics
from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.model.presets import tiny
from dsv4c.model.checkpoint import write_synthetic
from dsv4c.runtime.artifact import load_artifact
from dsv4c.runtime.loader import load

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

ARCHES = {"sm_90a": "h100", "sm_103a": "gb300"}
# Products: tf32x3 dots on 64-token blocks (from 17 tokens) run on wgmma (Hopper) / tcgen05.mma (Blackwell);
# 16-token blocks (9-16 tokens) on mma.sync on both (too few rows for wgmma / tcgen05); up to 8 tokens, FMA.
DOT_PRODUCT = {"sm_90a": "wgmma", "sm_103a": "tcgen05.mma"}


def _target_lines(ptx: str) -> list[str]:
    return [line for line in ptx.splitlines() if line.startswith(".target")]


def _start_child():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds for GPUs it lacks
    torch.set_num_threads(1)


def _build(targets, tuned=False, **kwargs):
    from dsv4c.codegen import aot
    from dsv4c.codegen.kernels.mhc_launch import mhc_launch

    if tuned:  # the launches the kernels take outside runtime/batch_invariant.py's block (Triton's JIT)
        kwargs["launch_choice"] = mhc_launch

    return aot.build_kernels(targets, hidden=128, hc=4, iters=20, dtype=torch.float32, **kwargs)


def _arg_names(kernel):
    """The kernel's argument names, in its order (read in the child: they come from the Triton function)."""
    from dsv4c.codegen.kernel_catalog import kernel_function

    return list(kernel_function(kernel).arg_names)


def _stored_plans(root):
    """(mode, kernels held) of kernel_plan for the artifact's sm_90a binaries with this Triton (binaries loaded
    into Triton CompiledKernels: no GPU needed until a launch), then with the manifest naming one entry
    differently (as another dsv4c's launch descriptions would)."""
    import importlib.metadata

    from dsv4c.runtime.artifact import load_artifact
    from dsv4c.runtime.stored_kernels import kernel_plan

    manifest, version = load_artifact(root).manifest, importlib.metadata.version("triton")
    plan = kernel_plan(manifest, root, "sm_90a", local_triton=version, say=print)
    renamed = json.loads(json.dumps(manifest))
    renamed["kernels"]["sm_90a"][0]["name"] += "0"
    other = kernel_plan(renamed, root, "sm_90a", local_triton=version, say=print)
    return (plan.mode, len(plan.launcher._compiled)), (other.mode, other.message)


def _compile_tiny(root):
    """tiny cut to one layer (C4 with the indexer), as in test_inspect: the full tiny captures for 90 s here."""
    write_synthetic(tiny().replace(num_hidden_layers=1, compress_ratios=(4, 0), num_hash_layers=0), root / "ckpt",
                    seed=3)
    options = CompileOptions(targets=("h100", "gb300"), numerics=Numerics.plain(torch.float32), max_seq_len=64,
                             prefill_chunk=2, mtp=False)
    return compile_checkpoint(root / "ckpt", root / "art", options)


@pytest.fixture(scope="module")
def child():
    with child_pool(_start_child) as pool:
        yield pool


@pytest.fixture(scope="module")
def built(child):
    """hc_pre's tuned launches at 1 token (FMA) and 64 tokens (tensor-core dots), for both GPUs and cpu (which adds
    nothing)."""
    return child.submit(_build, ["cpu", "h100", "gb300"], tuned=True, ops=["hc_pre"], variant_tokens=[1, 64]).result()


def test_cpu_only_builds_nothing(child):
    assert child.submit(_build, ["cpu"]).result() == ({}, {})


def test_kernels_for_each_gpu_target_with_their_files(built):
    files, table = built
    assert set(table) == {"sm_90a", "sm_103a"}
    for sm, entries in table.items():
        assert {e["kernel"] for e in entries} == {"_mix_partials_kernel", "_collapse_kernel"}
        assert sorted({u["tokens"] for e in entries for u in e["uses"]}) == [1, 64]
        for entry in entries:
            for ext in ("cubin", "ptx", "ttir", "json", "source"):
                rel = entry["files"][ext]
                assert rel.startswith(f"kernels/{sm}/") and files[rel], rel
            assert files[entry["files"]["cubin"]][:4] == b"\x7fELF"
            meta = json.loads(files[entry["files"]["json"]])
            assert meta["target"]["sm"] == sm and meta["kernel"] == entry["kernel"]
            assert meta["options"] == entry["options"] and meta["constexprs"] == entry["constexprs"]
            assert meta["triton"] and meta["triton_metadata"]["name"] == entry["kernel"]
            assert meta["triton_metadata"]["target"] == {"backend": "cuda", "arch": meta["target"]["arch"],
                                                         "warp_size": 32}
            assert isinstance(meta["shared"], int)
        assert files[f"kernels/{sm}/{KERNEL_SOURCE_FILE}"] == kernel_source()  # the file the kernels come from
        assert {e["files"]["source"] for e in entries} == {f"kernels/{sm}/{KERNEL_SOURCE_FILE}"}


@pytest.mark.parametrize("sm", sorted(ARCHES))
def test_ptx_targets_the_arch_and_multiplies_as_the_launch_says(built, sm):
    files, table = built
    mixes = [e for e in table[sm] if e["kernel"] == "_mix_partials_kernel"]
    assert {e["constexprs"]["DOT"] for e in mixes} == {True, False}
    for entry in table[sm]:
        ptx = files[entry["files"]["ptx"]].decode()
        assert _target_lines(ptx) == [f".target {sm}"]
        consts = entry["constexprs"]
        dot = entry["kernel"] == "_mix_partials_kernel" and consts["DOT"] and consts["MIX"]
        assert not dot or consts["BLOCK_T"] == 64
        assert (DOT_PRODUCT[sm] in ptx) == dot, entry["name"]
        assert "tcgen05" not in ptx or sm == "sm_103a"
        assert "wgmma" not in ptx or sm == "sm_90a"


def test_artifact_kernels_take_the_batch_invariant_launch(child):
    """By default the built kernels are the launches runtime/loader.py binds (the batch-invariant ones): at 64
    tokens, broadcast products a token, not the tuned tensor-core dots."""
    _, table = child.submit(_build, ["h100"], ops=["hc_pre"], variant_tokens=[64]).result()
    mixes = [e for e in table["sm_90a"] if e["kernel"] == "_mix_partials_kernel"]
    assert mixes and all(not e["constexprs"]["DOT"] and e["constexprs"]["BLOCK_T"] == 1 for e in mixes)


# ---- end to end: tiny compiled for h100 and gb300 on this CPU machine ---------------------------------
@pytest.fixture(scope="module")
def artifact(child, tmp_path_factory):
    return child.submit(_compile_tiny, tmp_path_factory.mktemp("aot")).result()


def test_artifact_holds_kernels_for_both_targets(artifact):
    loaded = load_artifact(artifact)  # verifies every file's size and sha256
    table = loaded.manifest["kernels"]
    assert set(table) == {"sm_90a", "sm_103a"}
    used = {op.op.split("::")[1].split(".")[0] for plan in loaded.plans.values() for op in plan.ops
            if op.op.startswith("dsv4c::hc_")}
    assert used  # the mHC fusion put the boundaries in dsv4c ops
    for sm, entries in table.items():
        assert {u["op"] for e in entries for u in e["uses"]} == used
        assert {u["tokens"] for e in entries for u in e["uses"]} == {1, 2}  # T = 1, 2 (chunk 2), batch 1
        for entry in entries:
            assert set(entry["files"].values()) <= set(loaded.manifest["files"])
            ptx = (artifact / entry["files"]["ptx"]).read_text()
            assert _target_lines(ptx) == [f".target {sm}"]
            assert (artifact / entry["files"]["cubin"]).read_bytes()[:4] == b"\x7fELF"


def test_artifact_launch_metadata_names_each_kernel_and_its_launch(artifact, child):
    """Each kernel's json (written with sorted keys) gives back the spec the runtime looks binaries up by:
    its name is the manifest entry's. Every launch fixes warps and stages; on GPUs the collapse is launched
    as the split-K kernel's programmatic dependent, the split-K kernel releases it only when it computes
    partials (MIX; plain hc_post has no collapse after it) and is itself launched as a dependent of the
    kernel before it (WAIT); the collapse's Sinkhorn takes one-instruction reciprocals (FAST) unless it is
    hc_head's (no Sinkhorn); both kernels build the new streams (for n = 4) with every load ahead of
    its layout conversion (OPAQUE)."""
    manifest = load_artifact(artifact).manifest
    arg_names = {kernel: child.submit(_arg_names, kernel).result()
                 for kernel in ("_mix_partials_kernel", "_collapse_kernel")}
    for entries in manifest["kernels"].values():
        for entry in entries:
            meta = json.loads((artifact / entry["files"]["json"]).read_bytes())
            assert KernelSpec.from_json(meta, arg_names[entry["kernel"]]).name == entry["name"]
            assert {"num_warps", "num_stages"} <= set(entry["options"]), entry["name"]
            pdl, constexprs = entry["options"].get("launch_pdl", False), entry["constexprs"]
            assert constexprs["OPAQUE"] is True, entry["name"]
            if entry["kernel"] == "_collapse_kernel":
                assert pdl is True and constexprs["PDL"] is True, entry["name"]
                assert constexprs["FAST"] is not constexprs["HEAD"], entry["name"]
            else:
                assert pdl is True and constexprs["WAIT"] is True, entry["name"]
                assert constexprs["PDL"] is constexprs["MIX"], entry["name"]
        assert {e["constexprs"]["MIX"] for e in entries if e["kernel"] == "_mix_partials_kernel"} == {True, False}


def test_stored_binaries_load_into_triton_and_foreign_descriptions_are_not_launched(artifact, child):
    (mode, held), (other_mode, message) = child.submit(_stored_plans, artifact).result()
    assert mode == "stored" and held == len(load_artifact(artifact).manifest["kernels"]["sm_90a"])
    assert other_mode == "installed" and "with launch descriptions of another dsv4c" in message


def test_artifact_loads_and_runs_on_cpu_with_the_reference(artifact, capfd):
    engine = load(artifact)
    assert "runs on cpu: the reference implementations of the mHC ops" in capfd.readouterr().err
    result = engine.generate([[5, 7, 11]], 4)
    assert len(result.tokens[0]) == 4


def test_cuda_implementations_registered_without_importing_triton():
    code = ("import sys, torch, dsv4c.codegen.ops\n"
            "from torch._library.custom_ops import _maybe_get_opdef\n"
            "assert 'triton' not in sys.modules, 'importing the ops imported triton'\n"
            "for op in ('hc_pre', 'hc_post', 'hc_post_pre', 'hc_head'):\n"
            "    assert 'cuda' in _maybe_get_opdef(f'dsv4c::{op}')._backend_fns, op\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# A fresh process down the CPU path: the ops registered and run on CPU tensors, then the artifact (which holds
# Triton kernels for h100 and gb300) loaded and run on cpu. It prints the dsv4c modules loaded that use Triton,
# then imports the kernel module as the control that the same check sees one once something imports it.
CPU_PATH = textwrap.dedent("""
    import json, sys, types, torch
    from dsv4c.codegen import ops
    from dsv4c.runtime.loader import load

    def triton_users():
        return sorted(name for name, module in list(sys.modules.items()) if name.startswith("dsv4c.")
                      and any(isinstance(value, types.ModuleType) and value.__name__.split(".")[0] == "triton"
                              for value in vars(module).values()))

    n, d = 4, 32
    streams, out = torch.randn(2, n, d), torch.randn(2, d)
    fn, base, scale, norm = torch.randn((2 + n) * n, n * d), torch.randn((2 + n) * n), torch.rand(3), torch.rand(d)
    _, post, comb = torch.ops.dsv4c.hc_pre(streams, fn, base, scale, norm, 1e-6, 1e-6, 20)
    torch.ops.dsv4c.hc_post(out, streams, post, comb)
    torch.ops.dsv4c.hc_post_pre(out, streams, post, comb, fn, base, scale, norm, 1e-6, 1e-6, 20)
    torch.ops.dsv4c.hc_head(streams, fn[:n], base[:n], scale[:1], norm, 1e-6, 1e-6)
    load(sys.argv[1]).generate([[5, 7, 11]], 2)
    cpu_path = triton_users()
    import dsv4c.codegen.kernels.mhc
    print(json.dumps({"cpu_path": cpu_path, "control": triton_users()}))
""")


def test_the_cpu_path_never_loads_a_triton_kernel_module(artifact):
    """On CPU the ops' reference implementations run: no dsv4c module that uses Triton (the kernels, their host
    wrappers) is imported, so no Triton kernel is defined or built. Triton itself may be loaded: torch imports
    it on the first call of any custom op (torch._dynamo checks for the package)."""
    run = subprocess.run([sys.executable, "-c", CPU_PATH, str(artifact)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["cpu_path"] == []
    assert any(name.startswith("dsv4c.codegen.kernels.") for name in result["control"]), result["control"]
