"""Load a compiled artifact into a generation engine: `dsv4c.runtime.load(path)`.

Each step variant's plan becomes an `Executor` with the weights bound once. `load` says on stderr which
kernels run (runtime/stored_kernels.py decides): on cpu, or on a GPU without Triton, the ops' PyTorch
reference implementations; on a GPU the Triton mHC kernels, launched from the artifact's stored binaries
where it holds them for this GPU's sm, built by the local Triton from the kernel source the installed dsv4c
has; compiled from that source on first use otherwise.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dsv4c.codegen.targets import target_for_device
from dsv4c.runtime.artifact import Artifact, distribution_version, load_artifact
from dsv4c.runtime.stored_kernels import KernelPlan, kernel_plan
from dsv4c.runtime.engine import Engine, StateSpec
from dsv4c.runtime.executor import Executor, weight_inputs
from dsv4c.runtime.plan import decode_dtype


class PlanRunner:
    """Runs step variants through their plans' executors (the `StepRunner` protocol of the engine).
    `kernels`: what runs the mHC kernels (runtime/stored_kernels.KernelPlan); with a launcher, the CUDA
    implementations bound to it replace the registered ops."""

    def __init__(self, artifact: Artifact, device: torch.device, kernels: KernelPlan):
        self.kernels = kernels
        implementations = stored_kernel_implementations(kernels.launcher) if kernels.launcher is not None else None
        self.executors: dict[str, Executor] = {}
        for name, plan in artifact.plans.items():
            constants = {key: artifact.weights[key] for key in set(plan.constants.values())}
            self.executors[name] = Executor(plan, constants, device, weight_inputs(plan, artifact.weights),
                                            implementations)

    def run(self, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        executor = self.executors.get(variant)
        if executor is None:
            raise KeyError(f"variant {variant!r}: not in this artifact (has {sorted(self.executors)})")
        return executor.run(inputs)


def local_target(device: torch.device) -> str:
    """The target-table name of a device (codegen/targets.py): cpu, or its CUDA architecture's row."""
    return target_for_device(device).name


def stored_kernel_implementations(launcher) -> dict[str, Callable[..., Any]]:
    """The mHC ops' CUDA implementations bound to `launcher` (runtime/stored_kernels.py)."""
    from dsv4c.codegen import cuda_impls

    return {f"dsv4c::{name}": functools.partial(impl, launcher=launcher) for name, impl in cuda_impls.IMPLS.items()}


def state_specs(artifact: Artifact) -> dict[str, StateSpec]:
    specs = {}
    for name, raw in artifact.manifest["state"].items():
        specs[name] = StateSpec(tuple(raw["shape"]), decode_dtype(raw["dtype"], f"state {name!r}"), float(raw["fill"]))
    return specs


def load(path: str | Path, device: str | torch.device = "cpu") -> Engine:
    """A generation engine over the artifact at `path` (verified before use; nothing in it runs as Python)."""
    artifact = load_artifact(path)
    device = torch.device(device)
    plan = kernel_plan(artifact.manifest, artifact.path, local_target(device),
                       local_triton=distribution_version("triton"))
    print(plan.message, file=sys.stderr)
    manifest = artifact.manifest
    return Engine(PlanRunner(artifact, device, plan), state_specs(artifact), manifest["prefill_chunk"],
                  manifest["max_seq_len"], device, vocab_size=manifest["config"]["vocab_size"])
