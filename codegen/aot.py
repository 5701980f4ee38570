"""Ahead-of-time mHC kernels: every Triton specialisation the plans launch, built for each GPU target.

`build_kernels(targets, ...)` compiles, with Triton's `GPUTarget` (no GPU needed; Blackwell built, never run
here), the two kernels of codegen/kernels/mhc.py for each mHC op the plans call and each token count, and
returns the artifact's extra files and its manifest "kernels" table:

    kernels/<sm>/mhc.py                       the Triton source all kernels of <sm> were built from
    kernels/<sm>/<name>.cubin / .ptx / .ttir  the binary, its PTX and Triton IR
    kernels/<sm>/<name>.json                  launch metadata: Triton kernel name, signature, constexprs,
                                              num_warps, num_stages, shared memory, target, Triton version,
                                              the ops and token counts that use it, Triton's own metadata

    manifest["kernels"] = {sm: [{"name", "kernel", "files", "constexprs", "signature", "num_warps",
                                 "num_stages", "shared", "uses"}, ...]}

Specialisations. A boundary's launch (codegen/kernels/mhc.mhc_launch) depends on the target, the hidden
size D, the streams n and the number of tokens N = batch x T (T: tokens per sequence of a step variant:
1, 2 and the prefill chunk). The constexprs are those the host wrappers pass for that launch; pointer
dtypes follow the activation dtype (fn, base, scale, post, comb, partials fp32). Token counts built:
T x b for every variant's T and b in `batch_buckets` (CompileOptions.kernel_batches; default (1,): one
sequence, i.e. decode, MTP verification and prefill chunks of one request. Each token count costs about
ten kernels a target at 1-4 s each to build, so buckets are opt-in: `(1, 8)` adds batch-8 decode and
reaches the tensor-core (tf32x3 tl.dot) launches from 9 tokens). Other token counts have other
launches: the registered CUDA implementations JIT-compile those from the same source. Specialisations
shared by several (op, N) are built once (the json lists all their uses); builds run on a thread pool.
The AOT kernels are general in N (Triton's JIT also specialises N == 1 and pointer alignment).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import importlib.metadata
import inspect
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from .targets import Target, target as lookup_target

MHC_OPS = ("hc_pre", "hc_post_pre", "hc_post", "hc_head")
DEFAULT_BATCH_BUCKETS = (1,)
KERNELS_DIR = "kernels"
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation: which Triton kernel, its signature (arg -> type, constexprs included) and values."""

    kernel: str  # "mix_partials" or "collapse"
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps([self.kernel, self.signature, self.constexprs, self.num_warps,
                                            self.num_stages]).encode()).hexdigest()
        return f"{self.kernel}_{digest[:12]}"


def mhc_ops_in(plans: Mapping[str, Any]) -> list[str]:
    """The mHC ops (`dsv4c::hc_*`) the plans call, in MHC_OPS order."""
    used = {op.op.split("::", 1)[1].split(".")[0] for plan in plans.values() for op in plan.ops
            if op.op.startswith("dsv4c::")}
    return [name for name in MHC_OPS if name in used]


def _mix_spec(mhc, launch, hidden: int, hc: int, rows: int | None, post: bool, dtype: str) -> KernelSpec:
    mix = rows is not None
    m_pad = max(mhc.MIN_DOT, mhc.triton.next_power_of_2(rows)) if mix else mhc.MIN_DOT
    x = dtype
    pointers = dict(x_ptr=x, s_ptr=dtype if post else x, post_ptr="fp32" if post else x,
                    comb_ptr="fp32" if post else x, new_ptr=dtype if post else x, fn_ptr="fp32" if mix else x,
                    part_mix_ptr="fp32" if mix else x, part_sq_ptr="fp32" if mix else x)
    constants = dict(D=hidden, HC=hc, HC_PAD=mhc.triton.next_power_of_2(hc), M_PAD=m_pad, BLOCK_T=launch.block_t,
                     BLOCK_D=launch.block_d, CHUNKS=launch.chunks, SPLIT=launch.split_k, POST=post, MIX=mix,
                     DOT=launch.dot, PRECISION=launch.precision)
    signature = {**{k: "*" + v for k, v in pointers.items()}, "N": "i32", "M": "i32",
                 **{k: "constexpr" for k in constants}}
    return KernelSpec("mix_partials", tuple(signature.items()), tuple(constants.items()), launch.num_warps,
                      launch.num_stages)


def _collapse_spec(mhc, launch, hidden: int, hc: int, rows: int, head: bool, iters: int, dtype: str,
                   norm_dtype: str) -> KernelSpec:
    pointers = dict(streams_ptr=dtype, part_mix_ptr="fp32", part_sq_ptr="fp32", base_ptr="fp32", scale_ptr="fp32",
                    norm_w_ptr=norm_dtype, normed_ptr=dtype, post_ptr=dtype if head else "fp32",
                    comb_ptr=dtype if head else "fp32")
    constants = dict(D=hidden, HC=hc, HC_PAD=mhc.triton.next_power_of_2(hc),
                     M_PAD=max(mhc.MIN_DOT, mhc.triton.next_power_of_2(rows)), SPLIT=launch.split_k,
                     SPLIT_PAD=mhc.triton.next_power_of_2(launch.split_k), ITERS=iters,
                     BLOCK_T=launch.collapse_t, BLOCK_D=mhc.triton.next_power_of_2(hidden), HEAD=head)
    signature = {**{k: "*" + v for k, v in pointers.items()}, "N": "i32", "rms_eps": "fp32", "hc_eps": "fp32",
                 **{k: "constexpr" for k in constants}}
    return KernelSpec("collapse", tuple(signature.items()), tuple(constants.items()), launch.collapse_warps, 1)


