"""cse: pure duplicates merge; random, written and different-literal calls do not."""

import torch

from dsv4c.passes.cse import cse
from pass_graphs import check_pass, export_flat, random_inputs, targets


def duplicates(m, x, w):
    a = (x * 2).sin() + (x * 2).sin()           # mul, sin merge: 2
    b = (x @ w).sum(-1) - (x @ w).sum(-1)        # matmul, sum merge: 2
    v1, i1 = torch.topk(x, 2)
    v2, i2 = torch.topk(x, 2)                    # topk + both getitems merge: 3
    return a, b, v1 + v2, i1 - i2


def near_misses(m, x, w):
    a = x * 2 + x * 3                            # different literal
    b = x * 2.0 + (x * 0.0 - x * -0.0)           # float vs int literal, 0.0 vs -0.0
    c = torch.rand_like(x) + torch.rand_like(x)  # random
    d = torch.zeros_like(x)
    e = torch.zeros_like(x)                      # same call, but written below: must stay apart
    d.add_(x)
    return a, b, c.shape[0] * torch.ones(1), d + e, x.sum(0) + x.sum(1, keepdim=True).sum(0)


def test_match_counts():
    make = random_inputs([(2, 4), (4, 3)], [True, False])
    gm, record = check_pass(cse, export_flat(duplicates, make(2), [True, False]), make)
    assert record.matches == 7
    assert targets(gm).count("aten.topk.default") == 1
    assert targets(gm).count("aten.matmul.default") == 1


def test_outputs_unchanged_on_mixed_graph():
    make = random_inputs([(2, 4), (4, 3)], [True, False])
    gm = export_flat(lambda m, x, w: duplicates(m, x, w) + _deterministic(near_misses(m, x, w)), make(2),
                     [True, False])
    _, record = check_pass(cse, gm, make)
    assert record.matches == 8                   # + the near misses' `x * 2` meets the first one


def _deterministic(outs):
    return outs[:2] + outs[3:]


def test_near_miss_nothing_merges():
    make = random_inputs([(2, 4), (4, 3)], [True, False])
    gm = export_flat(lambda m, x, w: _deterministic(near_misses(m, x, w)), make(2), [True, False])
    before = targets(gm)
    gm, record = check_pass(cse, gm, make)
    assert record.matches == 0
    assert targets(gm) == before
    assert before.count("aten.rand_like.default") == 2 and before.count("aten.zeros_like.default") == 2
