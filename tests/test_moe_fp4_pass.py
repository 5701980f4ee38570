"""passes/moe_fp4.py: the MoE (routed experts, shared expert, combine) lowered to `dsv4c::moe_fp4`.

Exact match counts on the captured one-layer tiny step for a GPU target, outputs bit-equal before and after on
fresh random inputs at batches 1 and 3 (the op's reference computes the graph's own ops on the same values in
the same order: tolerance 0); on cpu the pass leaves the graph alone unless a format is asked for, and an asked
W4A4 is recorded as a change of numerics; near misses (the shared expert's two clamps with different limits,
its hidden value read elsewhere) are left alone, next to the same small graph without the miss, which matches.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops)
from dsv4c.compiler.capture import StepVariant, capture
from dsv4c.model import quant
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.manager import PassContext, compare_values, run_pipeline
from dsv4c.passes.moe_fp4 import moe_fp4
from dsv4c.passes.noop_removal import noop_removal
from dsv4c.passes.pipeline import pipeline_for
from pass_graphs import export_flat, step_input_maker, targets

MAX_SEQ_LEN = 64
FUSED, ROUTED = "dsv4c.moe_fp4.default", "dsv4c.routed_moe.default"


def run_checked(gm, make_inputs, target, activations=None, equal=True):
    """The pass alone on `target` (debug mode: the manager's own before/after check), and bit-equal outputs on
    fresh inputs at batches 1 and 3 when `equal`."""
    inputs = {batch: make_inputs(batch) for batch in (1, 3)} if equal else {}
    want = {batch: gm(*[x.clone() for x in inputs[batch]]) for batch in inputs}
    ctx = PassContext(target, equal, make_inputs if equal else None, 0.0, (1, 3))
    gm, (record,) = run_pipeline(gm, [("moe_fp4", functools.partial(moe_fp4, activations=activations))], ctx)
    for batch in inputs:
        got = gm(*[x.clone() for x in inputs[batch]])
        for i, (g, w) in enumerate(zip(got, want[batch])):
            assert compare_values(g, w, 0.0) is None, f"output {i} at batch {batch}"
    return gm, record


@pytest.fixture(scope="module")
def step():
    """One hash-routed MoE layer (tiny cut to one layer), faithful numerics, through the passes before moe_fp4."""
    cfg = tiny().replace(num_hidden_layers=1, compress_ratios=(0, 0), hc_sinkhorn_iters=2)
    weights = dict(synthetic_tensors(cfg, seed=5))
    captured = capture(cfg, Numerics.faithful(), weights, StepVariant("main", 1), MAX_SEQ_LEN)
    entries = pipeline_for("h100")
    at = [e.name for e in entries].index("moe_fp4")
    assert "fp8_linear" in [e.name for e in entries[:at]] and "constant_folding" in [e.name for e in entries[at:]]
    gm, _ = run_pipeline(captured.graph_module, entries[:at], PassContext("h100"))
    return cfg, weights, captured, gm


def fresh(step):
    """The fixture's values with a copy of its graph (passes rewrite in place)."""
    cfg, weights, captured, gm = step
    return cfg, weights, captured, copy.deepcopy(gm)


def test_captured_step_lowers_its_moe_on_gpu_targets(step):
    cfg, weights, captured, gm = fresh(step)
    fp8_before = targets(gm).count("dsv4c.fp8_linear.default")
    gm, record = run_checked(gm, step_input_maker(cfg, weights, captured, MAX_SEQ_LEN), "h100")
    assert record.matches == 1 and record.details["activations"] == ["w4a8"] and not record.details["numerics_changed"]
    assert ROUTED not in targets(gm) and targets(gm).count("dsv4c.fp8_linear.default") == fp8_before - 3
    (fused,) = [n for n in gm.graph.nodes if str(n.target) == FUSED]
    name_of = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], captured.input_names))
    shared = [name_of[n] for n in fused.args[9]]
    assert shared == [f"weights.layers.0.ffn.shared_experts.{w}.{p}" for w in ("w1", "w3", "w2")
                      for p in ("weight", "scale")]
    assert fused.args[10:] == (cfg.swiglu_limit, cfg.swiglu_limit, "w4a8", True)


def test_cpu_is_left_alone_unless_asked(step):
    cfg, weights, captured, gm = fresh(step)
    left, record = run_checked(gm, step_input_maker(cfg, weights, captured, MAX_SEQ_LEN), "cpu")
    assert record.matches == 0 and record.details["left"] == 1 and ROUTED in targets(left)
    asked, record = run_checked(fresh(step)[3], None, "cpu", activations="w4a4", equal=False)
    assert record.matches == 1 and record.details == dict(activations=["w4a4"], native_fp4=False, numerics_changed=1,
                                                          left=0)
    assert "numerics changed" in record.description


# ---- small graphs ----------------------------------------------------------------------------------------
D, I, E, K = 128, 128, 4, 2


def moe_graph(up_limit: float, hidden_read_elsewhere: bool):
    """The model's MoE after routing, written with the ops capture and fp8_linear leave."""
    def fn(module, x, ids, weights, *tensors):
        lists, shared = [list(tensors[j * E:(j + 1) * E]) for j in range(6)], tensors[6 * E:]
        routed = torch.ops.dsv4c.routed_moe(x, ids, weights, *lists, 10.0, True)
        flat = x.reshape(-1, D)
        linear = lambda a, j: torch.ops.dsv4c.fp8_linear(a, shared[j], shared[j + 1], True, torch.bfloat16)  # noqa
        gate, up = linear(flat, 0).float().clamp(max=10.0), linear(flat, 2).float().clamp(-up_limit, up_limit)
        hidden = F.silu(gate) * up
        out = (routed.reshape(-1, D) + linear(hidden.to(torch.bfloat16), 4).float()).to(torch.bfloat16)
        return (out, hidden) if hidden_read_elsewhere else (out,)

    def make(batch):
        gen = torch.Generator().manual_seed(batch)
        shapes = ((I, D), (I, D), (D, I))
        lists = []
        for rows, cols in shapes:  # w1 [E], s1 [E], w3 [E], ... as the op's six lists, flattened
            packed = [quant.quantize_fp4_weight(torch.randn(rows, cols, generator=gen) * 0.1) for _ in range(E)]
            lists += [w for w, _ in packed] + [s for _, s in packed]
        fp8 = [t for rows, cols in shapes for t in quant.quantize_fp8_weight(torch.randn(rows, cols, generator=gen) * 0.1)]
        x = (torch.randn(batch, 1, D, generator=gen) * 8).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(batch)]).view(batch, 1, K)
        return [x, ids, torch.rand(batch, 1, K, generator=gen), *lists, *fp8]

    example = make(2)
    return export_flat(fn, example, batched=[True] * 3 + [False] * (len(example) - 3)), make


@pytest.mark.parametrize("miss", ["none", "clamps-differ", "hidden-read-elsewhere"])
def test_small_graph_matches_and_near_misses_do_not(miss):
    gm, make = moe_graph(up_limit=5.0 if miss == "clamps-differ" else 10.0,
                         hidden_read_elsewhere=miss == "hidden-read-elsewhere")
    gm, _ = run_pipeline(gm, [noop_removal, dead_code, cse], PassContext("h100"))  # the metadata asserts go
    gm, record = run_checked(gm, make, "h100")
    assert record.matches == (1 if miss == "none" else 0)
    assert (FUSED in targets(gm)) == (miss == "none") and (ROUTED in targets(gm)) == (miss != "none")
