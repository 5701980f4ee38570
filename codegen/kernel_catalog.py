"""What identifies a compiled mHC kernel: the Triton function a `KernelSpec` names, the attributes it is
compiled with, and the kernel source. Shared by the ahead-of-time build (codegen/aot.py) and the runtime
that launches its binaries (runtime/stored_kernels.py). Importing this module imports neither Triton nor the
kernels; each function imports codegen/kernels/mhc.py (and so Triton) when called.
"""

from __future__ import annotations

import inspect

from dsv4c.codegen.kernels.launcher import POINTER_ALIGN, KernelSpec


def kernel_source() -> bytes:
    """The kernel module's source (stored beside the binaries; the runtime compares it with its own)."""
    from dsv4c.codegen.kernels import mhc

    return inspect.getsource(mhc).encode()


def kernel_function(name: str):
    """The Triton JITFunction of codegen/kernels/mhc.py a spec names."""
    from dsv4c.codegen.kernels import mhc

    kernels = {"_mix_partials_kernel": mhc._mix_partials_kernel, "_collapse_kernel": mhc._collapse_kernel}
    if name not in kernels:
        raise ValueError(f"no mHC kernel named {name!r} (have {sorted(kernels)})")
    return kernels[name]


def kernel_source_attrs(spec: KernelSpec):
    """(the Triton JITFunction `spec` specialises, its `ASTSource` attrs): every pointer argument 16-byte
    aligned (launcher.POINTER_ALIGN), as Triton's JIT specialises aligned pointers."""
    fn = kernel_function(spec.kernel)
    signature = dict(spec.signature)
    return fn, {(index,): [["tt.divisibility", POINTER_ALIGN]] for index, name in enumerate(fn.arg_names)
                if signature[name].startswith("*")}
