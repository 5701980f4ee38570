"""The target table: every hardware fact dsv4c relies on, as data, and the lowering each pass picks per target.

A hardware question ("may this target multiply MXFP4 natively?", "how many SMs share a split-K?") is asked
through a `Target` and the predicates below, never through `torch.cuda` or an `if arch >= ...` chain in a
pass or kernel. The Blackwell rows (sm_100a, sm_103a) can be compiled for on any machine through Triton's
`GPUTarget` (`triton_gpu_target`), not run here: no B200 or GB300 is lent to this project.

    >>> target("h100").sm
    'sm_90a'
    >>> has_native_mxfp4(target("b200")), moe_lowering(target("b200")), mhc_lowering(target("cpu"))
    (True, 'w4a8', 'reference')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """One compilation target.

    name: the canonical name (the SM architecture string, or "cpu"); aliases: other accepted names.
    arch: compute capability as major*10 + minor (90, 100, 103), None for cpu.
    sm: the arch string kernels are built for ("sm_90a"; the `a` suffix enables wgmma / tcgen05).
    fp8_mma / fp4_mma: tensor cores multiply FP8 e4m3 / MXFP4 (tcgen05 `kind::mxf4`) operands natively.
    tma: the bulk tensor copy engine. smem_bytes: shared memory one block may opt into.
    sm_count: multiprocessors of the shipping part (launch heuristics size grids by it).
    """

    name: str
    aliases: tuple[str, ...]
    arch: int | None
    sm: str | None
    fp8_mma: bool
    fp4_mma: bool
    tma: bool
    smem_bytes: int
    sm_count: int
    warp_size: int = 32

    @property
    def is_gpu(self) -> bool:
        return self.arch is not None

    @property
    def triton_backend(self) -> str | None:
        """Triton's backend name for `GPUTarget`, None where Triton does not compile (cpu)."""
        return "cuda" if self.is_gpu else None


TARGETS: tuple[Target, ...] = (
    Target("cpu", (), None, None, fp8_mma=False, fp4_mma=False, tma=False, smem_bytes=0, sm_count=1),
    # H100 SXM / H200: 132 SMs, 227 KiB opt-in shared memory a block; no FP4 tensor cores.
    Target("sm_90a", ("h100", "h200", "hopper"), 90, "sm_90a", fp8_mma=True, fp4_mma=False, tma=True,
           smem_bytes=232448, sm_count=132),
    # B200: 148 SMs; tcgen05 multiplies MXFP4 natively.
    Target("sm_100a", ("b200", "blackwell"), 100, "sm_100a", fp8_mma=True, fp4_mma=True, tma=True,
           smem_bytes=232448, sm_count=148),
    # GB300 (Blackwell Ultra): 160 SMs.
    Target("sm_103a", ("gb300", "b300"), 103, "sm_103a", fp8_mma=True, fp4_mma=True, tma=True,
           smem_bytes=232448, sm_count=160),
)


def alias_table() -> dict[str, str]:
    """Every accepted name (canonical names and aliases, lower case) -> canonical name."""
    table = {}
    for t in TARGETS:
        for key in (t.name, *t.aliases):
            table[key] = t.name
    return table


def target(name: str | Target) -> Target:
    """The target called `name` (case and surrounding spaces ignored); ValueError naming the allowed ones."""
    if isinstance(name, Target):
        return name
    key = str(name).strip().lower()
    table = alias_table()
    if key not in table:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(sorted(table))}")
    return next(t for t in TARGETS if t.name == table[key])


def target_for_capability(major: int, minor: int) -> Target:
    """The target of a CUDA device of compute capability (major, minor); ValueError for one not in the table."""
    arch = major * 10 + minor
    for t in TARGETS:
        if t.arch == arch:
            return t
    known = ", ".join(f"{t.arch // 10}.{t.arch % 10} ({t.name})" for t in TARGETS if t.is_gpu)
    raise ValueError(f"no target for compute capability {major}.{minor}; known: {known}")


