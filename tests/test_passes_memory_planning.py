"""memory_planning: liveness with views as aliases, provable symbolic reuse, JSON round trip."""

import pytest
import sympy
import torch

from dsv4c.passes.memory_planning import MemoryPlan, memory_planning
from dsv4c.passes.shape_propagation import BATCH
from pass_graphs import check_pass, export_flat, random_inputs, targets


def chain(m, x):
    a = x.sin()            # 64 B bytes
    b = a.cos()            # 64 B
    c = b.exp()            # 64 B: a is dead -> a's slot
    t = c.t()              # a view: keeps c alive until the sum
    e = t.sum(0)           # 4 B: b is dead -> b's slot (64 B >= 4 B for every B >= 1)
    return (e * 2,)        # an output: not planned


def near_misses(m, x):
    a = x.sin()                         # 64 B
    v = a.view(-1)                      # a view read at the very end: a stays live all along
    b = x.cos()                         # 64 B: cannot take a's slot
    s = b.sum()
    table = torch.ones(100) * s         # 400 bytes: no 64 B slot provably holds it (64 < 400 at B=1)
    kept = x.exp().unsqueeze(0)         # an output view: exp escapes, so it is not planned
    return (table.sum() + v.sum(), kept)


def _plan(gm) -> MemoryPlan:
    return gm.meta["dsv4c_memory_plan"]


def test_match_counts_slots_and_formula():
    make = random_inputs([(2, 16)])
    gm, record = check_pass(memory_planning, export_flat(chain, make(2)), make)
    plan = _plan(gm)
    assert record.matches == 4 and record.details["slots"] == 2
    assert sorted(plan.buffers) == ["cos", "exp", "sin", "sum_1"]
    assert plan.slot_of["exp"] == plan.slot_of["sin"] and plan.slot_of["sum_1"] == plan.slot_of["cos"]
    assert plan.peak == 128 * BATCH and plan.no_reuse == 196 * BATCH
    assert [plan.peak_bytes(b) for b in (1, 8, 64)] == [128, 1024, 8192]
    assert plan.live_bytes(8) <= plan.peak_bytes(8) < plan.no_reuse_bytes(8)


def test_graph_and_outputs_unchanged_and_json_round_trip():
    make = random_inputs([(2, 16)])
    gm = export_flat(chain, make(2))
    before = targets(gm)
    gm, record = check_pass(memory_planning, gm, make)
    assert targets(gm) == before
    plan = _plan(gm)
    again = MemoryPlan.from_json(plan.to_json())
    assert again == plan and again.dumps() == plan.dumps()
    bad = plan.to_json() | {"peak": "__import__('os').getcwd()"}
    with pytest.raises(ValueError, match="not integer arithmetic"):
        MemoryPlan.from_json(bad)


def test_near_miss_views_escapes_and_unprovable_sizes():
    make = random_inputs([(2, 16)])
    gm, _ = check_pass(memory_planning, export_flat(near_misses, make(2)), make)
    plan = _plan(gm)
    assert "exp" not in plan.buffers and "sin" in plan.buffers
    assert plan.buffers["sin"].end > plan.buffers["cos"].end          # the view's late read
    assert plan.slot_of["sin"] != plan.slot_of["cos"]
    fixed = [n for n, b in plan.buffers.items() if b.size == 400]
    assert sorted(fixed) == ["mul", "ones"]
    assert all(plan.slot_sizes[plan.slot_of[n]] == 400 for n in fixed)


def test_peak_grows_with_batch_and_reuse_wins():
    make = random_inputs([(2, 16)])
    gm, _ = check_pass(memory_planning, export_flat(lambda m, x: chain(m, chain(m, x)[0].unsqueeze(-1) * x), make(2)),
                       make)
    plan = _plan(gm)
    peaks = [plan.peak_bytes(b) for b in (1, 8, 64)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    assert all(plan.peak_bytes(b) < plan.no_reuse_bytes(b) for b in (1, 8, 64))
    assert isinstance(plan.peak, sympy.Expr)


def reshapes(m, x):
    copied = x.sin().t().reshape(-1)      # a transposed reshape copies: its own buffer
    viewed = x.cos().reshape(-1)          # a contiguous reshape is a view of cos
    return ((copied.sum() + viewed.sum()).unsqueeze(0),)


def test_may_alias_ops_follow_the_fake_storages():
    make = random_inputs([(2, 16)])
    gm, _ = check_pass(memory_planning, export_flat(reshapes, make(2)), make)
    plan = _plan(gm)
    assert {"sin", "t", "reshape", "cos", "reshape_1"} & set(plan.buffers) == {"sin", "reshape", "cos"}
    assert plan.buffers["cos"].end == plan.buffers["sum_2"].start     # cos lives as long as its view
