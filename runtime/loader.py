"""Load a compiled artifact into a generation engine: `dsv4c.runtime.load(path)`.

Each step variant's plan becomes an `Executor` with the weights bound once. `load` says once, on stderr,
which kernels run: on cpu the ops' PyTorch reference implementations; on a GPU the Triton mHC kernels
(codegen/cuda_impls.py). Where the artifact holds ahead-of-time kernels for the GPU's sm built with the
local Triton version, it names them; where it holds none, or they were built with another Triton, the
kernels are compiled from their Triton source on first use. (The CUDA ops launch the kernels through
Triton's JIT of the same source the stored binaries were built from; the stored cubins are not loaded.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import torch

from .artifact import Artifact, _distribution_version, load_artifact
from .engine import Engine, StateSpec
from .executor import Executor, weight_inputs
from .plan import decode_dtype


class PlanRunner:
    """Runs step variants through their plans' executors (the `StepRunner` protocol of the engine)."""

    def __init__(self, artifact: Artifact, device: torch.device):
        self.executors: dict[str, Executor] = {}
        for name, plan in artifact.plans.items():
            constants = {key: artifact.weights[key] for key in set(plan.constants.values())}
            self.executors[name] = Executor(plan, constants, device, weight_inputs(plan, artifact.weights))

    def run(self, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        executor = self.executors.get(variant)
        if executor is None:
            raise KeyError(f"variant {variant!r}: not in this artifact (has {sorted(self.executors)})")
        return executor.run(inputs)


def local_target(device: torch.device) -> str:
    """The target name of a device: its CUDA architecture, or cpu."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}a"


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr)


def kernel_message(manifest: Mapping, target: str, path: str | Path,
                   local_triton: str | None = None) -> str:
    """What runs the artifact's kernels on `target`: the line `load` prints."""
    kernels = manifest.get("kernels", {}).get(target)
    if target == "cpu" or (not kernels and target not in manifest.get("kernels", {})):
        if target == "cpu":
            return f"dsv4c: {path} holds no kernels for {target}; running the reference implementations"
        return (f"dsv4c: {path} holds no kernels for {target}; the mHC kernels will be compiled from their "
                f"Triton source on first use")
    local = local_triton if local_triton is not None else _distribution_version("triton")
    built = {entry.get("triton") for entry in kernels} or {manifest.get("versions", {}).get("triton")}
    if built == {local}:
        names = ", ".join(entry["name"] for entry in kernels)
        return (f"dsv4c: using the {len(kernels)} ahead-of-time mHC kernels of {path} for {target} "
                f"(Triton {local}): {names}")
    return (f"dsv4c: {path} holds {target} kernels built with Triton {', '.join(sorted(map(str, built)))}, "
            f"local Triton is {local}: the kernels will be recompiled from source")


def state_specs(artifact: Artifact) -> dict[str, StateSpec]:
    specs = {}
    for name, raw in artifact.manifest["state"].items():
        specs[name] = StateSpec(tuple(raw["shape"]), decode_dtype(raw["dtype"], f"state {name!r}"), float(raw["fill"]))
    return specs


def load(path: str | Path, device: str | torch.device = "cpu") -> Engine:
    """A generation engine over the artifact at `path` (verified before use; nothing in it is executed)."""
    artifact = load_artifact(path)
    device = torch.device(device)
    _say_once(kernel_message(artifact.manifest, local_target(device), path))
    manifest = artifact.manifest
    return Engine(PlanRunner(artifact, device), state_specs(artifact), manifest["prefill_chunk"],
                  manifest["max_seq_len"], device, vocab_size=manifest["config"]["vocab_size"])
