"""Load a compiled artifact into a generation engine: `dsv4c.runtime.load(path)`.

Each step variant's plan becomes an `Executor` with the weights bound once. Where the artifact holds no
kernels for the local device, the ops run their PyTorch reference implementations, and `load` says so
once, on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import torch

from .artifact import Artifact, load_artifact
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


def state_specs(artifact: Artifact) -> dict[str, StateSpec]:
    specs = {}
    for name, raw in artifact.manifest["state"].items():
        specs[name] = StateSpec(tuple(raw["shape"]), decode_dtype(raw["dtype"], f"state {name!r}"), float(raw["fill"]))
    return specs


def load(path: str | Path, device: str | torch.device = "cpu") -> Engine:
    """A generation engine over the artifact at `path` (verified before use; nothing in it is executed)."""
    artifact = load_artifact(path)
    device = torch.device(device)
    target = local_target(device)
    if target not in artifact.manifest.get("kernels", {}):
        print(f"dsv4c: {path} holds no kernels for {target}; running the reference implementations",
              file=sys.stderr)
    manifest = artifact.manifest
    return Engine(PlanRunner(artifact, device), state_specs(artifact), manifest["prefill_chunk"],
                  manifest["max_seq_len"], device, vocab_size=manifest["config"]["vocab_size"])