def mhc_specs(t: Target, ops: Iterable[str], token_counts: Iterable[int], hidden: int, hc: int, iters: int,
              dtype: torch.dtype, norm_dtype: torch.dtype | None = None) -> dict[KernelSpec, list[dict]]:
    """Every specialisation the host wrappers of codegen/kernels/mhc.py launch for `ops` at `token_counts`
    on target `t` -> its uses [{"op", "tokens"}]."""
    from .kernels import mhc

    act, norm = _DTYPES[dtype], _DTYPES[norm_dtype or dtype]
    mix_rows, head_rows = (2 + hc) * hc, hc
    specs: dict[KernelSpec, list[dict]] = {}
    for tokens in sorted(set(token_counts)):
        launch = mhc.mhc_launch(t, tokens, hidden, hc)
        launch.check(hidden)
        for op in ops:
            if op == "hc_post":
                built = [_mix_spec(mhc, launch, hidden, hc, None, True, act)]
            else:
                head = op == "hc_head"
                rows = head_rows if head else mix_rows
                built = [_mix_spec(mhc, launch, hidden, hc, rows, op == "hc_post_pre", act),
                         _collapse_spec(mhc, launch, hidden, hc, rows, head, 1 if head else iters, act, norm)]
            for spec in built:
                specs.setdefault(spec, []).append({"op": op, "tokens": tokens})
    return specs


def compile_spec(t: Target, spec: KernelSpec):
    """Triton's CompiledKernel of `spec` for target `t` (any machine: no GPU is needed)."""
    import triton
    from triton.compiler import ASTSource

    from .kernels import mhc
    from .targets import triton_gpu_target

    fn = {"mix_partials": mhc._mix_partials_kernel, "collapse": mhc._collapse_kernel}[spec.kernel]
    return triton.compile(ASTSource(fn, dict(spec.signature), dict(spec.constexprs)), target=triton_gpu_target(t),
                          options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))


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


def build_kernels(targets: Iterable[str | Target], *, hidden: int, hc: int, iters: int, dtype: torch.dtype,
                  ops: Iterable[str] = MHC_OPS, variant_tokens: Iterable[int] = (1,),
                  batch_buckets: Iterable[int] = DEFAULT_BATCH_BUCKETS, norm_dtype: torch.dtype | None = None,
                  progress=lambda message: None) -> tuple[dict[str, bytes], dict[str, list[dict]]]:
    """(extra files, manifest "kernels" table) for the GPU targets among `targets`; cpu adds nothing."""
    gpu_targets = [t for t in (lookup_target(x) for x in targets) if t.is_gpu]
    ops = [op for op in ops if op in MHC_OPS]
    files: dict[str, bytes] = {}
    table: dict[str, list[dict]] = {}
    if not gpu_targets or not ops:
        return files, table
    from .kernels import mhc

    triton_version = importlib.metadata.version("triton")
    source = inspect.getsource(mhc).encode()
    token_counts = sorted({tokens * batch for tokens in variant_tokens for batch in batch_buckets})
    for t in gpu_targets:
        folder = f"{KERNELS_DIR}/{t.sm}"
        files[f"{folder}/mhc.py"] = source
        specs = mhc_specs(t, ops, token_counts, hidden, hc, iters, dtype, norm_dtype)
        progress(f"building {len(specs)} mHC kernels for {t.sm}")
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            built = list(pool.map(lambda spec: compile_spec(t, spec), specs))
        entries = []
        for (spec, uses), compiled in zip(specs.items(), built):
            meta = compiled.metadata
            entry = {"name": spec.name, "kernel": meta.name, "constexprs": dict(spec.constexprs),
                     "signature": dict(spec.signature), "num_warps": spec.num_warps, "num_stages": spec.num_stages,
                     "shared": meta.shared, "target": {"backend": "cuda", "arch": t.arch, "sm": t.sm,
                                                       "warp_size": t.warp_size},
                     "triton": triton_version, "uses": uses}
            kernel_files = {}
            for ext, text in (("cubin", compiled.asm["cubin"]), ("ptx", compiled.asm["ptx"]),
                              ("ttir", compiled.asm["ttir"])):
                rel = f"{folder}/{spec.name}.{ext}"
                files[rel] = text if isinstance(text, bytes) else text.encode()
                kernel_files[ext] = rel
            kernel_files["json"] = f"{folder}/{spec.name}.json"
            kernel_files["source"] = f"{folder}/mhc.py"
            entry["files"] = kernel_files
            files[kernel_files["json"]] = json.dumps(
                {**entry, "triton_metadata": _plain(meta._asdict())}, indent=1, sort_keys=True).encode()
            entries.append(entry)
        table[t.sm] = entries
    return files, table
