"""fp8_grouped_linear: exact counts on the captured tiny step inside the cpu pipeline, outputs unchanged on fresh
random inputs (fp32 and bf16, with and without activation rounding, G = 2 and 4), near misses left alone.

Tolerance: bit-equal. On CPU the op's reference is fp8_linear's reference on the same views, group by group,
concatenated: the same aten calls as the graph it replaces (the kernel is tested in tests/test_fp8_grouped_linear.py).
"""

import pytest
import torch

from dsv4c.compiler.capture import StepVariant, capture
from dsv4c.model import layers, quant
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.fp8_grouped_linear import fp8_grouped_linear
from dsv4c.passes.fp8_linear import fp8_linear
from dsv4c.passes.manager import PassContext, run_pipeline
from dsv4c.passes.noop_removal import noop_removal
from dsv4c.passes.pipeline import pipeline_for
from pass_graphs import check_pass, export_flat, step_input_maker, targets

MAX_SEQ_LEN = 128
CLEANUP = [noop_removal, dead_code, cse]
LINEAR, GROUPED, CAT = "dsv4c.fp8_linear.default", "dsv4c.fp8_grouped_linear.default", "aten.cat.default"
K = 256


# ---- the captured tiny step, through the cpu pipeline ------------------------------------------------
@pytest.mark.parametrize("kind, num, layer_names", [
    ("main", Numerics.faithful(), [f"layers.{i}." for i in range(3)]),
    ("mtp", Numerics.plain(torch.float32), ["mtp.0."])])
def test_captured_step_fuses_each_layer_s_output_projection(kind, num, layer_names):
    cfg = tiny()
    weights = dict(synthetic_tensors(cfg, 0))
    step = capture(cfg, num, weights, StepVariant(kind, 1), MAX_SEQ_LEN)
    entries = pipeline_for("cpu")
    at = [e.name for e in entries].index("fp8_grouped_linear")
    assert entries[at - 1].name == "fp8_linear"
    gm, _ = run_pipeline(step.graph_module, entries[:at], PassContext())
    linears_before, cats_before = targets(gm).count(LINEAR), targets(gm).count(CAT)

    gm, record = check_pass(fp8_grouped_linear, gm, step_input_maker(cfg, weights, step, MAX_SEQ_LEN))

    layers_count = len(layer_names)
    assert record.matches == layers_count and record.details["linears"] == cfg.o_groups * layers_count
    assert targets(gm).count(LINEAR) == linears_before - cfg.o_groups * layers_count
    assert targets(gm).count(CAT) == cats_before - layers_count
    assert not [n for n in gm.graph.nodes if str(n.target) == CAT and any(str(a.target) == LINEAR for a in n.args[0])]
    name_of = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], step.input_names))
    fused = [n for n in gm.graph.nodes if str(n.target) == GROUPED]
    assert sorted(name_of[n.args[1]] for n in fused) == sorted(f"weights.{p}attn.wo_a.weight" for p in layer_names)
    assert all(name_of[n.args[2]] == name_of[n.args[1]][:-len("weight")] + "scale" for n in fused)
    assert {tuple(n.args[3:]) for n in fused} == {(False, num.dtype)}  # wo_a: a plain product, no rounding
    assert all(n.meta["val"].shape[-1] == cfg.o_groups * cfg.o_lora_rank for n in fused)


# ---- small graphs --------------------------------------------------------------------------------------------
def _maker(groups, rows, dtype, weight_groups=None):
    """x [batch, 3, groups, K] and a packed weight of (weight_groups or groups) * rows rows."""
    def make(batch):
        weight, scale = quant.quantize_fp8_weight(torch.randn((weight_groups or groups) * rows, K) * 0.05)
        return [torch.randn(batch, 3, groups, K).to(dtype), weight, scale]
    return make


