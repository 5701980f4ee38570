"""dead_code: unused pure chains and buffers go; side effects and observable writes stay."""

import torch

from dsv4c.passes.dead_code import dead_code
from pass_graphs import check_pass, export_flat, random_inputs, targets


def dead_chain(m, x, w):
    _ = (x @ w).sin().sum()                    # 3 dead nodes
    _ = m.table * 2                            # dead get_attr + mul, buffer then unused
    scratch = torch.zeros_like(x)
    scratch.add_(x)                            # write into a fresh buffer nobody reads: dead
    return (x + 1,)


def observable_writes(m, x, w):
    y = torch.zeros_like(x)
    y.add_(x)                                  # read below: stays
    z = torch.zeros_like(x)
    z.add_(1)                                  # z is an output: stays
    v = y.view(-1)
    return (y * 2, z, v.sum(), x @ w)


def test_match_counts_dead_chain():
    make = random_inputs([(2, 4), (4, 3)], [True, False])
    gm = export_flat(dead_chain, make(2), [True, False], {"table": torch.arange(4.0)})
    gm, record = check_pass(dead_code, gm, make)
    assert record.matches == 8                 # matmul, sin, sum, get_attr, mul, zeros_like, add_ + 1 buffer
    assert targets(gm) == ["aten.add.Tensor"]
    assert not hasattr(gm, "table")


def test_outputs_unchanged_and_idempotent():
    make = random_inputs([(2, 4), (4, 3)], [True, False])
    gm = export_flat(lambda m, x, w: dead_chain(m, x, w) + observable_writes(m, x, w), make(2), [True, False],
                     {"table": torch.arange(4.0)})
    gm, first = check_pass(dead_code, gm, make)
    gm, second = check_pass(dead_code, gm, make)
    assert first.matches == 8 and second.matches == 0


def test_near_miss_observable_writes_and_asserts_stay():
    make = random_inputs([(2, 4), (4, 3)], [True, False])
    gm = export_flat(lambda m, x, w: observable_writes(m, x.to(torch.float32), w), make(2), [True, False])
    before = targets(gm)
    gm, record = check_pass(dead_code, gm, make)
    assert record.matches == 0
    assert targets(gm) == before
    assert "aten._assert_tensor_metadata.default" in before


def write_into_input(m, x):
    y = x + 1
    x.mul_(2)                                  # nobody reads the result, but the caller sees x
    return (y,)


def test_write_into_input_stays():
    make = random_inputs([(2, 4)])
    gm = export_flat(write_into_input, make(2))
    before = targets(gm)
    gm, record = check_pass(dead_code, gm, make)
    assert record.matches == 0 and targets(gm) == before
    assert "aten.mul_.Tensor" in before
