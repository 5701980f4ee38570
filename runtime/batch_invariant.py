"""Batch-invariant steps: a row's result does not depend on the other rows of its step, on CPU and on CUDA.

A BLAS library picks its kernel, and with it the order in which a dot product's terms are summed, by the shape
of the call: MKL sums a one-row product (a matrix-vector kernel) in another order than a two-row one, and
that in another than four rows; cuBLAS picks its algorithm (split-K, tile, tensor-core instruction) by the
shape too, and PyTorch's CUDA reductions split a row over more threads, or blocks, when there are fewer rows.
So the same token computed in a step of one token, of 1 + k tokens (MTP verification) or beside other
sequences (a batch) gets logits that differ in the last bits, and in bf16 with FP8 requantisation such a
difference grows until a near-tie flips the greedy token.

CPU. Within `batch_invariant()`, the CPU kernels of `aten::mm` and `aten::bmm` (which every `matmul`, `einsum`
and linear layer decomposes into, inside the fused ops' reference implementations too) compute one output row
at a time: each row is its own one-row product, on a fresh (64-byte aligned) copy of the row, against the other
operand in one canonical layout (transposed-contiguous and 64-byte aligned; a weight's transposed view already
is one, anything else is copied into it). Nothing the library sees depends on how many rows the call had. The
other reductions (sum, mean, amax, softmax over a fixed length) are computed per row by PyTorch's CPU
reduction loops whatever the number of rows, and the attention gives every token a key window of fixed length
(model/attention.py), so no reduction's length depends on the step either.

Elementwise transcendental ops have the same problem in another form: PyTorch's CPU loop runs SIMD code over
whole pairs of vectors and scalar code over the tail, and the two round differently (sigmoid, silu, softplus,
exp2 in fp32, rsqrt in bf16: measured), so an element's value depends on where the tensor ends. Within the
block those ops (`TAIL_SENSITIVE`) run on a copy padded to a whole number of vector pairs, in pieces small
enough that no thread splits them: every element takes the SIMD path.

CUDA (where Triton is installed). Within the block, the CUDA kernels of the aten ops that sum run Triton
kernels whose order of summation is fixed by the sizes that do not grow with the step
(runtime/batch_invariant_cuda.py, codegen/kernels/batch_invariant_launch.py): `mm`, `bmm` and `addmm` on bf16,
fp16 or fp32 operands (whatever product the passes left to aten: on GPU targets the bf16-weight linears are
`dsv4c::bf16_linear`, on the same matmul kernel), `sum.dim_IntList` and
`mean.dim` over any dims (RMS norms, the compressor's pooling, the routing weights' normalisation), `_softmax`
and `_log_softmax` over any dim. Other dtypes, and sums over every dim, run PyTorch's kernels (through their
`out` overloads, which the override leaves alone). Not overridden, because their result does not depend on an
order: `amax` / `max` (exact in any order), `topk` (a selection of exact values; which of two equal values comes
first is the one thing left to the algorithm), elementwise ops (a CUDA thread computes each element with the
same code wherever it sits). dsv4c's own kernels are invariant by their launch choices (the FP8 GEMM's K split,
the attention's key ranges, the MoE's shape-only launches: codegen/kernels/fp8_gemm_launch.py, attention.py,
moe_fp4_launch.py). The mHC kernels' tuned launches change with the token count above 8 tokens (tensor-core dots
on token blocks, codegen/kernels/mhc_launch.py), so the runtime's executors call the mHC ops' CUDA implementations
bound to `batch_invariant_launch` (one token a program, D split by its size alone, the tuned launch itself up to 8
tokens: runtime/loader.py `mhc_implementations`) whether or not a block is open. The runtime's runners enter the
block for every step their executors run and for the CUDA-graph captures (runtime/step_runner.py,
eager_runner.py), so the graphs hold these kernels; a replay dispatches no aten op and enters nothing.

The override is process-wide while a block runs (a kernel registration: `torch.library`); nested blocks share
it.

Cost. CPU: a product of M rows makes M library calls and reads its weight M times. A decode step of one
sequence and one token pays nothing but the call overhead (tiny: +30% a step, the Python per product); an MTP
verification of 1 + k tokens or a batch of B sequences pays (1 + k) x B matrix-vector products instead of one
matrix product (the weight is re-read from cache on a CPU; a 32-token prefill chunk about 3-5x the GEMM).
CUDA: each overridden op is a Python call and a Triton launch on the host (tens of microseconds), which the
CUDA graphs of the decode and verification steps remove and the graph-free steps (prefill chunks) pay; on the
device, the products use 16-row tiles with no M-dependent tuning, fp32 products run as fp32 FMAs (as cuBLAS
without TF32, but at Triton's FMA-path speed), and a small-N product's K split (chosen for one row tile)
writes fp32 partials until the tiles fill the GPU; the reductions read their input once (softmax three times),
in one launch. The mHC boundaries cost nothing up to 8 tokens a step (the tuned launch); above, every token's
programs read the whole mHC weight fn and multiply with FMAs, where the tuned launches read it once a 16- or
64-token block on the tensor cores, so their time grows with the step's tokens. `bench/batch_invariance_check.py`
measures a step with and without the block, `bench/mhc_bench.py --invariant` an mHC boundary at each launch.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F

from dsv4c.runtime.batch_invariant_cuda import cuda_kernels

ALIGNMENT = 64  # bytes: the CPU allocator's alignment, the one a fresh tensor gets


def _canonical(b: torch.Tensor) -> torch.Tensor:
    """`b` [K, N] as the transpose of an aligned contiguous [N, K] (a view when it already is one)."""
    bt = b.transpose(0, 1)
    if not bt.is_contiguous() or bt.data_ptr() % ALIGNMENT:
        bt = bt.clone(memory_format=torch.contiguous_format)
    return bt.transpose(0, 1)


def rowwise_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for a [M, K], b [K, N], one row at a time (module docstring). Calls `mm.out`, which the
    override leaves to the library."""
    b = _canonical(b)
    dtype = torch.result_type(a, b)
    out = torch.empty((a.shape[0], b.shape[1]), dtype=dtype, device=a.device)
    if a.shape[0] == 1 and a.is_contiguous() and a.data_ptr() % ALIGNMENT == 0:
        return torch.mm(a, b, out=out)
    row_out = torch.empty((1, b.shape[1]), dtype=dtype, device=a.device)
    for row in range(a.shape[0]):
        torch.mm(a[row:row + 1].clone(memory_format=torch.contiguous_format), b, out=row_out)
        out[row] = row_out[0]
    return out


