"""noop_removal: metadata asserts and identity casts/copies/views go; real ones stay."""

import torch

from dsv4c.passes.noop_removal import noop_removal
from pass_graphs import check_pass, export_flat, random_inputs, targets

aten = torch.ops.aten


def identities(m, x):
    a = x.to(torch.float32)                     # assert + to.dtype, both no-ops
    b = a.reshape(x.shape[0], 4)                # same shape
    c = b.expand(x.shape[0], 4)                 # same shape
    return (c.clone() * 2,)                     # clone of an unwritten buffer


def real_changes(m, x, y):
    a = aten._to_copy.default(x, dtype=torch.float64)     # changes dtype
    b = x.t().contiguous()                                  # changes strides
    c = x.unsqueeze(1).expand(x.shape[0], 3, 4)             # changes shape
    d = x.clone()
    d.add_(1)                                               # the clone keeps d apart from x
    e = aten._to_copy.default(y, dtype=torch.float32)      # same-dtype copy feeding the output
    return a, b, c, d + x, e, x.clone()


def test_match_counts_on_identities():
    make = random_inputs([(2, 4)])
    gm, record = check_pass(noop_removal, export_flat(identities, make(2)), make)
    assert record.matches == 5
    assert record.details == {"asserts": 1, "noops": 4}
    assert targets(gm) == ["aten.sym_size.int", "aten.mul.Tensor"]


def test_outputs_unchanged_with_mixed_graph():
    make = random_inputs([(2, 4), (2, 4)])
    gm = export_flat(lambda m, x, y: identities(m, x) + real_changes(m, x, y), make(2))
    _, record = check_pass(noop_removal, gm, make)
    assert record.matches == 5


def test_near_miss_real_casts_copies_and_views_stay():
    make = random_inputs([(2, 4), (2, 4)])
    gm = export_flat(real_changes, make(2))
    before = targets(gm)
    gm, record = check_pass(noop_removal, gm, make)
    assert record.matches == 0
    assert targets(gm) == before


def test_asserts_counted_even_when_the_cast_is_real():
    make = random_inputs([(2, 4)])
    gm = export_flat(lambda m, x: (x.to(torch.float64),), make(2))
    gm, record = check_pass(noop_removal, gm, make)
    assert record.details == {"asserts": 1, "noops": 0}
    assert targets(gm) == ["aten.to.dtype"]
