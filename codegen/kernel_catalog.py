"""What identifies a compiled mHC kernel: the Triton function a `KernelSpec` names, the attributes it is
compiled with, and the kernel source. Shared by the ahead-of-time build (codegen/aot.py) and the runtime
that launches its binaries (runtime/stored_kernels.py).

The kernel source is codegen/kernels/mhc_kernels.py, the file that holds the jit functions and imports
nothing but Triton: a binary is a function of that file, its `KernelSpec` and the Triton version, so the
artifact stores the file (as `kernels/<sm>/KERNEL_SOURCE_FILE`) and the runtime compares its bytes with the
installed one's. Importing this module imports neither Triton nor the kernels: `kernel_source` reads the
file without importing it; the other functions import the kernels (and so Triton) when called.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from dsv4c.codegen.kernels.launcher import POINTER_ALIGN, KernelSpec

KERNEL_MODULE = "dsv4c.codegen.kernels.mhc_kernels"
KERNEL_SOURCE_FILE = "mhc_kernels.py"
KERNEL_NAMES = ("_mix_partials_kernel", "_collapse_kernel")


def kernel_source() -> bytes:
    """The installed kernel file's bytes (stored beside the binaries; the runtime compares them with its own)."""
    return Path(importlib.util.find_spec(KERNEL_MODULE).origin).read_bytes()


def kernel_function(name: str):
    """The Triton JITFunction of codegen/kernels/mhc_kernels.py a spec names."""
    if name not in KERNEL_NAMES:
        raise ValueError(f"no mHC kernel named {name!r} (have {sorted(KERNEL_NAMES)})")
    return getattr(importlib.import_module(KERNEL_MODULE), name)


def kernel_source_attrs(spec: KernelSpec):
    """(the Triton JITFunction `spec` specialises, its `ASTSource` attrs): every pointer argument 16-byte
    aligned (launcher.POINTER_ALIGN), as Triton's JIT specialises aligned pointers."""
    fn = kernel_function(spec.kernel)
    signature = dict(spec.signature)
    return fn, {(index,): [["tt.divisibility", POINTER_ALIGN]] for index, name in enumerate(fn.arg_names)
                if signature[name].startswith("*")}