def rowwise_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for a [G, M, K], b [G, K, N]: `rowwise_mm` per matrix."""
    out = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.result_type(a, b), device=a.device)
    for g in range(a.shape[0]):
        out[g] = rowwise_mm(a[g], b[g])
    return out


# Unary ops whose CPU kernel rounds its SIMD path and its scalar tail differently (or may); all are defined at
# zero, the padding.
TAIL_SENSITIVE = ("sigmoid", "silu", "softplus", "exp", "exp2", "log", "rsqrt", "sin", "cos", "tanh")
VECTOR_PAIR = 64  # elements: a multiple of two SIMD vectors of bf16 or fp32 on AVX-512 (and narrower units)
PIECE = 32768 - 32768 % VECTOR_PAIR  # at most PyTorch's grain size: a loop this long runs on one thread


def whole_vectors(name: str):
    """The CPU kernel of unary op `name` computed on padded pieces of `VECTOR_PAIR` multiples (module docstring),
    through its `out` overload (which the override leaves to PyTorch); extra arguments (softplus's beta and
    threshold) pass through."""
    out_op = getattr(torch.ops.aten, name).out

    def run(x: torch.Tensor, *args) -> torch.Tensor:
        flat = x.reshape(-1)
        if flat.numel() <= PIECE:  # the common case: one padded piece
            computed = out_op(F.pad(flat, (0, -flat.numel() % VECTOR_PAIR)), *args,
                              out=torch.empty(-(-flat.numel() // VECTOR_PAIR) * VECTOR_PAIR, dtype=x.dtype))
            return computed[:flat.numel()].reshape(x.shape)
        result = torch.empty(flat.shape, dtype=x.dtype)
        for begin in range(0, flat.numel(), PIECE):
            piece = flat[begin:begin + PIECE]
            result[begin:begin + piece.numel()] = run(piece, *args)
        return result.reshape(x.shape)
    return run


class _Override:
    """The registration of the row-wise CPU kernels and the CUDA kernels, shared by nested blocks (a count under
    a lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._library: torch.library.Library | None = None
        self._cuda_kernels = cuda_kernels()  # once: asking whether Triton is installed reads package metadata

    def enter(self) -> None:
        with self._lock:
            if self._depth == 0:
                with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
                    warnings.simplefilter("ignore")
                    library = torch.library.Library("aten", "IMPL")
                    library.impl("mm", rowwise_mm, "CPU")
                    library.impl("bmm", rowwise_bmm, "CPU")
                    for name in TAIL_SENSITIVE:
                        library.impl(name, whole_vectors(name), "CPU")
                    for name, kernel in self._cuda_kernels.items():
                        library.impl(name, kernel, "CUDA")
                self._library = library
            self._depth += 1

    def exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._library._destroy()  # restores the library's kernels
                self._library = None


_OVERRIDE = _Override()


@contextlib.contextmanager
def batch_invariant() -> Iterator[None]:
    """Within the block, CPU and CUDA matrix products and reductions give each row the result it gets alone
    (module docstring)."""
    _OVERRIDE.enter()
    try:
        yield
    finally:
        _OVERRIDE.exit()