def target_for_device(device: Any) -> Target:
    """The target that runs on `device` (a torch.device or string): cpu, or the CUDA device's capability."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return target("cpu")
    if device.type == "cuda":
        return target_for_capability(*torch.cuda.get_device_capability(device))
    raise ValueError(f"no target for device type {device.type!r}; dsv4c targets cpu and cuda devices")


def triton_gpu_target(t: Target):
    """Triton's `GPUTarget` for compiling `t`'s kernels on any machine (Blackwell included: built, not run)."""
    if not t.is_gpu:
        raise ValueError(f"target {t.name!r} has no Triton GPU target")
    from triton.backends.compiler import GPUTarget

    return GPUTarget(t.triton_backend, t.arch, t.warp_size)


# ---- predicates: the only way code asks a hardware question -------------------------------------------
def is_gpu(t: Target) -> bool:
    return t.is_gpu


def is_hopper(t: Target) -> bool:
    return t.arch == 90


def is_blackwell(t: Target) -> bool:
    return t.arch is not None and t.arch // 10 == 10


def has_native_mxfp4(t: Target) -> bool:
    """MXFP4 x MXFP4 on the tensor cores (tcgen05 kind::mxf4); Hopper unpacks FP4 in registers instead."""
    return t.fp4_mma


def has_native_fp8(t: Target) -> bool:
    return t.fp8_mma


def has_tma(t: Target) -> bool:
    return t.tma


def runs_triton(t: Target) -> bool:
    """Triton kernels compile for this target (on cpu they only run under TRITON_INTERPRET=1, for tests)."""
    return t.is_gpu


# ---- lowerings: what each pass chooses per target ------------------------------------------------------
def moe_lowering(t: Target, native_fp4: bool = False) -> str:
    """Routed experts: "w4a8" (FP4 weights unpacked to FP8 in registers) on GPUs; "w4a4-native" (MXFP4
    activations and weights on tcgen05) only when asked for and the target has it, since quantising
    activations to FP4 changes numerics; "reference" (dequantise, torch matmuls) on cpu."""
    if not t.is_gpu:
        return "reference"
    if native_fp4 and has_native_mxfp4(t):
        return "w4a4-native"
    if native_fp4:
        raise ValueError(f"native MXFP4 MoE asked for on {t.name}, which has no FP4 tensor cores "
                         f"(targets with them: {', '.join(x.name for x in TARGETS if has_native_mxfp4(x))})")
    return "w4a8"


MOE_ACTIVATIONS = ("w4a8", "w4a16", "w4a4")  # `dsv4c compile --moe`: the fused MoE's routed activations
MOE_UNFUSED = "unfused"  # `--moe unfused`: keep routed_moe and the shared expert's FP8 linears as captured


def moe_fp4_lowering(t: Target, requested: str | None, act_quant: bool) -> str | None:
    """The routed experts' activation format of the fused MoE op (passes/moe_fp4.py) on `t`, or None to leave
    the MoE as captured: `requested` (`--moe`) wherever it is given (`unfused`: None); else the graph's own
    numerics on GPUs ("w4a8" where activations are rounded to FP8, the faithful default; "w4a16" where not), and
    None on cpu,
    where the captured ops already run their references. W4A4 runs natively where `has_native_mxfp4`."""
    if requested == MOE_UNFUSED:
        return None
    if requested is not None:
        if requested not in MOE_ACTIVATIONS:
            raise ValueError(f"--moe {requested!r}; allowed: {', '.join(MOE_ACTIVATIONS + (MOE_UNFUSED,))}")
        return requested
    if not t.is_gpu:
        return None
    return "w4a8" if act_quant else "w4a16"


def mhc_lowering(t: Target) -> str:
    """mHC boundaries: the fused Triton kernels on GPUs, the PyTorch reference on cpu."""
    return "triton" if runs_triton(t) else "reference"


def lowerings(t: Target) -> dict[str, str]:
    """The default lowering of every pass that differs per target (for logs and artifacts)."""
    return {"moe": moe_lowering(t), "mhc": mhc_lowering(t)}
