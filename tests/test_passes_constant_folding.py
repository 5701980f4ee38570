"""constant_folding: tables built from buffers and literals fold; anything input-dependent stays."""

import torch

from dsv4c.passes.constant_folding import constant_folding
from pass_graphs import check_pass, export_flat, random_inputs, targets


def rope_tables(m, x, pos):
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))   # literals only
    scale = m.scale.exp() * 2                                                 # buffer only
    angles = pos.float().unsqueeze(-1) * inv                                  # input-dependent: stays
    return (x * angles.cos().repeat(1, 2) * scale,)


def input_dependent(m, x, w):
    n = torch.arange(x.shape[0]).float()           # sized by the batch: depends on an input
    r = torch.rand(4)                              # random
    return (x * n.unsqueeze(-1) + (w * 2).sum(), r.shape[0] * x)


def test_match_counts_and_structure():
    make = random_inputs([(2, 8), (2,)])
    gm = export_flat(rope_tables, make(2), buffers={"scale": torch.linspace(0, 1, 8)})
    gm, record = check_pass(constant_folding, gm, make)
    assert record.matches == 2                      # inv, scale
    assert "aten.arange.start_step" not in targets(gm) and "aten.exp.default" not in targets(gm)
    folded = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert sorted(folded) == ["_folded_0", "_folded_1"]
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "get_attr")


def test_outputs_unchanged_on_fresh_inputs():
    make = random_inputs([(2, 8), (2,)], dtypes=[torch.float32, torch.int64])
    gm = export_flat(rope_tables, make(2), buffers={"scale": torch.linspace(0, 1, 8)})
    for _ in range(2):
        gm, record = check_pass(constant_folding, gm, make)
    assert record.matches == 0                      # a second run finds nothing left to fold


def test_near_miss_input_dependent_and_random_stay():
    make = random_inputs([(2, 4), (4,)], [True, False])
    gm = export_flat(input_dependent, make(2), [True, False])
    before = targets(gm)
    gm, record = constant_folding(gm, None)
    assert record.matches == 0 and targets(gm) == before


def test_size_cap_refuses_large_results():
    make = random_inputs([(2, 8), (2,)])
    gm = export_flat(rope_tables, make(2), buffers={"scale": torch.linspace(0, 1, 8)})
    before = targets(gm)
    gm, record = constant_folding(gm, None, max_bytes=8)
    assert record.matches == 0 and targets(gm) == before
