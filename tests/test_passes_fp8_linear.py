"""fp8_linear: exact counts on the captured tiny steps inside the cpu pipeline, outputs unchanged on fresh random
inputs (fp32 and bf16, with and without activation rounding), near misses left alone.

Tolerance: bit-equal. On CPU the op's reference multiplies the same fp32 operands (the rounded activation and
the exact decoded weight) with the same aten matmul as the graph it replaces; the Triton kernel, which sums in
another order, is tested against that reference in codegen's own tests.
"""

import pytest
import torch

from dsv4c.compiler.capture import StepVariant, capture
from dsv4c.model import layers, quant, rounding_ops
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.fp8_linear import fp8_linear
from dsv4c.passes.manager import PassContext, run_pipeline
from dsv4c.passes.noop_removal import noop_removal
from dsv4c.passes.pipeline import pipeline_for
from pass_graphs import check_pass, export_flat, step_input_maker, targets

MAX_SEQ_LEN = 128
CLEANUP = [noop_removal, dead_code, cse]
FUSED = "dsv4c.fp8_linear.default"
DECODE = torch.ops.dsv4c.dequant_fp8_weight.default


# ---- the captured tiny steps, through the cpu pipeline ------------------------------------------------
def fp8_linears(cfg, prefix, layer):
    """The FP8 weights a layer multiplies in `linear` (wo_a is FP8 too, but an einsum without rounding)."""
    names = ["attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "ffn.shared_experts.w1", "ffn.shared_experts.w2",
             "ffn.shared_experts.w3"]
    names += ["attn.indexer.wq_b"] if cfg.compress_ratios[layer] == 4 else []  # routed experts: MXFP4, not FP8
    return {f"weights.{prefix}{name}.weight" for name in names}


STEPS = {  # variant -> numerics, the FP8 linears of tiny (wo_a's groups read its row slices: one linear a group)
    "main": (Numerics.faithful(), lambda cfg: set().union(*(fp8_linears(cfg, f"layers.{i}.", i) for i in range(3)))),
    "mtp": (Numerics.plain(torch.float32),
            lambda cfg: fp8_linears(cfg, "mtp.0.", 3) | {"weights.mtp.0.e_proj.weight", "weights.mtp.0.h_proj.weight"}),
}
GROUPED = "attn.wo_a.weight"


def _source(node):
    """The placeholder a weight or scale operand reads, through the row slice of a grouped projection."""
    return node.args[0] if node.target is torch.ops.aten.slice.Tensor else node


@pytest.mark.parametrize("kind", STEPS)
def test_captured_step_fuses_every_fp8_linear_in_the_pipeline(kind):
    num, expected = STEPS[kind]
    cfg = tiny()
    weights = dict(synthetic_tensors(cfg, 0))  # packed: the FP8 weights decode through dsv4c ops in the graph
    step = capture(cfg, num, weights, StepVariant(kind, 1), MAX_SEQ_LEN)
    entries = pipeline_for("cpu")
    at = [e.name for e in entries].index("fp8_linear")
    assert {"cse", "mhc_fusion"} <= {e.name for e in entries[:at]}
    assert {"constant_folding", "shape_propagation"} <= {e.name for e in entries[at:]}

    gm, _ = run_pipeline(step.graph_module, entries[:at], PassContext())
    rounding_before = sum(1 for n in gm.graph.nodes if str(n.target) == "dsv4c.fake_quant_fp8.default"
                          and n.args[1] == 128)
    # check_pass: manager debug mode plus its own run of both graphs, bit-equal, at batches 1 and 3
    gm, record = check_pass(fp8_linear, gm, step_input_maker(cfg, weights, step, MAX_SEQ_LEN))
    gm, _ = run_pipeline(gm, entries[at + 1:], PassContext())

    prefixes = [f"layers.{i}." for i in range(3)] if kind == "main" else ["mtp.0."]
    grouped = sorted(f"weights.{p}{GROUPED}" for p in prefixes) * cfg.o_groups  # one linear per group
    assert record.matches == len(expected(cfg)) + len(grouped) == (28 if kind == "main" else 11)
    assert record.details["act_quant"] == (len(expected(cfg)) if num.act_quant else 0)
    assert (rounding_before > 0) if num.act_quant else (rounding_before == 0)
    name_of = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], step.input_names))
    fused = {n: name_of[_source(n.args[1])] for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == FUSED}
    # the pipeline's fp8_grouped_linear then makes each layer's group linears one node on the whole wo_a
    regrouped = {n: name_of[n.args[1]] for n in gm.graph.nodes if str(n.target) == "dsv4c.fp8_grouped_linear.default"}
    assert sorted(fused.values()) == sorted(expected(cfg)) and sorted(regrouped.values()) == sorted(set(grouped))
    assert all(name_of[_source(n.args[2])] == name[:-len("weight")] + "scale"
               for n, name in [*fused.items(), *regrouped.items()])
    assert {tuple(n.args[3:]) for n in fused} == {(num.act_quant, num.dtype)}
    assert {n.args[3] for n in regrouped} == {False}  # a plain fp32 product
    activation_roundings = [n for n in gm.graph.nodes
                            if str(n.target) == "dsv4c.fake_quant_fp8.default" and n.args[1] == 128]
    assert not activation_roundings  # every activation rounding fed an FP8 linear (the KV cache's, per 64, stay)
    assert not [n for n in gm.graph.nodes if n.target is DECODE]  # nothing is dequantised per step


