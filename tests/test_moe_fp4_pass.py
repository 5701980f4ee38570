"""passes/moe_fp4.py: the whole MoE (routing, routed experts, shared expert, combine) lowered to `dsv4c::moe_fp4`.

Exact match counts on the captured two-layer tiny step (a hash-routed and a score-routed MoE layer) for a GPU
target, outputs bit-equal before and after on fresh random inputs at batches 1 and 3 (the op's reference
computes the graph's own ops on the same values in the same order: tolerance 0), no routing op left; on cpu
the pass leaves the graph alone unless a format is asked for, and an asked W4A4 is recorded as a change of
numerics; near misses (the shared expert's two clamps with different limits, its hidden value read elsewhere;
a routing that is not the model's: weights gathered from the biased scores, the smallest top-k, another
softplus, the scores read elsewhere) are left alone, next to the same small graph without the miss, which
matches, score- and hash-routed.
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
    """A hash-routed and a score-routed MoE layer (tiny cut to two layers), faithful numerics, through the
    passes before moe_fp4."""
    cfg = tiny().replace(num_hidden_layers=2, compress_ratios=(0, 0, 0), hc_sinkhorn_iters=2)
    assert cfg.is_hash_layer(0) and not cfg.is_hash_layer(1)
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
    assert record.matches == 2 and record.details["activations"] == ["w4a8"] and not record.details["numerics_changed"]
    assert ROUTED not in targets(gm) and targets(gm).count("dsv4c.fp8_linear.default") == fp8_before - 6
    assert {"aten.topk.default", "aten.softplus.default", "aten.sqrt.default"}.isdisjoint(targets(gm))
    name_of = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], captured.input_names))
    name_of[None] = None
    routing = (cfg.num_experts_per_tok, cfg.scoring_func, True, cfg.routed_scaling_factor)
    for layer, fused in enumerate(n for n in gm.graph.nodes if str(n.target) == FUSED):
        ffn = f"weights.layers.{layer}.ffn."
        router, bias, table = (name_of[n] for n in fused.args[1:4])
        assert router == ffn + "gate.weight" and fused.args[1].meta["val"].dtype == torch.bfloat16
        hashed = cfg.is_hash_layer(layer)
        assert (bias, table) == ((None, ffn + "gate.tid2eid") if hashed else (ffn + "gate.bias", None))
        assert (fused.args[4] is not None) == hashed  # the token ids, read by hash layers only
        assert [name_of[n] for n in fused.args[11]] == [f"{ffn}shared_experts.{w}.{p}" for w in ("w1", "w3", "w2")
                                                        for p in ("weight", "scale")]
        assert fused.args[12:] == (*routing, cfg.swiglu_limit, cfg.swiglu_limit, "w4a8", True)


def test_cpu_is_left_alone_unless_asked(step):
    cfg, weights, captured, gm = fresh(step)
    left, record = run_checked(gm, step_input_maker(cfg, weights, captured, MAX_SEQ_LEN), "cpu")
    assert record.matches == 0 and record.details["left"] == 2 and ROUTED in targets(left)
    asked, record = run_checked(fresh(step)[3], None, "cpu", activations="w4a4", equal=False)
    assert record.matches == 2 and record.details == dict(activations=["w4a4"], native_fp4=False, numerics_changed=2,
                                                          left=0)
    assert "numerics changed" in record.description


# ---- small graphs ----------------------------------------------------------------------------------------
D, I, E, K, V = 128, 128, 4, 2, 64
MISSES = ["none", "none-hash", "clamps-differ", "hidden-read-elsewhere", "gather-biased-scores", "topk-smallest",
          "softplus-beta", "scores-read-elsewhere"]


def moe_graph(miss: str):
    """The model's MoE, routing included, written with the ops capture and fp8_linear leave; `miss` one near
    miss (or none, score- or hash-routed)."""
    hash_layer = miss == "none-hash"

    def fn(module, x, tokens, router, selector, *tensors):
        lists, shared = [list(tensors[j * E:(j + 1) * E]) for j in range(6)], tensors[6 * E:]
        flat = x.reshape(-1, D)
        logits = flat.float() @ router.float().T
        scores = torch.sqrt(F.softplus(logits, beta=2.0 if miss == "softplus-beta" else 1.0))
        if hash_layer:
            ids = selector[tokens.reshape(-1)].long()
        else:
            biased = scores + selector
            ids = biased.topk(K, dim=-1, largest=miss != "topk-smallest").indices
        weights = (biased if miss == "gather-biased-scores" else scores).gather(-1, ids)
        weights = weights / weights.sum(-1, keepdim=True) * 1.5
        lead = x.shape[:-1]
        routed = torch.ops.dsv4c.routed_moe(x, ids.unflatten(0, lead), weights.unflatten(0, lead), *lists, 10.0, True)
        linear = lambda a, j: torch.ops.dsv4c.fp8_linear(a, shared[j], shared[j + 1], True, torch.bfloat16)  # noqa
        up_limit = 5.0 if miss == "clamps-differ" else 10.0
        gate, up = linear(flat, 0).float().clamp(max=10.0), linear(flat, 2).float().clamp(-up_limit, up_limit)
        hidden = F.silu(gate) * up
        out = (routed.reshape(-1, D) + linear(hidden.to(torch.bfloat16), 4).float()).to(torch.bfloat16)
        extra = {"hidden-read-elsewhere": (hidden,), "scores-read-elsewhere": (scores,)}
        return (out, *extra.get(miss, ()))

    def make(batch):
        gen = torch.Generator().manual_seed(batch)
        shapes = ((I, D), (I, D), (D, I))
        lists = []
        for rows, cols in shapes:  # w1 [E], s1 [E], w3 [E], ... as the op's six lists, flattened
            packed = [quant.quantize_fp4_weight(torch.randn(rows, cols, generator=gen) * 0.1) for _ in range(E)]
            lists += [w for w, _ in packed] + [s for _, s in packed]
        fp8 = [t for rows, cols in shapes
               for t in quant.quantize_fp8_weight(torch.randn(rows, cols, generator=gen) * 0.1)]
        x = (torch.randn(batch, 1, D, generator=gen) * 8).to(torch.bfloat16)
        tokens = torch.randint(0, V, (batch, 1), generator=gen)
        router = (torch.randn(E, D, generator=gen) * D ** -0.5).to(torch.bfloat16)
        table = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(V)]).to(torch.int32)
        selector = table if hash_layer else torch.randn(E, generator=gen) * 0.1
        return [x, tokens, router, selector, *lists, *fp8]

    example = make(2)
    return export_flat(fn, example, batched=[True] * 2 + [False] * (len(example) - 2)), make


@pytest.mark.parametrize("miss", MISSES)
def test_small_graph_matches_and_near_misses_do_not(miss):
    gm, make = moe_graph(miss)
    gm, _ = run_pipeline(gm, [noop_removal, dead_code, cse], PassContext("h100"))  # the metadata asserts go
    gm, record = run_checked(gm, make, "h100")
    matched = miss.startswith("none")
    assert record.matches == (1 if matched else 0)
    assert (FUSED in targets(gm)) == matched and (ROUTED in targets(gm)) == (not matched)
    routing_ops = {"aten.topk.default", "aten.softplus.default", "aten.gather.default", "aten.index.Tensor"}
    assert routing_ops.isdisjoint(targets(gm)) == matched
