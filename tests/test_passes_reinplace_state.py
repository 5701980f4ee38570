"""reinplace_state: state outputs computed by a scatter into their own input become in-place writes, only when
nothing reads the old value after the write; the captured step then writes every state tensor in place."""

import pytest
import torch

from dsv4c.model.attention import ring_write
from dsv4c.passes.manager import PassContext, compare_values, run_pipeline
from dsv4c.passes.reinplace_state import reinplace_state
from pass_graphs import export_flat, targets

NAMES = ("read", "state.ring")


def reads_then_writes(m, ring, new, start):
    before = ring.sum(dim=(1, 2))  # the old value, read before the write
    return before, ring_write(ring, new, start)


def writes_then_reads(m, ring, new, start):
    updated = ring_write(ring, new, start)
    return ring.sum(dim=(1, 2)) + updated.sum(dim=(1, 2)), updated  # the old value read after the write


def make(batch):
    return [torch.randn(batch, 4, 2), torch.randn(batch, 2, 2), torch.randint(0, 50, (batch,))]


def run(fn):
    gm = export_flat(fn, make(2))
    inputs = make(3)
    want = gm(*[x.clone() for x in inputs])
    ctx = PassContext("cpu", True, make, 0.0, (1, 3), output_names=NAMES)
    gm, (record,) = run_pipeline(gm, [reinplace_state], ctx)
    got = gm(*[x.clone() for x in inputs])
    for g, w in zip(got, want):
        assert compare_values(g, w, 0.0) is None
    return gm, record, inputs


def test_a_state_write_after_its_last_reader_goes_in_place():
    gm, record, inputs = run(reads_then_writes)
    assert record.matches == 1
    assert "aten.scatter_.src" in targets(gm) and "aten.scatter.src" not in targets(gm)
    ring = inputs[0].clone()
    _, out = gm(ring, inputs[1], inputs[2])
    assert out.data_ptr() == ring.data_ptr()  # the output is the state input, updated
    assert torch.equal(ring, ring_write(inputs[0], inputs[1], inputs[2]))


def test_a_read_of_the_old_value_after_the_write_keeps_it_functional():
    gm, record, _ = run(writes_then_reads)
    assert record.matches == 0 and record.details["left_functional"] == ["state.ring"]
    assert "aten.scatter_.src" not in targets(gm)


def test_graphs_without_output_names_are_left_alone():
    gm = export_flat(reads_then_writes, make(2))
    gm, (record,) = run_pipeline(gm, [reinplace_state], PassContext("cpu"))
    assert record.matches == 0 and "aten.scatter_.src" not in targets(gm)


@pytest.mark.parametrize("kind", ["main", "mtp"])
def test_the_captured_step_writes_every_state_tensor_it_updates_in_place(kind):
    from dsv4c.compiler.capture import StepVariant, capture
    from dsv4c.model.synthetic import synthetic_tensors
    from dsv4c.model.numerics import Numerics
    from dsv4c.model.presets import tiny
    from dsv4c.passes import optimise

    cfg = tiny()
    step = capture(cfg, Numerics.plain(), dict(synthetic_tensors(cfg, seed=1)), StepVariant(kind, 2), 64)
    gm, records = optimise(step.graph_module, "cpu", PassContext(output_names=tuple(step.output_names)))
    record = next(r for r in records if r.name == "reinplace_state")
    written = [n for n in step.output_names if n.startswith("state.")]
    layer = "mtp." if kind == "mtp" else "layers."
    expected = sorted(n for n in written if n.startswith("state." + layer))
    assert sorted(record.details["in_place"]) == expected and not record.details["left_functional"]
