"""The sparse decode attention kernel (codegen/kernels/attention.py) under TRITON_INTERPRET=1 against its op's
reference (codegen/sparse_attention.py: the model's `attend` on unpacked rows), at Flash's row layout (512 dims,
448 e4m3 + 64 bf16, window 128) with fewer heads: contexts 1, 127, 128, 129 and 1000, 1 and 4 query tokens, C4
with more ids than entries (and none at all) and C128 with no complete entry yet.

Tolerance 1e-2 relative norm error: the kernel's products and sums are fp32, the reference rounds its
probabilities to bf16 before they multiply V, and both round the output to bf16 (measured 3e-3 to 5e-3).
The kernels run in a spawned child that sets TRITON_INTERPRET before importing Triton (tests/child_pool.py).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from child_pool import child_pool
from dsv4c.codegen import sparse_attention
from dsv4c.codegen.kv_cache import kv_pack

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
TOL = 1e-2
HEADS, WIDTH, ROUNDED, WINDOW, SLOTS = 16, 512, 448, 128, 130


def _start_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)


def _kernel(*args):
    from dsv4c.codegen.kernels import attention

    return attention.sparse_decode_attention(*args)


@pytest.fixture(scope="module")
def interpreter():
    with child_pool(_start_interpreter) as pool:
        yield lambda *args: pool.submit(_kernel, *args).result()


def rows(*shape: int) -> torch.Tensor:
    return kv_pack((torch.randn(*shape, WIDTH) * 2).bfloat16(), "e4m3", ROUNDED, 64)


def inputs(context: int, steps: int, ratio: int, topk: int):
    """Two sequences whose last query sits at position context - 1 (the second one step behind)."""
    entries = 1000 // max(ratio, 1) + 1
    start = torch.tensor([context - steps, max(context - steps - 1, 0)])
    ids = torch.zeros(2, steps, 0, dtype=torch.int64)
    if topk:  # every complete entry of each query, padded with -1 up to topk: more ids than entries
        visible = (start.unsqueeze(1) + torch.arange(steps) + 1) // ratio
        ids = torch.where(torch.arange(topk) < visible.unsqueeze(-1), torch.arange(topk), -1)
    q = torch.randn(2, steps, HEADS, WIDTH).bfloat16()
    return (q, rows(2, steps), rows(2, SLOTS), rows(2, entries), ids, start, torch.randn(HEADS), WIDTH ** -0.5,
            WINDOW, ratio, ROUNDED, 64)


@pytest.mark.parametrize("context", [1, 127, 128, 129, 1000])
@pytest.mark.parametrize("steps,ratio,topk", [(1, 4, 300), (4, 4, 300), (1, 128, 0), (4, 0, 0)])
def test_kernel_matches_the_reference(interpreter, context, steps, ratio, topk):
    if context < steps:
        pytest.skip("a step's tokens start at position 0 or later")
    args = inputs(context, steps, ratio, topk)
    want = sparse_attention.reference(*args)
    got = interpreter(*args)
    assert not torch.isnan(got).any() and got.dtype == want.dtype and got.shape == want.shape
    error = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert error <= TOL, error
