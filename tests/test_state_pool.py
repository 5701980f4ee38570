"""The state pool (runtime/state_pool.py): `rows(n)` hands out the same views every call, and `holds` recognises
exactly the pool's rows 0..n-1, whether as those views or as other views of the same storage; the prefill row
lies past the slots, is recognised apart from them, and is copied into a slot by `commit_prefill`."""

from __future__ import annotations

import pytest
import torch

from dsv4c.runtime.state_pool import PREFILL_ROWS, StatePool, StateSpec

SPECS = {"a.window_kv": StateSpec((4, 3), torch.bfloat16, 0.0), "a.score_state": StateSpec((2,), torch.float32,
                                                                                              float("-inf"))}


def test_rows_are_the_same_views_in_a_fresh_mapping():
    pool = StatePool(SPECS, 4, "cpu")
    first, again = pool.rows(2), pool.rows(2)
    assert first is not again and all(first[k] is again[k] for k in SPECS)
    first.pop("a.window_kv")  # a caller's mapping is its own
    assert set(pool.rows(2)) == set(SPECS)
    assert pool.rows(2)["a.window_kv"].data_ptr() == pool.tensors["a.window_kv"].data_ptr()
    assert pool.rows(3)["a.window_kv"].shape == (3, 4, 3)


def test_holds_the_pools_rows_only():
    pool = StatePool(SPECS, 4, "cpu")
    assert pool.holds(pool.rows(3)) == 3
    assert pool.holds({k: v[:2] for k, v in pool.tensors.items()}) == 2  # other views of the same rows
    assert pool.holds({k: v[:2].clone() for k, v in pool.tensors.items()}) is None  # a copy
    assert pool.holds({k: v[1:3] for k, v in pool.tensors.items()}) is None  # rows 1..2
    assert pool.holds({"a.window_kv": pool.rows(2)["a.window_kv"]}) is None  # a tensor missing
    mixed = pool.rows(2)
    mixed["a.score_state"] = pool.tensors["a.score_state"][:3]  # rows of another batch
    assert pool.holds(mixed) is None
    strided = pool.rows(2)
    strided["a.window_kv"] = pool.tensors["a.window_kv"][:2].transpose(1, 2)  # same storage, other strides
    assert pool.holds(strided) is None


def test_holds_reads_the_prefixed_entries_of_a_steps_inputs():
    pool = StatePool(SPECS, 4, "cpu")
    inputs = {"tokens": torch.zeros(2, 1, dtype=torch.long), **{f"state.{k}": v for k, v in pool.rows(2).items()}}
    assert pool.holds(inputs, "state.") == 2
    assert pool.holds(inputs) is None  # without the prefix no entry names a pool tensor
    inputs["state.a.window_kv"] = inputs["state.a.window_kv"].clone()
    assert pool.holds(inputs, "state.") is None


def test_the_prefill_row_lies_past_the_slots_and_is_committed_into_one():
    pool = StatePool(SPECS, 3, "cpu")
    assert pool.tensors["a.window_kv"].shape == (3 + PREFILL_ROWS, 4, 3)
    row = pool.prefill_row()
    assert all(row[k] is pool.prefill_row()[k] for k in SPECS)  # the same views every call
    assert row["a.window_kv"].shape == (1, 4, 3)
    assert row["a.window_kv"].data_ptr() == pool.tensors["a.window_kv"][3].data_ptr()
    row["a.window_kv"].fill_(7.0)
    row["a.score_state"].fill_(2.0)
    pool.commit_prefill(1)
    assert (pool.tensors["a.window_kv"][1] == 7).all() and (pool.tensors["a.score_state"][1] == 2).all()
    assert (pool.tensors["a.window_kv"][[0, 2]] == 0).all()  # the other slots untouched
    assert (pool.tensors["a.score_state"][[0, 2]] == float("-inf")).all()
    again = pool.prefill_row()  # reset to the initial fill for the next prompt
    assert (again["a.window_kv"] == 0).all() and (again["a.score_state"] == float("-inf")).all()
    assert (pool.tensors["a.window_kv"][1] == 7).all()
    with pytest.raises(ValueError, match="slot 3: the state pool has slots 0 to 2"):
        pool.commit_prefill(3)


def test_holds_tells_the_prefill_row_from_the_slots():
    pool = StatePool(SPECS, 3, "cpu")
    row = pool.prefill_row()
    assert pool.holds_prefill_row(row) and pool.holds(row) is None
    assert pool.holds_prefill_row({f"state.{k}": v for k, v in row.items()}, "state.")
    assert pool.holds_prefill_row({k: v[3:4] for k, v in pool.tensors.items()})  # other views of the same row
    assert not pool.holds_prefill_row(pool.rows(1))
    assert not pool.holds_prefill_row({k: v.clone() for k, v in row.items()})  # a copy
    assert not pool.holds_prefill_row({"a.window_kv": row["a.window_kv"]})  # a tensor missing
