"""mhc_fusion: exact counts on the captured tiny step and on transformers' graph through the backend,
outputs unchanged on fresh random inputs, near misses (and graphs without mHC) left alone."""

import operator

import pytest
import torch
import torch.nn.functional as F

from dsv4c.model import layers
from dsv4c.compiler.backend import BackendLog, make_backend
from dsv4c.compiler.capture import StepVariant, capture
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.manager import PassContext, compare_values, run_pipeline
from dsv4c.passes.mhc_fusion import FUSED, mhc_fusion
from dsv4c.passes.noop_removal import noop_removal
from pass_graphs import check_pass, export_flat, random_inputs, step_input_maker, targets

MAX_SEQ_LEN = 128
TOY = tiny().replace(hc_sinkhorn_iters=3)  # short Sinkhorn: the pass must read the count, not assume 20
N, D = TOY.hc_mult, TOY.hidden_size
ROWS = (2 + N) * N
CLEANUP = [noop_removal, dead_code, cse]  # what runs before mhc_fusion in every pipeline


def counts(record):
    return {kind: record.details.get(kind, 0) for kind in FUSED}


def fused_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("dsv4c.hc_")]


# ---- the captured tiny step ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captured():
    cfg, num = tiny(), Numerics.plain(torch.float32)
    weights = dict(synthetic_tensors(cfg, 0))  # packed: FP8/FP4 weights decode through dsv4c ops in the graph
    step = capture(cfg, num, weights, StepVariant("main", 1), MAX_SEQ_LEN)
    gm, _ = run_pipeline(step.graph_module, CLEANUP, PassContext())
    return cfg, weights, step, gm


def test_captured_step_fuses_every_boundary_exactly(captured):
    cfg, weights, step, gm = captured
    before = targets(gm)
    # check_pass: manager debug mode plus its own run of both graphs, bit-equal, at batches 1 and 3
    gm, record = check_pass(mhc_fusion, gm, step_input_maker(cfg, weights, step, MAX_SEQ_LEN))
    # 3 layers x (attn, ffn): the first pre alone, 5 post+pre pairs, the last post, then the head
    assert counts(record) == {"hc_pre": 1, "hc_post_pre": 5, "hc_post": 1, "hc_head": 1}
    assert record.matches == 8
    names = targets(gm)
    assert all(names.count(f"dsv4c.{k}.default") == c for k, c in counts(record).items())
    gone = {op: before.count(op) - names.count(op) for op in ("aten.sigmoid.default", "aten.softmax.int")}
    assert gone == {"aten.sigmoid.default": 6 * 2 + 1, "aten.softmax.int": 6}  # every gate, every Sinkhorn

    chain = fused_nodes(gm)
    assert [str(n.target) for n in chain] == [f"dsv4c.{k}.default" for k in
                                               ["hc_pre"] + ["hc_post_pre"] * 5 + ["hc_post", "hc_head"]]
    for node in chain:
        if node.target is not torch.ops.dsv4c.hc_post.default:
            rms_eps, hc_eps = node.args[5:7] if "head" in str(node.target) else node.args[-3:-1]
            assert (rms_eps, hc_eps) == (cfg.rms_norm_eps, cfg.hc_eps)
        if "pre" in str(node.target):
            assert node.args[-1] == cfg.hc_sinkhorn_iters
    for prev, node in zip(chain[1:-2], chain[2:-1]):  # each post reads the streams the previous op wrote
        assert node.args[1].target is operator.getitem and node.args[1].args == (prev, 0)
    assert chain[-1].args[0] is chain[-2]  # hc_head reads hc_post's new streams


# ---- small graphs: our formulation, transformers', near misses ---------------------------------------
def _toy_weights():
    fns = [(ROWS, N * D), (ROWS,), (3,), (D,)]
    return fns + fns + [(N, N * D), (N,), (1,), (D,), (D, D)]


def _toy_maker(dtype):
    shapes = [(2, 3, N, D)] + _toy_weights()
    make_raw = random_inputs(shapes, [True] + [False] * (len(shapes) - 1))

    def make(batch):
        values = make_raw(batch)
        values[0] = values[0].to(dtype)
        for i in (1, 5, 9):  # fn: small mixes keep the sigmoids and the Sinkhorn away from saturation
            values[i] = values[i] * 0.1
        return values
    return make


def _block(x, lin):
    return torch.tanh(x.float() @ lin).to(x.dtype)


