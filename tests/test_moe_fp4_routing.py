"""The routing inside `dsv4c::moe_fp4` and the batch invariance of its launches (the layer: tests/moe_layers.py).

- codegen/moe_routing.py `route` against model/layers.py `route` itself, for every scoring function, with and
  without normalisation, hash- and score-routed: bit-equal (the same ops in the same order);
- the routing kernels (codegen/kernels/moe_route.py) under Triton's interpreter against it: the same experts
  in the same order on rows with clear selection margins, weights to 1e-6 (relative norm error: fp32 sums of
  the logits in another order, exp / log / sqrt a few ulps off), with two router splits and two token tiles;
  equal biased scores: the lower expert id first (torch.topk leaves the order of ties undefined);
- batch invariance: the same 24 tokens through the whole op (h100's launch for the layer, run by the
  interpreter; plain fp32 numerics and four candidate experts, the cheapest to interpret: every reduction
  order is the same code for every format) in one step and in steps of 2 and 22 tokens (a decode step of B = 2,
  an MTP verification step): bit-equal rows. The shape is one where h100 splits the router's logits and the
  down GEMM, each split one 128-column block; the splits cannot follow the token count (`moe_fp4_launch` takes
  none), and at this shape they would not change a sum's order either: what the test guards is the rest of the
  op's path for a token (its routing, its place in the tile lists, the combine's slot order). Its
  interpreter's `tl.dot` sums each element's products in one fixed order (`start_fixed_order_dots`), as the
  GPUs' MMAs do for a row whatever the rows beside it: numpy's matmul, the interpreter's own, sums a tile's
  edge columns in another order than its inner ones (numpy 2.4's BLAS), which no kernel controls.
  bench/moe_gpu_check.py checks the same bits on the GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from child_pool import child_pool, start_interpreter
from moe_layers import CFG, E, K, MARGIN, PREFIX, gen_for, layer_call, layer_weights, rel_err, selection_gaps

from dsv4c.codegen import moe_routing
from dsv4c.codegen.kernels.moe_fp4_launch import moe_fp4_launch
from dsv4c.codegen.moe_routing import Routing
from dsv4c.codegen.targets import target
from dsv4c.model import layers

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
D = CFG.hidden_size
SCORINGS = [("sqrtsoftplus", True), ("sigmoid", True), ("sigmoid", False), ("softmax", False)]
WEIGHT_TOLERANCE = 1e-6


def routing_layer(key, scoring: str, normalize: bool, hash_layer: bool, tokens: int):
    """(config, weights, x, token ids, Routing): the layer routed with `scoring` / `normalize`; score-routed
    rows with clear margins."""
    cfg = CFG.replace(scoring_func=scoring, norm_topk_prob=normalize)
    routing = Routing.of_model(cfg)
    assert routing.normalize == (normalize and scoring != "softmax")
    gen = gen_for(key, scoring, normalize, hash_layer)
    w = layer_weights(gen, hash_layer)
    x = (torch.randn(4 * tokens, D, generator=gen) * 3).to(torch.bfloat16)
    if not hash_layer:
        x = x[selection_gaps(x, w[f"{PREFIX}gate.weight"], w[f"{PREFIX}gate.bias"], routing) > MARGIN]
    token_ids = torch.randint(0, CFG.vocab_size, (tokens,), generator=gen)
    return cfg, w, x[:tokens].contiguous(), token_ids, routing


def operands(w, hash_layer, token_ids):
    return (w[f"{PREFIX}gate.weight"], w.get(f"{PREFIX}gate.bias"), w.get(f"{PREFIX}gate.tid2eid"),
            token_ids if hash_layer else None)


@pytest.mark.parametrize("hash_layer", [True, False], ids=["hash", "score"])
@pytest.mark.parametrize("scoring,normalize", SCORINGS)
def test_routing_is_the_models_route(scoring, normalize, hash_layer):
    cfg, w, x, token_ids, routing = routing_layer("model", scoring, normalize, hash_layer, 16)
    want = layers.route(x, token_ids, w, PREFIX, cfg, hash_layer)
    got = moe_routing.route(x, *operands(w, hash_layer, token_ids), routing)
    assert all(torch.equal(g, v) for g, v in zip(got, want))


# ---- the kernels under the interpreter ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    return interpreter_pool


def start_fixed_order_dots():
    """The interpreter with a `tl.dot` whose every output element sums its K products in order k = 0, 1, ...
    in the accumulator's dtype (fp8 operands widened to fp16 first, as the interpreter's own dot does)."""
    start_interpreter()
    import numpy as np
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_data, b_data = a.data, b.data
        if (a.dtype.primitive_bitwidth == 8 and a.dtype.is_floating()) or \
                (b.dtype.primitive_bitwidth == 8 and b.dtype.is_floating()):
            a_data = interpreter._convert_float(a_data, a.dtype, interpreter.tl.float16, None).view(np.float16)
            b_data = interpreter._convert_float(b_data, b.dtype, interpreter.tl.float16, None).view(np.float16)
        acc = d.data.copy()
        a_data, b_data = a_data.astype(acc.dtype), b_data.astype(acc.dtype)
        total = np.zeros_like(acc)
        for k in range(a_data.shape[-1]):
            total += a_data[..., :, k:k + 1] * b_data[..., k:k + 1, :]
        return interpreter.TensorHandle(total + acc, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


@pytest.fixture(scope="module")
def fixed_order_interpreter():
    with child_pool(start_fixed_order_dots) as pool:
        yield pool


def _route_kernels(x, router, bias, table, tokens, routing, launch):
    from dsv4c.codegen.kernels.moe_fp4_launch import MoeFp4Launch
    from dsv4c.codegen.kernels.moe_route import route

    return route(x, router, bias, table, tokens, routing, MoeFp4Launch(**launch))


# two token tiles of 16, the logits in two splits of D (128 columns each)
SPLIT_LAUNCH = dict(block_m=16, block_n=128, split_k=1, router_block_e=16, router_splits=2, product="ieee",
                    native_fp4=False, shared_split=1, num_warps=4, num_stages=1)


@needs_triton
@pytest.mark.parametrize("hash_layer", [True, False], ids=["hash", "score"])
@pytest.mark.parametrize("scoring,normalize", SCORINGS)
def test_routing_kernels_equal_the_reference(interpreter, scoring, normalize, hash_layer):
    _, w, x, token_ids, routing = routing_layer("kernel", scoring, normalize, hash_layer, 20)
    want_ids, want_weights = moe_routing.route(x, *operands(w, hash_layer, token_ids), routing)
    ids, weights = interpreter.submit(_route_kernels, x, *operands(w, hash_layer, token_ids), routing,
                                      SPLIT_LAUNCH).result()
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), want_ids)
    assert rel_err(weights, want_weights) <= WEIGHT_TOLERANCE


@needs_triton
def test_equal_biased_scores_select_the_lower_expert_first(interpreter):
    """Experts 2 and 5 get the same router row and bias, so their biased scores are equal on every token (the
    kernels compute both the same way); both rank above every other expert but 0, inside the top 3."""
    _, w, x, _, routing = routing_layer("ties", "sqrtsoftplus", True, False, 8)
    router, bias = w[f"{PREFIX}gate.weight"].clone(), w[f"{PREFIX}gate.bias"].clone()
    router[5], bias[2], bias[5] = router[2], 100.0, 100.0
    ids, weights = interpreter.submit(_route_kernels, x, router, bias, None, None, routing, SPLIT_LAUNCH).result()
    assert (ids.long() == torch.tensor([0, 2, 5])).all()
    want_ids, want_weights = moe_routing.route(x, router, bias, None, None, routing)
    assert torch.equal(want_ids.sort(-1).values, ids.long())  # torch.topk's set (its order among ties: any)
    assert rel_err(weights, want_weights.gather(-1, want_ids.argsort(-1))) <= WEIGHT_TOLERANCE


# ---- batch invariance ----------------------------------------------------------------------------------------
INVARIANCE_INTER, STEPS, CANDIDATES = 256, (2, 22), 4


def _op_in_steps(call, steps):
    """The op's kernels on call's rows, in steps of the given sizes, with h100's launch for the layer."""
    from dsv4c.codegen.kernels import moe_fp4 as kernels

    tables, out, start = kernels.PointerTables(), [], 0
    for size in steps:
        part = call.rows(start, start + size)
        out.append(kernels.moe_fp4(*part.routing_operands(), Routing.of_model(CFG), part.lists, part.shared, 2.0,
                                   1.5, "w4a16", False, target=target("h100"), tables=tables))
        start += size
    return torch.cat(out)


@needs_triton
def test_a_tokens_row_does_not_depend_on_the_step_size(fixed_order_interpreter):
    launch = moe_fp4_launch(target("h100"), E, K, D, INVARIANCE_INTER, "w4a16", False)
    assert launch.split_k == 2 and launch.router_splits == 2, launch  # the splits this test holds fixed
    call = layer_call("invariance", sum(STEPS), False, torch.float32, INVARIANCE_INTER)
    # four candidates (the other experts biased far below): fewer expert tiles for the interpreter to run, and
    # still a top 3 of 4 that differs from token to token
    call = call._replace(bias=torch.where(torch.arange(E) < CANDIDATES, 0.0, -100.0))
    whole = fixed_order_interpreter.submit(_op_in_steps, call, (sum(STEPS),))
    stepped = fixed_order_interpreter.submit(_op_in_steps, call, STEPS)
    whole, stepped = whole.result(), stepped.result()
    assert not whole.isnan().any() and torch.equal(whole, stepped)
