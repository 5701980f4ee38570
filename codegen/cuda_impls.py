"""CUDA implementations of the mHC custom ops: the Triton kernels' host wrappers, codegen/kernels/mhc.py.

`register()` (called by codegen/ops.py when it registers the ops) adds a "cuda" kernel to `dsv4c::hc_pre`,
`hc_post`, `hc_post_pre` and `hc_head`; CPU keeps the PyTorch reference. Importing this module imports
neither Triton nor the kernel module: each implementation imports them when a CUDA tensor first arrives
(Triton then JIT-compiles the kernel specialisation it needs, the same source as the artifact's
ahead-of-time kernels, codegen/aot.py). The ops take any leading dims; the wrappers take `[N, n, D]`, so the
inputs are flattened and the outputs reshaped back. The runtime calls these functions directly with
`launcher=` (runtime/stored_kernels.py) to run an artifact's ahead-of-time binaries instead of Triton's JIT;
`launch_choice=` picks the launch instead of the tuned one (runtime/batch_invariant_cuda.py passes the
batch-invariant one, codegen/kernels/mhc_launch.py).

Where Triton is not installed, the PyTorch references run on the GPU, as the loader says
(runtime/stored_kernels.py, mode "reference"). Where it is, a kernel module that fails to import is an
error naming the module and the cause, never a silent switch to the references.
"""

from __future__ import annotations

import functools
from importlib import import_module, metadata

import torch

from dsv4c.codegen import mhc_reference
from dsv4c.codegen.mhc_shapes import flat_post_inputs, pre_outputs, tokens

KERNEL_MODULE = "dsv4c.codegen.kernels.mhc"

_registered = False


def triton_installed() -> bool:
    """Whether the Triton distribution is installed: the loader's test too (runtime/loader.py), so both agree
    on when the references run."""
    try:
        metadata.version("triton")
    except metadata.PackageNotFoundError:
        return False
    return True


def triton_kernels(module: str, ops: str):
    """The kernel module `module` of `ops`, or None where Triton is not installed (the references run then, as
    the loader says). ImportError naming the module if Triton is installed and it fails to load: never a
    silent switch to the references."""
    if not triton_installed():
        return None
    try:
        return import_module(module)
    except ImportError as error:
        raise ImportError(f"dsv4c: the CUDA implementations of {ops} cannot load their Triton kernels: "
                          f"importing {module} failed ({type(error).__name__}: {error})", name=module) from error


@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernels' host wrappers (KERNEL_MODULE), or mhc_reference where Triton is not installed (same
    signatures, minus `launch`)."""
    return triton_kernels(KERNEL_MODULE, "the mHC ops") or mhc_reference


def _wrapper_keywords(launcher, launch_choice) -> dict:
    """The `launcher` and `launch_choice` keywords for the kernel wrappers (codegen/kernels/launcher.py,
    mhc_launch.py); none means Triton's JIT and the tuned launch."""
    given = {"launcher": launcher, "launch_choice": launch_choice}
    return {name: value for name, value in given.items() if value is not None}


def hc_pre(streams, fn, base, scale, norm_weight, rms_eps, hc_eps, iters, *, launcher=None, launch_choice=None):
    lead, flat = tokens(streams)
    return pre_outputs(lead, *_kernels().hc_pre(flat, fn, base, scale, norm_weight, rms_eps, hc_eps, iters,
                                                **_wrapper_keywords(launcher, launch_choice)))


def hc_post(block_out, streams, post, comb, *, launcher=None, launch_choice=None):
    _, flat = flat_post_inputs(block_out, streams, post, comb)
    return _kernels().hc_post(*flat, **_wrapper_keywords(launcher, launch_choice)).reshape(streams.shape)


def hc_post_pre(block_out, streams, post, comb, fn, base, scale, norm_weight, rms_eps, hc_eps, iters, *,
                launcher=None, launch_choice=None):
    lead, flat = flat_post_inputs(block_out, streams, post, comb)
    new, *pre = _kernels().hc_post_pre(*flat, fn, base, scale, norm_weight, rms_eps, hc_eps, iters,
                                       **_wrapper_keywords(launcher, launch_choice))
    return (new.reshape(streams.shape), *pre_outputs(lead, *pre))


def hc_head(streams, fn, base, scale, norm_weight, rms_eps, hc_eps, *, launcher=None, launch_choice=None):
    lead, flat = tokens(streams)
    normed = _kernels().hc_head(flat, fn, base, scale, norm_weight, rms_eps, hc_eps,
                                **_wrapper_keywords(launcher, launch_choice))
    return normed.reshape(*lead, normed.shape[-1])


IMPLS = {"hc_pre": hc_pre, "hc_post": hc_post, "hc_post_pre": hc_post_pre, "hc_head": hc_head}


def register() -> None:
    """Register the CUDA implementations (idempotent)."""
    global _registered
    if _registered:
        return
    for name, impl in IMPLS.items():
        torch.library.register_kernel(f"dsv4c::{name}", "cuda", impl)
    _registered = True
