"""How a host wrapper's kernel launch reaches the device: Triton's JIT, or a kernel built ahead of time.

A host wrapper (codegen/kernels/mhc.py) describes each launch as a `KernelLaunch`: the Triton kernel, the grid,
the runtime arguments and the constexprs (both by the kernel's argument names) and the options (num_warps,
num_stages, launch_pdl). A launcher runs it:

    JitLauncher     `kernel[grid](**args, **constexprs, **options)`: Triton compiles each specialisation on
                    first use (and caches it); the default, and the only one that runs on the CPU interpreter.
    SpecRecorder    runs nothing; records the `KernelSpec` of every launch (codegen/aot.py calls the host
                    wrappers on meta tensors with it, so the kernels built ahead of time are exactly the
                    specialisations the wrappers launch).
    runtime/stored_kernels.StoredKernelLauncher: the artifact's cubin of the launch's `KernelSpec`.

`KernelSpec` is what a compiled binary is specialised on: kernel name, every argument's Triton type
(pointers by element type, scalars i32 / fp32, constexprs), the constexpr values and the options. Ahead-of-time
kernels also assume every pointer argument is 16-byte aligned (`POINTER_ALIGN`, Triton's `tt.divisibility`
16, which the JIT infers per call); a launch whose pointers are not is not theirs to run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

POINTER_ALIGN = 16
TRITON_DTYPES: Mapping[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                                            torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation of one kernel: what its binary is compiled for, and its stable name."""

    kernel: str
    signature: tuple[tuple[str, str], ...]  # every argument in the kernel's order -> Triton type
    constexprs: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, Any], ...]  # num_warps, num_stages, launch_pdl

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps([self.kernel, self.signature, self.constexprs, self.options])
                                .encode()).hexdigest()
        return f"{self.kernel}_{digest[:12]}"

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "signature": dict(self.signature), "constexprs": dict(self.constexprs),
                "options": dict(self.options)}

    @classmethod
    def from_json(cls, record: Mapping[str, Any], arg_names: list[str]) -> "KernelSpec":
        """The spec `to_json` wrote, its argument order restored from the kernel's `arg_names` (a JSON
        writer may sort keys)."""
        signature, constexprs = record["signature"], record["constexprs"]
        if set(signature) != set(arg_names):
            raise ValueError(f"kernel {record['kernel']}: signature names {sorted(signature)}, the kernel takes "
                             f"{list(arg_names)}")
        return cls(record["kernel"], tuple((name, signature[name]) for name in arg_names),
                   tuple((name, constexprs[name]) for name in arg_names if name in constexprs),
                   tuple(sorted(record["options"].items())))


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch, described: `fn` a triton.JITFunction; `args` its runtime arguments (tensors and
    scalars) and `constexprs` by argument name; `options` Triton's launch options."""

    fn: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> KernelSpec:
        names = self.fn.arg_names
        missing = set(names) - set(self.args) - set(self.constexprs)
        if missing:
            raise ValueError(f"launch of {self.fn.__name__}: arguments {sorted(missing)} not given")
        signature = tuple((name, "constexpr" if name in self.constexprs else triton_type(self.args[name], name))
                          for name in names)
        return KernelSpec(self.fn.__name__, signature, tuple((k, self.constexprs[k]) for k in names
                                                              if k in self.constexprs),
                          tuple(sorted(self.options.items())))

    def ordered_values(self) -> list[Any]:
        """Every argument's value in the kernel's order, constexprs included (a compiled kernel's launcher
        takes them all and skips the constexprs)."""
        return [self.args[name] if name in self.args else self.constexprs[name] for name in self.fn.arg_names]

    def pointers_aligned(self) -> bool:
        """Every tensor argument starts on a POINTER_ALIGN boundary (what ahead-of-time binaries assume)."""
        return all(value.data_ptr() % POINTER_ALIGN == 0 for value in self.args.values()
                   if isinstance(value, torch.Tensor))


def triton_type(value: Any, name: str) -> str:
    """Triton's signature type of a runtime argument: `*<dtype>` for a tensor, i32 / fp32 for scalars."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in TRITON_DTYPES:
            raise TypeError(f"argument {name!r}: no Triton type for tensors of {value.dtype}")
        return "*" + TRITON_DTYPES[value.dtype]
    if isinstance(value, bool):
        raise TypeError(f"argument {name!r}: a bool must be a constexpr")
    if isinstance(value, int):
        return "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name!r}: no Triton type for {type(value).__name__}")


class JitLauncher:
    """Launches through Triton's JIT (compiles and caches each specialisation on first use)."""

    def __call__(self, launch: KernelLaunch) -> None:
        launch.fn[launch.grid](**launch.args, **launch.constexprs, **launch.options)


class SpecRecorder:
    """Runs nothing: collects the `KernelSpec` of every launch, in first-seen order."""

    def __init__(self):
        self.specs: dict[KernelSpec, None] = {}

    def __call__(self, launch: KernelLaunch) -> None:
        self.specs.setdefault(launch.spec(), None)


JIT = JitLauncher()
