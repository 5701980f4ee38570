"""The model's activation rounding as one `dsv4c` op, so that every captured graph holds it as one node.

- `dsv4c::fake_quant_fp8(x [..., K], block) -> [..., K]` in x's dtype: exactly `quant.fake_quant_fp8(x, block)`
  (e4m3 with a ue8m0 power-of-two scale per `block` values along the last dim, dequantised; K a multiple
  of `block`).
- `dsv4c::fake_quant_fp4(x [..., K], block) -> [..., K]` in x's dtype: exactly `quant.fake_quant_fp4(x, block)`
  (e2m1 with a ue8m0 scale per `block`; the Lightning Indexer's rounding of its queries and keys).

Why an op rather than the ~20 aten ops of its body: a compiler pass that fuses the rounding into a consumer
(passes/fp8_linear.py: FP8 GEMMs with the activation quantised inside; passes/kv_compression.py: caches
that store the codes) must know that a value is this exact
rounding. As one node with its block size as an argument that is a lookup, the same whichever frontend
(torch.export, Dynamo + AOTAutograd) traced the model; as a decomposed chain it would be a structural match
of every op and literal, which any rewrite of quant.py would silently break. The op's reference is
quant.py's function, so the model's numerics do not change. Importing this module registers the op (model/
layers.py imports it; so does everything that imports the model, codegen/ops.py included).
"""

from __future__ import annotations

import torch

from dsv4c.model import quant


def fake_quant_fp8_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """`quant.fake_quant_fp8(x, block)` (a fresh tensor: its last step is a product)."""
    return quant.fake_quant_fp8(x, block)


def fake_quant_fp4_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """`quant.fake_quant_fp4(x, block)` (a fresh tensor: its last step is a product)."""
    return quant.fake_quant_fp4(x, block)


def _rounding_op(name: str, reference):
    """`dsv4c::{name}(x, block)` over `reference`, with the shape check of its fake (meta) implementation."""
    op = torch.library.custom_op(f"dsv4c::{name}", reference, mutates_args=())

    @op.register_fake
    def _(x: torch.Tensor, block: int) -> torch.Tensor:
        if x.dim() < 1 or block <= 0 or x.shape[-1] % block:
            raise ValueError(f"{name}: the last dim of x {tuple(x.shape)} must be a multiple of block {block}")
        return x.new_empty(x.shape)

    return op


fake_quant_fp8 = _rounding_op("fake_quant_fp8", fake_quant_fp8_reference)
fake_quant_fp4 = _rounding_op("fake_quant_fp4", fake_quant_fp4_reference)
