"""Load a compiled artifact into a generation engine: `dsv4c.runtime.load(path)`.

Each step variant's plan becomes an `Executor` with the weights bound once. `load` says on stderr which
kernels run (runtime/stored_kernels.py decides): on cpu, or on a GPU without Triton, the ops' PyTorch
reference implementations; on a GPU the Triton mHC kernels, launched from the artifact's stored binaries
where it holds them for this GPU's sm, built by the local Triton from the kernel source the installed dsv4c
has; compiled from that source on first use otherwise. `load_tokenizer` reads the artifact's tokenizer, if any.
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
from dsv4c.model.config import MAX_DRAFTS
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.state_pool import StatePool, StateSpec
from dsv4c.runtime import capacity
from dsv4c.runtime.step_runner import BUCKETS, BucketRunner, bucket_for
from dsv4c.runtime.executor import Executor, weight_inputs


def plan_executors(artifact: Artifact, device: torch.device, kernels: KernelPlan) -> dict[str, Executor]:
    """An executor per step variant with the weights bound once. `kernels`: what runs the mHC kernels
    (runtime/stored_kernels.KernelPlan); with a launcher, the CUDA implementations bound to it replace the
    registered ops."""
    implementations = stored_kernel_implementations(kernels.launcher) if kernels.launcher is not None else None
    executors = {}
    for name, plan in artifact.plans.items():
        constants = {key: artifact.weights[key] for key in set(plan.constants.values())}
        executors[name] = Executor(plan, constants, device, weight_inputs(plan, artifact.weights), implementations)
    return executors


# Decode, MTP verification of up to MAX_DRAFTS drafts, and the MTP draft steps: the variants a token's step runs.
PER_TOKEN_VARIANTS = tuple(f"{kind}_t{t}" for kind in ("main", "mtp") for t in range(1, MAX_DRAFTS + 2))


def local_target(device: torch.device) -> str:
    """The target-table name of a device (codegen/targets.py): cpu, or its CUDA architecture's row."""
    return target_for_device(device).name


def stored_kernel_implementations(launcher) -> dict[str, Callable[..., Any]]:
    """The mHC ops' CUDA implementations bound to `launcher` (runtime/stored_kernels.py)."""
    from dsv4c.codegen import cuda_impls

    return {f"dsv4c::{name}": functools.partial(impl, launcher=launcher) for name, impl in cuda_impls.IMPLS.items()}


def state_specs(artifact: Artifact) -> dict[str, StateSpec]:
    return decode_state(artifact.manifest)


def load(path: str | Path, device: str | torch.device = "cpu", *, max_batch: int = 8, cuda_graphs: bool = True,
         progress: Callable[[str], None] = lambda message: None) -> Engine:
    """A generation engine over the artifact at `path` (verified before use; nothing in it runs as Python).

    The state pool holds `max_batch` sequences of the artifact's capacity; on a CUDA device with `cuda_graphs`,
    the per-token step variants are captured into CUDA graphs for every batch bucket up to `max_batch`, here,
    so the first request pays nothing (`progress` hears each capture)."""
    artifact = load_artifact(path)
    device = torch.device(device)
    kernels = kernel_plan(artifact.manifest, artifact.path, local_target(device),
                          local_triton=distribution_version("triton"))
    print(kernels.message, file=sys.stderr)
    manifest = artifact.manifest
    specs = state_specs(artifact)
    rows = bucket_for(max_batch)  # a batch pads up to its bucket: the pool holds it
    per_token = tuple(name for name in artifact.plans if name in PER_TOKEN_VARIANTS)
    _check_capacity(manifest, per_token, rows, sum(s.bytes_per_sequence() for s in specs.values()), device)
    pool = StatePool(specs, rows, device)
    runner = BucketRunner(plan_executors(artifact, device, kernels), pool, per_token, cuda_graphs, progress)
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


def _check_capacity(manifest, variants: tuple[str, ...], rows: int, state_per_sequence: int,
                    device: torch.device) -> None:
    """On a GPU, refuse a pool whose state and step activations (the compile's memory plan) exceed free memory."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    need = capacity.step_bytes(manifest, variants, rows, state_per_sequence)
    if need > free:
        fits = capacity.largest_fitting(manifest, variants, BUCKETS, state_per_sequence, free)
        raise ValueError(f"max_batch {rows}: {rows} sequences of {manifest['max_seq_len']} tokens need "
                         f"{need / 2**30:.2f} GiB (state and step activations), {free / 2**30:.2f} GiB is free on "
                         f"{device}; " + (f"at most {fits} fit" if fits else "not even one fits"))

