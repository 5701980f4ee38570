"""Load a compiled artifact into a generation engine: `dsv4c.runtime.load(path)`.

Each step variant's plan becomes an `Executor`; all of them bind one copy of the weights, read once. `load`
says on stderr which kernels run (runtime/stored_kernels.py decides): on cpu, or on a GPU without Triton, the
ops' PyTorch reference implementations; on a GPU the Triton mHC kernels, launched from the artifact's stored
binaries where it holds them for this GPU's sm, built by the local Triton from the kernel source the installed
dsv4c has; compiled from that source on first use otherwise. `load_tokenizer` reads the artifact's tokenizer, if any.

The state pool is sized once the weights are on the device: `max_batch` rows (as its batch bucket) where they and
the step activations fit in the memory left, else the largest bucket that fits, said on stderr; an artifact whose
max_seq_len leaves no room for even one sequence is refused with what it needs (runtime/capacity.py).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from dsv4c.codegen.targets import target_for_device
from tokenizers import Tokenizer

from dsv4c.runtime.artifact import Artifact, artifact_tokenizer, decode_state, distribution_version, load_artifact
from dsv4c.runtime.stored_kernels import KernelPlan, kernel_plan
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.state_pool import StatePool, StateSpec
from dsv4c.runtime import capacity, device_memory
from dsv4c.runtime.capacity import PER_TOKEN_VARIANTS, prefill_variants
from dsv4c.runtime.step_runner import BUCKETS, BucketRunner, bucket_for
from dsv4c.runtime.executor import Executor, weight_inputs


def plan_executors(artifact: Artifact, device: torch.device, kernels: KernelPlan) -> dict[str, Executor]:
    """An executor per step variant, all bound to one copy of the weights: every tensor a plan reads is read from
    the artifact once and put on `device` once, and each variant's executor binds those tensors (ten variants
    share the checkpoint's bytes, they do not take ten times its memory). `kernels`: what runs the mHC kernels
    (runtime/stored_kernels.KernelPlan); on a GPU with Triton (any mode but "reference") the mHC ops run
    `mhc_implementations` of its launcher (None: Triton's JIT) in place of the registered ops."""
    implementations = mhc_implementations(kernels.launcher) if kernels.mode != "reference" else None
    tensors = artifact.weights.read(set().union(*(plan.tensor_keys for plan in artifact.plans.values())), device)
    executors = {}
    for name, plan in artifact.plans.items():
        constants = {key: tensors[key] for key in set(plan.constants.values())}
        executors[name] = Executor(plan, constants, device, weight_inputs(plan, tensors), implementations)
    return executors


def local_target(device: torch.device) -> str:
    """The target-table name of a device (codegen/targets.py): cpu, or its CUDA architecture's row."""
    return target_for_device(device).name


def mhc_implementations(launcher) -> dict[str, Callable[..., Any]]:
    """The mHC ops' CUDA implementations bound to `launcher` (runtime/stored_kernels.py; None: Triton's JIT) and
    to the batch-invariant launch (codegen/kernels/mhc_launch.py): one token a program and D split by its size
    alone at every token count, so a token's bits do not depend on its step (runtime/batch_invariant.py; the tuned
    launch itself up to 8 tokens). The executors call them in place of the registered ops."""
    from dsv4c.codegen import cuda_impls
    from dsv4c.codegen.kernels.mhc_launch import batch_invariant_launch

    return {f"dsv4c::{name}": functools.partial(impl, launcher=launcher, launch_choice=batch_invariant_launch)
            for name, impl in cuda_impls.IMPLS.items()}


def state_specs(artifact: Artifact) -> dict[str, StateSpec]:
    return decode_state(artifact.manifest)


def load(path: str | Path, device: str | torch.device = "cpu", *, max_batch: int = 8, cuda_graphs: bool = True,
         progress: Callable[[str], None] = lambda message: None, free_bytes: int | None = None) -> Engine:
    """A generation engine over the artifact at `path` (verified before use; nothing in it runs as Python).

    The state pool holds `max_batch` sequences of the artifact's capacity, or fewer where memory does not allow
    (module docstring; `free_bytes`: the bytes the pool and the step activations may use, by default the
    device's free memory once the weights are on it); on a CUDA device with `cuda_graphs`, the per-token step
    variants are captured into CUDA graphs for every batch bucket the pool holds, and the prefill variants over the
    pool's prefill row, here, so the first request pays nothing (`progress` hears each capture)."""
    artifact = load_artifact(path)
    device = torch.device(device)
    kernels = kernel_plan(artifact.manifest, artifact.path, local_target(device),
                          local_triton=distribution_version("triton"))
    print(kernels.message, file=sys.stderr)
    manifest = artifact.manifest
    specs = state_specs(artifact)
    per_token = tuple(name for name in artifact.plans if name in PER_TOKEN_VARIANTS)
    prefill = tuple(name for name in artifact.plans if name in prefill_variants(manifest["prefill_chunk"]))
    executors = plan_executors(artifact, device, kernels)  # the weights take their memory before the pool is sized
    free = free_bytes if free_bytes is not None else device_memory.free_bytes(device)
    rows, message = pool_rows(manifest, per_token, specs, bucket_for(max_batch), free, device, prefill)
    print(message, file=sys.stderr)
    pool = StatePool(specs, rows, device)
    runner = BucketRunner(executors, pool, per_token, cuda_graphs, progress, prefill)
    return Engine(runner, specs, manifest["prefill_chunk"], manifest["max_seq_len"], device,
                  vocab_size=manifest["config"]["vocab_size"], pool=pool, max_drafts=max_drafts(manifest))


def max_drafts(manifest) -> int:
    """The most MTP drafts the artifact's variants verify (artifacts from before the field: one, with MTP)."""
    return manifest.get("max_drafts", 1 if manifest.get("mtp") else 0)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer the artifact at `path` carries, or None: checked against the manifest's sha256 and the
    model's vocab_size (runtime/artifact.artifact_tokenizer) without loading the weights, so text can be
    refused or encoded before the engine is built."""
    return artifact_tokenizer(path)


def pool_rows(manifest: dict, variants: tuple[str, ...], specs: dict[str, StateSpec], wanted: int,
              free: int | None, device: torch.device, prefill: tuple[str, ...] = ()) -> tuple[int, str]:
    """(rows, the line saying so): `wanted` (a batch bucket) where the pool (its prefill row included) and the
    step activations (`variants` at the batch, `prefill` at one sequence) fit in `free` bytes (or where `free` is
    unknown), else the largest smaller bucket that fits; ValueError if none does."""
    state = sum(spec.bytes_per_sequence() for spec in specs.values())
    length = f"{manifest['max_seq_len']:,} positions"
    if free is None:
        return wanted, f"state pool: {wanted} sequences of {length}, {_gib(state)} each (free memory unknown)"
    most = capacity.max_sequences(manifest, variants, state, free, prefill)
    fits = f"{most:,} fit in the {_gib(free)} free on {device}"
    need = capacity.step_bytes(manifest, variants, wanted, state, prefill)
    if need <= free:
        return wanted, f"state pool: {wanted} sequences of {length}, {_gib(state)} each ({fits})"
    rows = capacity.largest_fitting(manifest, variants, [b for b in BUCKETS if b < wanted], state, free, prefill)
    short = (f"{wanted} sequences of {length} need {_gib(need)} (state {_gib(state)} each, one more row for "
             f"prefill, and step activations); {fits}")
    if rows is None:
        raise ValueError(f"state pool: {short}; compile with a smaller --max-seq-len")
    return rows, f"state pool: {rows} sequences, not max_batch {wanted}: {short}"


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"