# ---- small graphs ------------------------------------------------------------------------------------------
N, K = 200, 256  # a partial block of output rows: the scale is [2, 2]


def _packed(n=N, k=K):
    return quant.quantize_fp8_weight(torch.randn(n, k) * 0.05)


def _decoded(w, s, dtype=torch.bfloat16):
    """What capture does: decode to fp32, cast to the activation dtype."""
    return torch.ops.dsv4c.dequant_fp8_weight(w, s, torch.float32).to(dtype)


def _maker(dtype, packed=_packed):
    return lambda batch: [torch.randn(batch, 3, K).to(dtype), *packed()]


def _run(fn, make):
    """Export fn (input 0 batched), clean it up as the pipeline does, run the pass with the outputs compared."""
    example = make(2)
    gm = export_flat(fn, example, [True] + [False] * (len(example) - 1))
    gm, _ = run_pipeline(gm, CLEANUP, PassContext())
    before = targets(gm)
    gm, record = check_pass(fp8_linear, gm, make)
    return gm, record, before


@pytest.mark.parametrize("act_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_linear_fuses_bit_exactly(dtype, act_quant):
    num = Numerics(dtype=dtype, act_quant=act_quant)
    gm, record, before = _run(lambda m, x, w, s: layers.linear(x, _decoded(w, s, dtype), num, True), _maker(dtype))
    assert record.matches == 1 and record.details["act_quant"] == act_quant
    assert ("dsv4c.fake_quant_fp8.default" in before) == act_quant
    assert targets(gm) == [FUSED]
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.args[3:] == (act_quant, dtype) and node.args[0].op == "placeholder"


def test_mm_between_views_fuses():
    """AOTAutograd's spelling: the rows flattened, `mm` with `t(W)`, the rows unflattened, then the cast."""
    def fn(m, x, w, s):
        rounded = rounding_ops.fake_quant_fp8(x, 128).float().reshape(-1, K)
        return rounded.mm(_decoded(w, s).float().t()).reshape(x.shape[0], 3, N).to(torch.bfloat16)

    gm, record, before = _run(fn, _maker(torch.bfloat16))
    assert "aten.mm.default" in before and record.matches == 1 and record.details["act_quant"] == 1
    assert targets(gm) == [FUSED]


BF16 = Numerics()


def _weight_read_elsewhere(m, x, w, s):
    weight = _decoded(w, s)
    return layers.linear(x, weight, BF16, True), weight.float().sum(0)


def _rounding_read_elsewhere(m, x, w, s):
    rounded = rounding_ops.fake_quant_fp8(x, 128)
    return layers.linear(x, _decoded(w, s), BF16, True), rounded


def _product(activation, weight):
    """`(activation @ weight.float().T).to(bf16)` spelled out, for variants of `layers.linear`."""
    return (activation @ weight.float().T).to(torch.bfloat16)


def _product_read_elsewhere(m, x, w, s):
    product = x.float() @ _decoded(w, s).float().T
    return product.to(torch.bfloat16), product.sum(-1)


NEAR_MISSES = {  # name -> (fn, inputs, {"act_quant": n, "plain": n} fused, ops that must stay)
    "bf16_weight": (lambda m, x, w: layers.linear(x, w, BF16, True),
                    lambda b: [torch.randn(b, 3, K).to(torch.bfloat16), torch.randn(N, K).to(torch.bfloat16)],
                    {}, ["dsv4c.fake_quant_fp8.default", "aten.matmul.default"]),
    "fp4_weight": (lambda m, x, w, s: layers.linear(x, torch.ops.dsv4c.dequant_fp4_weight(w, s, torch.float32), BF16,
                                                     True),
                   _maker(torch.bfloat16, lambda: quant.quantize_fp4_weight(torch.randn(N, K))),
                   {}, ["dsv4c.dequant_fp4_weight.default", "aten.matmul.default"]),
    "weight_not_transposed": (lambda m, x, w, s: (x.float() @ _decoded(w, s).float()).to(torch.bfloat16),
                              _maker(torch.bfloat16, lambda: _packed(K, N)), {}, ["aten.matmul.default"]),
    "weight_rounded_to_fp16": (lambda m, x, w, s: _product(x.float(), _decoded(w, s, torch.float16)),
                               _maker(torch.bfloat16), {}, ["aten.matmul.default"]),
    "weight_decoded_to_fp16": (lambda m, x, w, s: _product(x.float(), torch.ops.dsv4c.dequant_fp8_weight(
                                   w, s, torch.float16)), _maker(torch.bfloat16), {}, ["aten.matmul.default"]),
    "scale_larger_than_weight": (lambda m, x, w, s: layers.linear(x, _decoded(w, s), BF16, True),
                                 _maker(torch.bfloat16, lambda: (_packed()[0], _packed(384, 384)[1])),
                                 {}, ["aten.matmul.default"]),
    # fused, but what other nodes read stays for them
    "decode_read_elsewhere": (_weight_read_elsewhere, _maker(torch.bfloat16), {"act_quant": 1},
                              ["dsv4c.dequant_fp8_weight.default"]),
    "rounding_read_elsewhere": (_rounding_read_elsewhere, _maker(torch.bfloat16), {"act_quant": 1},
                                ["dsv4c.fake_quant_fp8.default"]),
    "product_read_elsewhere": (_product_read_elsewhere, _maker(torch.bfloat16), {"plain": 1}, ["aten.to.dtype"]),
    # not the activation rounding of an FP8 linear: its result is the op's x, without act_quant
    "rounding_by_64": (lambda m, x, w, s: _product(rounding_ops.fake_quant_fp8(x, 64).float(), _decoded(w, s)),
                       _maker(torch.bfloat16), {"plain": 1}, ["dsv4c.fake_quant_fp8.default"]),
    "hand_written_rounding": (lambda m, x, w, s: _product(quant.fake_quant_fp8(x, 128).float(), _decoded(w, s)),
                              _maker(torch.bfloat16), {"plain": 1}, ["aten.amax.default", "aten.frexp.Tensor"]),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_misses(name):
    fn, make, fused, stays = NEAR_MISSES[name]
    gm, record, before = _run(fn, make)
    assert {k: v for k, v in record.details.items() if k in ("act_quant", "plain") and v} == fused
    assert record.matches == sum(fused.values())
    if not fused:
        assert targets(gm) == before
    assert all(op in targets(gm) for op in stays)
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == FUSED]:
        assert node.args[4] == (torch.float32 if name == "product_read_elsewhere" else torch.bfloat16)
        if name == "rounding_by_64":
            assert node.args[0].target is torch.ops.dsv4c.fake_quant_fp8.default and node.args[0].args[1] == 64


# ---- the grouped output projection: rows of one decoded weight per group ------------------------------
def _grouped(rows_per_group, groups=2):
    """model/attention.py's output_projection on a [groups * rows, K] weight: group g times its rows."""
    num = Numerics(dtype=torch.bfloat16, act_quant=False)

    def fn(m, x, w, s):
        weight = _decoded(w, s)
        return (torch.cat([layers.linear(x[..., g, :], weight[g * rows_per_group:(g + 1) * rows_per_group], num,
                                         False) for g in range(groups)], dim=-1),)
    make = lambda batch: [torch.randn(batch, groups, K).to(torch.bfloat16),
                          *_packed(groups * rows_per_group, K)]
    return fn, make


def test_group_rows_of_whole_scale_blocks_fuse_on_slices_of_the_packed_weight():
    fn, make = _grouped(128)
    gm, record, _ = _run(fn, make)
    assert record.matches == 2 and record.details["decodes_left"] == 0
    slices = [n for n in gm.graph.nodes if n.target is torch.ops.aten.slice.Tensor and n.args[0].op == "placeholder"]
    assert sorted((n.args[2], n.args[3]) for n in slices) == [(0, 1), (0, 128), (1, 2), (128, 256)]


def test_group_rows_inside_one_scale_block_fuse_on_that_block_s_scales():
    fn, make = _grouped(64)  # both groups inside the first 128-row scale block: each reads its row of scales
    gm, record, _ = _run(fn, make)
    assert record.matches == 2 and record.details["decodes_left"] == 0
    slices = [n for n in gm.graph.nodes if n.target is torch.ops.aten.slice.Tensor and n.args[0].op == "placeholder"]
    assert sorted((n.args[2], n.args[3]) for n in slices) == [(0, 1), (0, 1), (0, 64), (64, 128)]


def test_group_rows_that_start_inside_a_scale_block_and_leave_it_are_left_alone():
    fn, make = _grouped(96)  # the second group, rows 96..191, takes the end of block 0 and the start of block 1
    gm, record, _ = _run(fn, make)
    assert record.matches == 1 and record.details["decodes_left"] == 1
