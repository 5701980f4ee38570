"""Hadamard rounding: the normalised Walsh-Hadamard rotation then FP4 rounding -> one `dsv4c::hadamard_fake_quant_fp4`.

Pattern (model/attention.py `indexer_rounding`, the Lightning Indexer's queries once the indexer's keys are in the
fused compressor):
    Y   = hadamard(X)                  # model/quant.py: a cast to fp32, log2(N) stages of add / subtract / stack
                                       # over pairs, the 1/sqrt(N) product, the cast back to X's dtype
    out = dsv4c::fake_quant_fp4(Y, block)
  becomes
    out = dsv4c::hadamard_fake_quant_fp4(X, block)
X is found by value, whatever ops spell the rotation: searching back from Y (breadth-first, `SEARCH` nodes), the
first node of Y's shape and dtype from which Y is computed alone (no other placeholder feeds it) and equals
`quant.hadamard` of it bit for bit on random rows (four magnitudes from 1e-3 to 1e3, some values zero), as
passes/compressor_fusion.py checks its own transform. Exact: the op's reference is the same two model functions,
so the graph after equals the graph before bit for bit.

Left alone: roundings of anything but such a rotation (a rotation scaled otherwise, a partial one, the identity),
rows whose length or block the op does not take (codegen/hadamard_rounding.py `check_operands`), a symbolic size
beyond the leading (batch) dim. The rounding of a cached row never reaches here: kv_compression and the fused
compressor have taken those in.

Before: a flat aten graph with FakeTensor `meta["val"]`, after cleanup and CSE. Where: after the fusions that
read the rounding in their patterns (lightning_indexer reads its query; compressor_fusion the keys' rotation),
before norm_rope_fusion (the query's RoPE stays the rotation's input X either way) and constant folding.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from dsv4c.codegen import hadamard_rounding as hadamard_op  # (registers the op this pass emits)
from dsv4c.model import rounding_ops  # noqa: F401  (registers the rounding this pass reads)
from dsv4c.model.quant import hadamard
from dsv4c.passes.graph_match import (dtype, erase_dead_ancestors, is_, nearest_ancestor, replace_with_op, shape,
                                      static_size, subgraph_values)
from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import count_nodes

dsv4c = torch.ops.dsv4c
SEARCH = 128  # nodes searched back from the rounding's input for the rotation's input (7 stages: ~40)
SAMPLE_ROWS = 4


def rotation_input(gm: fx.GraphModule, rotated: fx.Node) -> fx.Node | None:
    """The node X with `rotated` = quant.hadamard(X), checked by value; None if there is none."""
    sizes = shape(rotated)
    if sizes is None or any(static_size(rotated, i) is None for i in range(1, len(sizes))):
        return None
    sample = _sample([static_size(rotated, i) for i in range(1, len(sizes))], dtype(rotated))

    def is_input(node: fx.Node) -> bool:
        if node is rotated or dtype(node) != dtype(rotated) or shape(node) is None \
                or len(shape(node)) != len(sizes) \
                or any(static_size(node, i) != static_size(rotated, i) for i in range(1, len(sizes))):
            return False
        got = subgraph_values(gm, [rotated], {node: sample})
        return got is not None and got[0].dtype == sample.dtype and torch.equal(got[0], hadamard(sample))

    return nearest_ancestor(rotated, is_input, SEARCH)


def _sample(sizes: list[int], dtype_: torch.dtype) -> torch.Tensor:
    """Random rows of `[SAMPLE_ROWS, *sizes]` at magnitudes 1e-3 to 1e3, the first row's first sizes[-1] // 2 values
    zero."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 3, SAMPLE_ROWS).view(-1, *[1] * len(sizes))
    sample = torch.randn((SAMPLE_ROWS, *sizes), generator=generator) * scales
    sample.view(SAMPLE_ROWS, -1)[0, :sizes[-1] // 2] = 0
    return sample.to(dtype_)


def hadamard_rounding(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Replace each FP4 rounding of a Hadamard rotation by `dsv4c::hadamard_fake_quant_fp4`."""
    before = count_nodes(gm)
    found = []
    for node in list(gm.graph.nodes):
        if not is_(node, dsv4c.fake_quant_fp4.default) or not isinstance(node.args[0], fx.Node):
            continue
        rotated, block = node.args[0], node.args[1]
        width = static_size(rotated, -1)
        if width is None or dtype(rotated) is None:
            continue
        try:
            hadamard_op.check_operands(torch.empty((1, width), dtype=dtype(rotated)), block)
        except ValueError:
            continue
        x = rotation_input(gm, rotated)
        if x is not None:
            found.append((node, x, block))
    for node, x, block in found:
        replace_with_op(gm.graph, dsv4c.hadamard_fake_quant_fp4.default, (x, block), (node,))
    erase_dead_ancestors(gm.graph, [node for node, _, _ in found])
    if found:
        gm.recompile()
    description = f"fused {len(found)} Hadamard rotations and their FP4 roundings"
    return gm, make_record("hadamard_rounding", before, gm, len(found), description)
