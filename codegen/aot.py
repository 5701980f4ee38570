"""Ahead-of-time mHC kernels: every Triton specialisation the plans launch, built for each GPU target.

`build_kernels(targets, ...)` compiles, with Triton's `GPUTarget` (no GPU needed; Blackwell built, never run
here), the two kernels of codegen/kernels/mhc_kernels.py for each mHC op the plans call and each token
count, and returns the artifact's extra files and its manifest "kernels" table:

    kernels/<sm>/mhc_kernels.py               the Triton source all kernels of <sm> were built from
    kernels/<sm>/<name>.cubin / .ptx / .ttir  the binary, its PTX and Triton IR
    kernels/<sm>/<name>.json                  launch metadata: Triton kernel name, signature, constexprs,
                                              options (num_warps, num_stages, launch_pdl), shared memory,
                                              target, Triton version, the ops and token counts that use
                                              it, Triton's own metadata

    manifest["kernels"] = {sm: [{"name", "kernel", "files", "signature", "constexprs", "options",
                                 "shared", "target", "triton", "uses"}, ...]}

Specialisations. A boundary's launch (codegen/kernels/mhc_launch.py) depends on the target, the hidden
size D, the streams n and the number of tokens N = batch x T (T: tokens per sequence of a step variant:
1, 2 and the prefill chunk). The specialisations are recorded from the host wrappers themselves
(codegen/kernels/mhc.py), run on meta tensors (`op_specs`), so they are exactly what a call launches, for
the activation dtype and each dtype of the norm weights the plans pass (`mhc_norm_dtypes`: a checkpoint's
bf16 norms next to fp32 activations make other collapse specialisations). Token counts built:
T x b for every variant's T and b in `batch_buckets` (CompileOptions.kernel_batches; default (1,): one
sequence, i.e. decode, MTP verification and prefill chunks of one request. Each token count costs about
ten kernels a target at 1-4 s each to build, so buckets are opt-in: `(1, 8)` adds batch-8 decode). The launch
is the batch-invariant one (`batch_invariant_launch`), the one the runtime's stored kernels run (runtime/loader.py:
every step runs inside runtime/batch_invariant.py's block). Other token counts have other
launches: the registered CUDA implementations JIT-compile those from the same source. Specialisations
shared by several (op, N) are built once (the json lists all their uses); builds run on a thread pool.
The AOT kernels are general in N and assume 16-byte aligned pointers (Triton's JIT also specialises
N == 1). The runtime launches them directly (runtime/stored_kernels.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import json
import warnings
from typing import Any, Iterable, Iterator, Mapping

import torch

from dsv4c.codegen.kernel_catalog import KERNEL_SOURCE_FILE, kernel_source, kernel_source_attrs
from dsv4c.codegen.kernels.launcher import KernelSpec, SpecRecorder
from dsv4c.codegen.kernels.mhc_launch import LaunchChoice, MhcLaunch, batch_invariant_launch
from dsv4c.codegen.targets import Target, target as lookup_target

MHC_OPS = ("hc_pre", "hc_post_pre", "hc_post", "hc_head")
DEFAULT_BATCH_BUCKETS = (1,)
KERNELS_DIR = "kernels"


def mhc_ops_in(plans: Mapping[str, Any]) -> list[str]:
    """The mHC ops (`dsv4c::hc_*`) the plans call, in MHC_OPS order."""
    used = {op.op.split("::", 1)[1].split(".")[0] for plan in plans.values() for op in plan.ops
            if op.op.startswith("dsv4c::")}
    return [name for name in MHC_OPS if name in used]


def mhc_norm_dtypes(plans: Mapping[str, Any], default: torch.dtype) -> list[torch.dtype]:
    """The dtypes of the norm weights the plans pass to the mHC ops (checkpoint norms may be bf16 while the
    activations are fp32): read from the plan input each op's norm_weight argument names; `default` where
    the argument is computed inside the step."""
    importlib.import_module(f"{__package__}.ops")  # registers the dsv4c ops, whose schemas name the argument

    found = set()
    for plan in plans.values():
        inputs = {spec.name: spec for spec in plan.inputs}
        for op in plan.ops:
            name = op.op.split("::", 1)[1].split(".")[0] if op.op.startswith("dsv4c::") else None
            if name not in MHC_OPS:
                continue
            names = [arg.name for arg in getattr(torch.ops.dsv4c, name).default._schema.arguments]
            if "norm_weight" not in names or len(op.args) <= names.index("norm_weight"):
                continue
            ref = getattr(op.args[names.index("norm_weight")], "name", None)
            found.add(inputs[ref].torch_dtype() if ref in inputs else default)
    return sorted(found or {default}, key=str)


def op_specs(op: str, tokens: int, hidden: int, hc: int, iters: int, dtype: torch.dtype,
             norm_dtype: torch.dtype, launch: MhcLaunch) -> list[KernelSpec]:
    """The kernel specialisations one call of `op` on `tokens` tokens launches with `launch`: the host
    wrapper (codegen/kernels/mhc.py) itself runs on meta tensors with a `SpecRecorder` for launcher
    (nothing is computed or compiled), so these are exactly the specialisations a real call launches."""
    from dsv4c.codegen.kernels import mhc

    meta = dict(device="meta")
    rows = hc if op == "hc_head" else (2 + hc) * hc
    streams = torch.empty((tokens, hc, hidden), dtype=dtype, **meta)
    mix = (torch.empty((rows, hc * hidden), dtype=torch.float32, **meta), torch.empty(rows, **meta),
           torch.empty(1 if op == "hc_head" else 3, **meta), torch.empty(hidden, dtype=norm_dtype, **meta))
    post = (torch.empty((tokens, hidden), dtype=dtype, **meta), streams, torch.empty((tokens, hc), **meta),
            torch.empty((tokens, hc, hc), **meta))
    args = {"hc_pre": (streams, *mix, 1e-6, 1e-6, iters), "hc_post": post,
            "hc_post_pre": (*post, *mix, 1e-6, 1e-6, iters), "hc_head": (streams, *mix, 1e-6, 1e-6)}[op]
    recorder = SpecRecorder()
    getattr(mhc, op)(*args, launch=launch, launcher=recorder)
    return list(recorder.specs)


def mhc_specs(t: Target, ops: Iterable[str], token_counts: Iterable[int], hidden: int, hc: int, iters: int,
              dtype: torch.dtype, norm_dtypes: Iterable[torch.dtype] = (),
              launch_choice: LaunchChoice = batch_invariant_launch) -> dict[KernelSpec, list[dict]]:
    """Every specialisation the host wrappers of codegen/kernels/mhc.py launch for `ops` at `token_counts`
    on target `t` with `launch_choice`'s launches (norm weights of each of `norm_dtypes`, default the activation
    dtype) -> its uses [{"op", "tokens"}] (`op_specs`)."""
    specs: dict[KernelSpec, list[dict]] = {}
    for tokens in sorted(set(token_counts)):
        launch = launch_choice(t, tokens, hidden, hc)
        for op in ops:
            for norm_dtype in list(norm_dtypes) or [dtype]:
                for spec in op_specs(op, tokens, hidden, hc, 1 if op == "hc_head" else iters, dtype, norm_dtype,
                                     launch):
                    uses = specs.setdefault(spec, [])
                    if {"op": op, "tokens": tokens} not in uses:
                        uses.append({"op": op, "tokens": tokens})
    return specs


def compile_spec(t: Target, spec: KernelSpec):
    """Triton's CompiledKernel of `spec` for target `t` (any machine: no GPU is needed)."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.targets import triton_gpu_target

    fn, attrs = kernel_source_attrs(spec)
    source = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), attrs)
    return triton.compile(source, target=triton_gpu_target(t), options=dict(spec.options))