def two_sublayers(m, streams, fn1, base1, scale1, w1, fn2, base2, scale2, w2, hfn, hbase, hscale, wn, lin):
    """compiler/layers.py's mHC around two toy sub-layers, then the head and final norm (as model.py)."""
    for fn, base, scale, w in ((fn1, base1, scale1, w1), (fn2, base2, scale2, w2)):
        x, post, comb = layers.hc_pre(streams, fn, base, scale, TOY)
        streams = layers.hc_post(_block(layers.rms_norm(x, w, TOY.rms_norm_eps), lin), streams, post, comb)
    head = layers.hc_head(streams, hfn, hbase, hscale, TOY)
    return layers.rms_norm(head, wn, TOY.rms_norm_eps), streams


def _fuse(fn, make, tolerance=0.0):
    """Export fn (input 0 batched), clean it up as the pipeline does, run mhc_fusion with the outputs checked:
    bit-equal by default, else to `tolerance` (manager debug mode)."""
    example = make(2)
    gm = export_flat(fn, example, [True] + [False] * (len(example) - 1))
    gm, _ = run_pipeline(gm, CLEANUP, PassContext())
    before = targets(gm)
    if tolerance == 0.0:
        gm, record = check_pass(mhc_fusion, gm, make)
    else:
        gm, (record,) = run_pipeline(gm, [mhc_fusion], PassContext("cpu", True, make, tolerance))
    return gm, record, before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_toy_layers_fuse_bit_exactly(dtype):
    gm, record, _ = _fuse(two_sublayers, _toy_maker(dtype))
    assert counts(record) == {"hc_pre": 1, "hc_post_pre": 1, "hc_post": 1, "hc_head": 1}
    assert [n.args[-1] for n in fused_nodes(gm) if "pre" in str(n.target)] == [TOY.hc_sinkhorn_iters] * 2
    assert not {"aten.sigmoid.default", "aten.softmax.int", "aten.rsqrt.default"} & set(targets(gm))


TRANSFORMERS_CASES = {
    # fp32: every boundary; the mixes round differently (normalise, then F.linear), so equal to fp32 rounding
    torch.float32: (1e-5, {"hc_pre": 1, "hc_post_pre": 1, "hc_post": 1, "hc_head": 1}),
    # bf16: `post.to(bf16)` / `comb.to(bf16)` round before the merge, which the ops do in fp32: posts stay
    torch.bfloat16: (1e-2, {"hc_pre": 2, "hc_post_pre": 0, "hc_post": 0, "hc_head": 1}),
}


