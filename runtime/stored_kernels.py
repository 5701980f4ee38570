"""Run an artifact's ahead-of-time kernels (codegen/aot.py) on the local GPU, or say why they cannot run.

`kernel_plan(manifest, files_root, target)` decides, from what the artifact records, which kernels the CUDA
ops launch, and returns a `KernelPlan`: the line `runtime.load` prints, and the launcher the ops get.

    stored   the artifact holds kernels for the GPU's sm, built by the local Triton version, from the kernel
             source the installed dsv4c launches (same sha256): each launch whose specialisation the
             artifact holds runs its stored cubin (`StoredKernelLauncher`; Triton's CompiledKernel over the
             stored binary and launch metadata, nothing compiled); any other launch (a token count not
             built, a misaligned pointer) is compiled from the source on first use, and the launcher says so
             once per specialisation.
    compile  kernels for this sm exist but were built by another Triton: the launches are compiled on first
             use from the installed kernel source, byte-identical to the stored one, and the line says so.
    installed  the stored source differs from the installed kernel source, or the stored launch metadata
             names its specialisations differently (another dsv4c built the artifact): its binaries'
             arguments may not be the installed launches', so the installed kernels are compiled and run,
             and the line says so. The stored source is never executed (nothing in an artifact runs as
             Python).
    none     no kernels for this sm: compiled on first use.
    reference  cpu, or a GPU without Triton: the ops' PyTorch reference implementations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from dsv4c.codegen.kernel_catalog import kernel_source
from dsv4c.runtime.artifact_io import ArtifactError


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What runs the mHC kernels: `mode` (stored / compile / installed / none / reference), the message,
    and the launcher to hand the CUDA ops (None: Triton's JIT, the ops' default)."""

    mode: str
    message: str
    launcher: Any = None


class StoredKernelLauncher:
    """A launcher (codegen/kernels/launcher.py) that runs stored binaries by `KernelSpec`, falling back to
    Triton's JIT for a launch it holds no binary for (saying so once per specialisation through `say`)."""

    def __init__(self, compiled: Mapping[Any, tuple[Any, str]], fallback: Callable, say: Callable[[str], None]):
        """`compiled`: KernelSpec -> (Triton CompiledKernel, the artifact path of its cubin)."""
        self._compiled = dict(compiled)
        self._fallback = fallback
        self._say = say
        self._missed: set = set()
        self.launched_stored = 0
        self.launched_jit = 0

    def __call__(self, launch) -> None:
        spec = launch.spec()
        kernel, cubin = self._compiled.get(spec, (None, None))
        if kernel is not None and launch.pointers_aligned():
            try:  # the cubin is loaded into the current CUDA context at its first launch
                kernel[tuple(launch.grid) + (1,) * (3 - len(launch.grid))](*launch.ordered_values())
            except Exception as error:
                raise RuntimeError(f"stored kernel {spec.name} ({cubin}) failed to launch: "
                                   f"{type(error).__name__}: {error}") from error
            self.launched_stored += 1
            return
        if spec not in self._missed:
            self._missed.add(spec)
            why = "its pointers are not 16-byte aligned" if kernel is not None else "the artifact has no binary for it"
            self._say(f"dsv4c: compiling {spec.name} ({spec.kernel}) from source on first use: {why}")
        self._fallback(launch)
        self.launched_jit += 1