def _plain(value: Any) -> Any:
    """Triton's metadata as plain JSON, as Triton's cache writes it (GPUTarget as a dict, tuples as lists,
    anything else as its str)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


@contextlib.contextmanager
def _fp_fusion_notice_hidden() -> Iterator[None]:
    """Hide, for the block, Triton 3.9's notice that TRITON_DEFAULT_FP_FUSION is unset: the builds keep Triton's
    default (FP fusion on, as its JIT builds do), so the notice says nothing to a dsv4c user. The user's filters
    come back after the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset", category=UserWarning)
        yield


def build_kernels(targets: Iterable[str | Target], *, hidden: int, hc: int, iters: int, dtype: torch.dtype,
                  ops: Iterable[str] = MHC_OPS, variant_tokens: Iterable[int] = (1,),
                  batch_buckets: Iterable[int] = DEFAULT_BATCH_BUCKETS, norm_dtypes: Iterable[torch.dtype] = (),
                  launch_choice: LaunchChoice = batch_invariant_launch,
                  progress=lambda message: None) -> tuple[dict[str, bytes], dict[str, list[dict]]]:
    """(extra files, manifest "kernels" table) for the GPU targets among `targets`; cpu adds nothing. The
    launches are the batch-invariant ones the runtime's stored kernels run, unless `launch_choice` says other."""
    gpu_targets = [t for t in (lookup_target(x) for x in targets) if t.is_gpu]
    ops = [op for op in ops if op in MHC_OPS]
    files: dict[str, bytes] = {}
    table: dict[str, list[dict]] = {}
    if not gpu_targets or not ops:
        return files, table
    triton_version = importlib.metadata.version("triton")
    source = kernel_source()
    token_counts = sorted({tokens * batch for tokens in variant_tokens for batch in batch_buckets})
    for t in gpu_targets:
        folder = f"{KERNELS_DIR}/{t.sm}"
        files[f"{folder}/{KERNEL_SOURCE_FILE}"] = source
        specs = mhc_specs(t, ops, token_counts, hidden, hc, iters, dtype, norm_dtypes, launch_choice)
        progress(f"building {len(specs)} mHC kernels for {t.sm}")
        # one after another: Triton's front end parses kernel sources with ast.parse, which CPython 3.11 does not
        # make thread-safe (threads building at once raised "AST constructor recursion depth mismatch" here)
        with _fp_fusion_notice_hidden():
            built = [compile_spec(t, spec) for spec in specs]
        entries = []
        for (spec, uses), compiled in zip(specs.items(), built):
            meta = compiled.metadata
            entry = {"name": spec.name, **spec.to_json(), "shared": meta.shared,
                     "target": {"backend": "cuda", "arch": t.arch, "sm": t.sm, "warp_size": t.warp_size},
                     "triton": triton_version, "uses": uses}
            kernel_files = {}
            for ext, text in (("cubin", compiled.asm["cubin"]), ("ptx", compiled.asm["ptx"]),
                              ("ttir", compiled.asm["ttir"])):
                rel = f"{folder}/{spec.name}.{ext}"
                files[rel] = text if isinstance(text, bytes) else text.encode()
                kernel_files[ext] = rel
            kernel_files["json"] = f"{folder}/{spec.name}.json"
            kernel_files["source"] = f"{folder}/{KERNEL_SOURCE_FILE}"
            entry["files"] = kernel_files
            files[kernel_files["json"]] = json.dumps(
                {**entry, "triton_metadata": _plain(meta._asdict())}, indent=1, sort_keys=True).encode()
            entries.append(entry)
        table[t.sm] = entries
    return files, table