def _part(x, w, s, g, rows, act_quant, dtype):
    """fp8_linear of group g on its rows and the scale rows from the block of its first row, as many as its rows
    need (as the fp8_linear pass slices them, where it fuses a slice)."""
    first = g * rows // 128
    return torch.ops.dsv4c.fp8_linear(x[..., g, :], w[g * rows:(g + 1) * rows], s[first:first + -(-rows // 128)],
                                      act_quant, dtype)


def _grouped(order, rows=128, act_quant=(False,), dtype=torch.bfloat16, cat_dim=-1):
    """cat([part_g for g in order], cat_dim), part g with act_quant[g % len(act_quant)]."""
    return lambda m, x, w, s: (torch.cat([_part(x, w, s, g, rows, act_quant[g % len(act_quant)], dtype)
                                          for g in order], cat_dim),)


def _run(fn, make, passes=()):
    """Export fn (input 0 batched), clean up as the pipeline does, run `passes`, then this pass, compared."""
    example = make(2)
    gm = export_flat(fn, example, [True] + [False] * (len(example) - 1))
    gm, _ = run_pipeline(gm, CLEANUP + list(passes), PassContext())
    before = targets(gm)
    gm, record = check_pass(fp8_grouped_linear, gm, make)
    return gm, record, before


@pytest.mark.parametrize("groups, rows", [(2, 128), (4, 256), (2, 64), (4, 32)])  # whole scale blocks, inside one
@pytest.mark.parametrize("act_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_in_order_fuse_bit_exactly(groups, rows, act_quant, dtype):
    gm, record, before = _run(_grouped(range(groups), rows, (act_quant,), dtype), _maker(groups, rows, dtype))
    assert before.count(LINEAR) == groups and record.matches == 1 and record.details["linears"] == groups
    assert targets(gm) == [GROUPED]
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [a.op for a in node.args[:3]] == ["placeholder"] * 3 and node.args[3:] == (act_quant, dtype)


def test_model_output_projection_fuses_after_fp8_linear():
    """model/attention.py's grouped projection on a decoded weight: fp8_linear makes the parts, this pass one op."""
    num = Numerics(dtype=torch.bfloat16, act_quant=False)

    def fn(m, x, w, s):
        weight = torch.ops.dsv4c.dequant_fp8_weight(w, s, torch.float32).to(torch.bfloat16)
        return (torch.cat([layers.linear(x[..., g, :], weight[g * 256:(g + 1) * 256], num, False)
                           for g in range(2)], dim=-1),)

    gm, record, before = _run(fn, _maker(2, 256, torch.bfloat16), [fp8_linear])
    assert before.count(LINEAR) == 2 and record.matches == 1
    assert targets(gm) == [GROUPED]


def _part_read_elsewhere(m, x, w, s):
    parts = [_part(x, w, s, g, 128, False, torch.bfloat16) for g in range(2)]
    return torch.cat(parts, -1), parts[0]


NEAR_MISSES = {  # name -> (fn, inputs)
    "missing_group": (_grouped([0, 1]), _maker(3, 128, torch.bfloat16)),
    "out_of_order": (_grouped([1, 0]), _maker(2, 128, torch.bfloat16)),
    "repeated_group": (_grouped([0, 0]), _maker(2, 128, torch.bfloat16)),
    "different_act_quant": (_grouped([0, 1], act_quant=(True, False)), _maker(2, 128, torch.bfloat16)),
    "group_across_a_scale_block_boundary": (_grouped([0, 1], rows=96), _maker(2, 96, torch.bfloat16)),
    "weight_rows_beyond_the_groups": (_grouped([0, 1]), _maker(2, 128, torch.bfloat16, weight_groups=3)),
    "part_read_elsewhere": (_part_read_elsewhere, _maker(2, 128, torch.bfloat16)),
    "cat_along_another_dim": (_grouped([0, 1], cat_dim=-2), _maker(2, 128, torch.bfloat16)),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_misses_are_left_alone(name):
    fn, make = NEAR_MISSES[name]
    gm, record, before = _run(fn, make)
    assert record.matches == 0 and targets(gm) == before and LINEAR in before