def kernel_plan(manifest: Mapping[str, Any], root: Path, target: str, *, local_triton: str | None,
                source: bytes | None = None, load_binaries: bool = True,
                say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> KernelPlan:
    """Which kernels run the artifact at `root` on `target` (an sm string or "cpu"); see the module doc.
    `source`: the installed kernel source (default: read it); `load_binaries` False decides without
    building the launcher (no GPU, no Triton needed)."""
    if target == "cpu":
        return KernelPlan("reference", f"dsv4c: {root} runs on cpu: the reference implementations of the mHC ops")
    if local_triton is None:
        return KernelPlan("reference", f"dsv4c: Triton is not installed: the reference implementations of the mHC "
                                       f"ops run on {target}")
    table = manifest.get("kernels", {})
    entries = table.get(target)
    if not entries:
        return KernelPlan("none", f"dsv4c: {root} holds no kernels for {target}; the mHC kernels will be compiled "
                                  f"from their Triton source on first use")
    built = sorted({str(entry.get("triton")) for entry in entries})
    installed = source if source is not None else kernel_source()
    sources = {entry["files"]["source"] for entry in entries}
    if any(_read_checked(manifest, root, rel) != installed for rel in sorted(sources)):
        return _installed(root, target, "from another version of the kernel source than the installed dsv4c's")
    if built != [str(local_triton)]:
        return KernelPlan("compile", f"dsv4c: {root} holds {target} kernels built with Triton {', '.join(built)}, "
                                     f"local Triton is {local_triton}: the kernels will be compiled on first use "
                                     f"from the installed kernel source, byte-identical to the stored one")
    names = ", ".join(entry["name"] for entry in entries)
    message = (f"dsv4c: launching the {len(entries)} ahead-of-time mHC kernels of {root} for {target} "
               f"(Triton {local_triton}) from their stored binaries: {names}")
    if not load_binaries:
        return KernelPlan("stored", message)
    from dsv4c.codegen.kernels.launcher import JIT

    try:
        binaries = _load_binaries(manifest, root, entries)
    except _OtherLaunchDescriptions as other:
        return _installed(root, target, f"with launch descriptions of another dsv4c ({other})")
    return KernelPlan("stored", message, StoredKernelLauncher(binaries, JIT, say))


class _OtherLaunchDescriptions(Exception):
    """A verified entry whose recorded specialisation this dsv4c names differently (codegen/kernels/launcher.py
    changed since the artifact was built): its binary cannot be matched to this dsv4c's launches."""


def _installed(root: Path, target: str, why: str) -> KernelPlan:
    return KernelPlan("installed", f"dsv4c: {root} holds {target} kernels built {why}; the installed kernels will "
                                   f"be compiled on first use (the stored source is never executed)")


def _read_checked(manifest: Mapping[str, Any], root: Path, rel: str) -> bytes:
    """A file of the artifact, checked against the manifest's sha256 again as it is read."""
    record = manifest.get("files", {}).get(rel)
    if record is None:
        raise ArtifactError(f"{root}: kernel file {rel!r} is not in the manifest's file table")
    try:
        data = (root / rel).read_bytes()
    except OSError as error:
        raise ArtifactError(f"{root}: kernel file {rel} cannot be read ({error.strerror or error})") from None
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ArtifactError(f"{root}: {rel} does not match its sha256 in the manifest (modified after loading?)")
    return data


def _load_binaries(manifest: Mapping[str, Any], root: Path, entries: list[dict]) -> dict:
    """KernelSpec -> (Triton CompiledKernel over the entry's stored cubin and Triton metadata, cubin path)."""
    from triton.compiler import ASTSource, CompiledKernel

    from dsv4c.codegen.kernel_catalog import kernel_function, kernel_source_attrs
    from dsv4c.codegen.kernels.launcher import KernelSpec

    out = {}
    with tempfile.TemporaryDirectory(prefix="dsv4c-kernels-") as tmp:
        for entry in entries:
            files = entry["files"]
            meta_bytes = _read_checked(manifest, root, files["json"])
            cubin = _read_checked(manifest, root, files["cubin"])
            try:
                meta = json.loads(meta_bytes)
                spec = KernelSpec.from_json(meta, kernel_function(meta["kernel"]).arg_names)
                triton_metadata = json.dumps(meta["triton_metadata"]).encode()
            except (KeyError, TypeError, ValueError) as error:
                raise ArtifactError(f"{root}: {files['json']}: not launch metadata of an mHC kernel "
                                    f"({type(error).__name__}: {error})") from None
            if spec.name != entry["name"]:
                raise _OtherLaunchDescriptions(f"{files['json']} describes {entry['name']}, named {spec.name} here")
            fn, attrs = kernel_source_attrs(spec)
            group = {}
            for ext, data in (("json", triton_metadata), ("cubin", cubin)):
                path = Path(tmp) / f"{spec.name}.{ext}"
                path.write_bytes(data)
                group[path.name] = str(path)
            try:
                compiled = CompiledKernel(ASTSource(fn, dict(spec.signature), dict(spec.constexprs), attrs), group,
                                          spec.name)
            except Exception as error:
                raise ArtifactError(f"{root}: {files['cubin']} with {files['json']}: Triton cannot load it "
                                    f"({type(error).__name__}: {error})") from None
            out[spec] = (compiled, files["cubin"])
    return out
