"""The pass manager: records, lint after each pass, numeric checks naming the culprit, DSV4C_DUMP."""

import pytest
import torch

from dsv4c.passes.manager import (PassContext, PassError, PipelineEntry, compare_values, dump_enabled, dump_env,
                                  make_record, run_pipeline)
from pass_graphs import export_flat, random_inputs

aten = torch.ops.aten


def graph_and_inputs():
    make = random_inputs([(2, 4), (2, 4)], dtypes=[torch.float32, torch.int64])
    gm = export_flat(lambda m, x, i: ((x + 1).relu(), i * 3), make(2))
    return gm, make


def rewrite(target, replacement):
    """A pass that swaps one op for another (right or wrong), counting the swaps."""
    def swap(gm, ctx):
        before = len(gm.graph.nodes)
        hits = [n for n in gm.graph.nodes if n.target == target]
        for node in hits:
            node.target = replacement
        return gm, make_record("swap", before, gm, len(hits), "swapped")
    return swap


def ctx_for(make, **kw):
    return PassContext("cpu", True, make, 1e-6, (1, 3), ("y", "count"), **kw)


def test_records_and_names():
    gm, make = graph_and_inputs()
    same = rewrite(aten.relu.default, aten.relu.default)
    gm, records = run_pipeline(gm, [PipelineEntry("first", same), same], ctx_for(make))
    assert [r.name for r in records] == ["first", "swap"]
    assert records[0].matches == 1 and records[0].nodes_before == records[0].nodes_after
    assert all(r.wall_s > 0 for r in records)


def test_wrong_float_rewrite_is_named():
    gm, make = graph_and_inputs()
    wrong = PipelineEntry("bad_swap", rewrite(aten.relu.default, aten.neg.default))
    with pytest.raises(PassError, match=r"pass bad_swap: output 0 \(y\) changed at batch 1: relative norm error"):
        run_pipeline(gm, [wrong], ctx_for(make))


def test_integer_outputs_compare_exactly():
    gm, make = graph_and_inputs()
    off_by_one = PipelineEntry("int_swap", rewrite(aten.mul.Tensor, aten.add.Tensor))
    with pytest.raises(PassError, match=r"int_swap: output 1 \(count\) changed at batch 1: \d+ elements differ"):
        run_pipeline(gm, [off_by_one], ctx_for(make))


def test_lint_rejects_non_aten_calls_and_crashes_are_named():
    gm, make = graph_and_inputs()

    def add_method(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(node):
            gm.graph.call_method("relu", (node,))
        return gm, make_record("m", 0, gm, 1, "")

    def crash(gm, ctx):
        raise KeyError("boom")

    with pytest.raises(PassError, match="pass add_method: .* call_method"):
        run_pipeline(gm, [add_method], ctx_for(make))
    with pytest.raises(PassError, match="pass crash: KeyError"):
        run_pipeline(graph_and_inputs()[0], [crash], ctx_for(make))


def test_nan_never_passes_and_infinities_must_match():
    nan = torch.tensor([1.0, float("nan")])
    assert "NaN" in compare_values(nan, torch.tensor([1.0, 2.0]), 1.0)
    inf = torch.tensor([1.0, float("-inf")])
    assert compare_values(inf.clone(), inf, 0.0) is None
    assert compare_values(torch.tensor([1.0, 0.0]), inf, 1.0) == "infinities differ"
    assert compare_values(torch.tensor([True]), torch.tensor([False]), 1.0).startswith("1 elements differ")


def test_dump_prints_counts_and_diff(capsys):
    gm, make = graph_and_inputs()
    assert not dump_enabled({"DSV4C_DUMP": "0"}) and dump_enabled({"DSV4C_DUMP": "1"})
    with dump_env(True):
        run_pipeline(gm, [rewrite(aten.relu.default, aten.abs.default)], PassContext())
    err = capsys.readouterr().err
    assert "[dsv4c] swap: 1 matches" in err and "-1  aten.relu.default" in err and "+1  aten.abs.default" in err
    with dump_env(False):
        run_pipeline(gm, [rewrite(aten.abs.default, aten.abs.default)], PassContext())
    assert capsys.readouterr().err == ""
