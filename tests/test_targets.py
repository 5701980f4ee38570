"""The target table: lookup, aliases, predicates, lowerings, and the error for an unknown name."""

import doctest
import sys

import pytest

from dsv4c.codegen import targets
from dsv4c.codegen.targets import (TARGETS, has_native_fp8, has_native_mxfp4, has_tma, is_blackwell, is_hopper,
                                   mhc_lowering, moe_lowering, target, target_for_capability, target_for_device)


@pytest.mark.parametrize("name, canonical", [
    ("cpu", "cpu"), ("h100", "sm_90a"), ("H200", "sm_90a"), (" sm_90a ", "sm_90a"),
    ("b200", "sm_100a"), ("sm_100a", "sm_100a"), ("gb300", "sm_103a"), ("SM_103A", "sm_103a"),
])
def test_lookup_by_name_and_alias(name, canonical):
    assert target(name).name == canonical
    assert target(target(name)) is target(name)


def test_unknown_target_error_lists_the_allowed_names():
    with pytest.raises(ValueError, match="unknown target 'tpu'") as err:
        target("tpu")
    for name in ("cpu", "h100", "h200", "sm_90a", "b200", "sm_100a", "gb300", "sm_103a"):
        assert name in str(err.value)


def test_table_is_consistent():
    names = [t.name for t in TARGETS]
    keys = [k for t in TARGETS for k in (t.name, *t.aliases)]
    assert len(keys) == len(set(keys)), "an alias names two targets"
    assert names == ["cpu", "sm_90a", "sm_100a", "sm_103a"]
    for t in TARGETS:
        assert (t.arch is None) == (t.sm is None) == (not t.is_gpu)
        if t.is_gpu:
            assert t.sm == f"sm_{t.arch}a" and t.sm_count > 0 and t.smem_bytes > 0
    with pytest.raises(Exception):
        target("cpu").arch = 90  # frozen


def test_predicates():
    cpu, hopper, b200, gb300 = (target(n) for n in ("cpu", "h100", "b200", "gb300"))
    assert [has_native_mxfp4(t) for t in (cpu, hopper, b200, gb300)] == [False, False, True, True]
    assert [has_native_fp8(t) for t in (cpu, hopper, b200, gb300)] == [False, True, True, True]
    assert [has_tma(t) for t in (cpu, hopper, b200, gb300)] == [False, True, True, True]
    assert is_hopper(hopper) and not is_hopper(b200) and is_blackwell(b200) and is_blackwell(gb300)
    assert not is_blackwell(cpu) and not is_hopper(cpu)


def test_lowerings_per_target():
    assert moe_lowering(target("cpu")) == "reference"
    assert moe_lowering(target("h100")) == "w4a8"
    assert moe_lowering(target("b200")) == "w4a8", "native FP4 activations are opt-in only"
    assert moe_lowering(target("b200"), native_fp4=True) == "w4a4-native"
    assert moe_lowering(target("gb300"), native_fp4=True) == "w4a4-native"
    with pytest.raises(ValueError, match="no FP4 tensor cores"):
        moe_lowering(target("h200"), native_fp4=True)
    assert [mhc_lowering(target(n)) for n in ("cpu", "h100", "b200", "gb300")] == [
        "reference", "triton", "triton", "triton"]
    assert targets.lowerings(target("h100")) == {"moe": "w4a8", "mhc": "triton"}


def test_device_and_capability_lookup():
    assert target_for_device("cpu").name == "cpu"
    assert target_for_capability(9, 0).name == "sm_90a"
    assert target_for_capability(10, 3).name == "sm_103a"
    with pytest.raises(ValueError, match="no target for compute capability 8.0"):
        target_for_capability(8, 0)


def test_targets_module_does_not_import_triton_and_doctests_pass():
    had_triton = "triton" in sys.modules
    assert doctest.testmod(targets).failed == 0
    assert had_triton or "triton" not in sys.modules