@pytest.mark.parametrize("dtype", TRANSFORMERS_CASES)
def test_transformers_formulation(dtype):
    """transformers' modules (normalise before F.linear, split/unbind, post/comb cast to dtype), exported:
    their parameters arrive as get_attr constants."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4HyperConnection, DeepseekV4HyperHead, DeepseekV4RMSNorm)
    from hf_reference import to_transformers_config

    config = to_transformers_config(TOY)
    torch.manual_seed(0)
    hcs, norms = [DeepseekV4HyperConnection(config) for _ in range(2)], [DeepseekV4RMSNorm(D) for _ in range(3)]
    head = DeepseekV4HyperHead(config)
    for p in [p for m in hcs + [head] + norms for p in m.parameters()]:
        torch.nn.init.normal_(p, std=0.1 if p.dim() == 2 else 1.0)
    lin = torch.randn(D, D)

    def decoder(m, h):
        for hc, norm in zip(hcs, norms):
            post, comb, collapsed = hc(h)
            out = _block(norm(collapsed), lin)
            h = post.to(h.dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(
                comb.to(h.dtype).transpose(-1, -2), h)
        return norms[2](head(h)), h

    tolerance, expected = TRANSFORMERS_CASES[dtype]
    make = random_inputs([(2, 3, N, D)])
    with torch.no_grad():
        gm, record, _ = _fuse(decoder, lambda batch: [x.to(dtype) for x in make(batch)], tolerance)
    assert counts(record) == expected
    assert all(n.args[-1] == TOY.hc_sinkhorn_iters for n in fused_nodes(gm) if "pre" in str(n.target))
    fn_at = {"dsv4c.hc_pre.default": 1, "dsv4c.hc_post_pre.default": 4, "dsv4c.hc_head.default": 1}
    assert {n.args[fn_at[str(n.target)]].op for n in fused_nodes(gm) if str(n.target) in fn_at} == {"get_attr"}


def _rows_first(logits, iters, eps):
    c = logits.softmax(-1) + eps
    c = c / (c.sum(-1, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-2, keepdim=True) + eps)
        c = c / (c.sum(-1, keepdim=True) + eps)
    return c


def _fp8_decoded(f):
    scale = torch.ones(1, f.shape[1] // 128, dtype=torch.float8_e8m0fnu)
    return torch.ops.dsv4c.dequant_fp8_weight(f.to(torch.float8_e4m3fn), scale, torch.float32)


def _one_sublayer(sinkhorn=layers.sinkhorn, gate=torch.sigmoid, sinkhorn_eps=TOY.hc_eps, transpose=True,
                  fn_from=lambda f: f, early_comb_user=False):
    """A hand-written hc_pre + norm + block + hc_post with one knob turned (defaults: the faithful math)."""
    def fn(m, streams, f, base, scale, w, lin):
        mixes = layers.hc_mixes(streams, fn_from(f), TOY.rms_norm_eps)
        pre = gate(mixes[..., :N] * scale[0] + base[:N]) + TOY.hc_eps
        post = 2 * torch.sigmoid(mixes[..., N:2 * N] * scale[1] + base[N:2 * N])
        logits = mixes[..., 2 * N:].unflatten(-1, (N, N)) * scale[2] + base[2 * N:].view(N, N)
        comb = sinkhorn(logits, TOY.hc_sinkhorn_iters, sinkhorn_eps)
        early = comb.amax(-1) if early_comb_user else None  # read before the norm weight below exists
        w = w * 2 if early_comb_user else w
        x = layers.rms_norm((pre.unsqueeze(-1) * streams.float()).sum(-2).to(streams.dtype), w, TOY.rms_norm_eps)
        mixed = (comb.transpose(-1, -2) if transpose else comb) @ streams.float()
        new = (post.unsqueeze(-1) * _block(x, lin).float().unsqueeze(-2) + mixed).to(streams.dtype)
        return (new,) if early is None else (new, early)
    return fn


NEAR_MISSES = {
    "faithful": ({}, {"hc_pre": 1, "hc_post": 1}),  # the hand-written copy itself matches
    "rows_normalised_first": ({"sinkhorn": _rows_first}, {}),
    "collapse_without_sigmoid": ({"gate": lambda x: x}, {}),
    "sinkhorn_eps_differs": ({"sinkhorn_eps": 1e-5}, {}),
    "comb_not_transposed": ({"transpose": False}, {"hc_pre": 1}),  # the pre still fuses, the post must not
    # not near misses: fn decoded from FP8 in the graph; a comb user placed before the norm weight is computed
    # (the fused op goes after its last input, so the graph is re-sorted)
    "fn_from_fp8": ({"fn_from": _fp8_decoded}, {"hc_pre": 1, "hc_post": 1}),
    "comb_read_before_norm_weight": ({"early_comb_user": True}, {"hc_pre": 1, "hc_post": 1}),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_misses(name):
    knobs, expected = NEAR_MISSES[name]
    make = random_inputs([(2, 3, N, D), (ROWS, N * D), (ROWS,), (3,), (D,), (D, D)], [True] + [False] * 5)
    gm, record, before = _fuse(_one_sublayer(**knobs), make)
    assert {k: v for k, v in counts(record).items() if v} == expected
    if not expected:
        assert targets(gm) == before
    if name == "fn_from_fp8":
        assert fused_nodes(gm)[0].args[1].target is torch.ops.dsv4c.dequant_fp8_weight.default


def test_graph_without_mhc_untouched():
    def mlp(m, x, w1, w2):
        h = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
        return (F.silu(h @ w1) @ w2).softmax(-1) + 1e-6, torch.sigmoid(h) * 2

    make = random_inputs([(2, D), (D, 4 * D), (4 * D, D)], [True, False, False])
    gm, record, before = _fuse(mlp, make)
    assert record.matches == 0 and counts(record) == dict.fromkeys(FUSED, 0)
    assert targets(gm) == before


# ---- transformers' DeepseekV4ForCausalLM through torch.compile(backend=dsv4c) ----------------------
def test_transformers_model_through_backend():
    """One layer (window attention, hash-routed MoE), 40 tokens, fp32: one Inductor compile (~1 min)."""
    from hf_reference import transformers_model_from_tensors

    cfg = tiny().replace(num_hidden_layers=1, compress_ratios=(0, 0))
    model = transformers_model_from_tensors(cfg, dict(synthetic_tensors(cfg, 1)))
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    log = BackendLog()
    try:
        with torch.no_grad():
            want = model(input_ids=ids).logits
            got = torch.compile(model, backend=make_backend(log=log))(input_ids=ids).logits
    finally:
        torch._dynamo.reset()
    assert compare_values(got, want, 1e-5) is None
    records = [r for g in log.graphs for r in g.records if r.name == "mhc_fusion"]
    assert len(records) == 1, log.summary()
    assert counts(records[0]) == {"hc_pre": 1, "hc_post_pre": 1, "hc_post": 1, "hc_head": 1}, log.summary()
    assert log.matches()["mhc_fusion"] == 4
