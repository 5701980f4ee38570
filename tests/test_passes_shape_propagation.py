"""shape_propagation: sympy shapes in B on every node; missing metadata re-derived; static graphs stay static."""

import pytest
import sympy
import torch

from dsv4c.passes.shape_propagation import BATCH, shape_propagation
from pass_graphs import check_pass, export_flat, random_inputs, targets

aten = torch.ops.aten


def batched(m, x, w):
    y = x @ w
    both = torch.cat([y, y * 2], 0)
    return (both.reshape(x.shape[0], 6), x.shape[0] * y)


def _by_target(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def test_match_counts_and_shapes():
    make = random_inputs([(2, 4), (4, 3)], [True, False])
    gm, record = check_pass(shape_propagation, export_flat(batched, make(2), [True, False]), make)
    annotated = [n for n in gm.graph.nodes if "dsv4c_shape" in n.meta or "dsv4c_expr" in n.meta]
    assert record.matches == len(annotated) == len(gm.graph.nodes) - 1          # all but the output
    assert gm.meta["dsv4c_batch_symbol"].startswith("s")
    assert _by_target(gm, aten.cat.default).meta["dsv4c_shape"] == (2 * BATCH, 3)
    assert _by_target(gm, aten.reshape.default).meta["dsv4c_shape"] == (BATCH, 6)
    assert _by_target(gm, aten.sym_size.int).meta["dsv4c_expr"] == BATCH
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert placeholder.meta["dsv4c_shape"] == (BATCH, 4) and placeholder.meta["dsv4c_dtype"] == torch.float32
    assert BATCH.is_positive and BATCH.is_integer


def test_missing_metadata_is_rederived_and_outputs_unchanged():
    make = random_inputs([(2, 4), (4, 3)], [True, False])
    gm = export_flat(batched, make(2), [True, False])
    matmul = _by_target(gm, aten.matmul.default)
    with gm.graph.inserting_after(matmul):
        relu = gm.graph.call_function(aten.relu.default, (matmul,))
    matmul.replace_all_uses_with(relu, delete_user_cb=lambda user: user is not relu)
    gm.recompile()
    gm, record = check_pass(shape_propagation, gm, make)
    assert record.details["rederived"] == 1
    assert relu.meta["dsv4c_shape"] == (BATCH, 3)
    assert relu.meta["val"].shape[0] is not None


def test_near_miss_static_graph_has_no_symbol():
    make = random_inputs([(2, 4), (4, 3)], [False, False])
    gm = export_flat(lambda m, x, w: (x @ w,), make(2), [False, False])
    before = targets(gm)
    gm, _ = shape_propagation(gm, None)
    assert targets(gm) == before
    assert gm.meta["dsv4c_batch_symbol"] is None
    assert _by_target(gm, aten.matmul.default).meta["dsv4c_shape"] == (2, 3)
    assert all(isinstance(e, sympy.Integer) for e in _by_target(gm, aten.matmul.default).meta["dsv4c_shape"])


def test_input_without_metadata_is_a_clear_error():
    make = random_inputs([(2, 4), (4, 3)], [True, False])
    gm = export_flat(batched, make(2), [True, False])
    next(n for n in gm.graph.nodes if n.op == "placeholder").meta.clear()
    with pytest.raises(ValueError, match="args_0 has no meta"):
        shape_propagation(gm, None)
