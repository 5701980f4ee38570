"""The byte floor of a decode step (model/step_bytes.py), checked against hand counts on the Flash slice."""

import pytest

from dsv4c.model.layout import tensor_specs
from dsv4c.model.presets import flash_slice
from dsv4c.model.step_bytes import expected_experts, kv_bytes_per_sequence, step_bytes

CFG = flash_slice()


def test_one_token_reads_its_k_experts_and_many_tokens_read_at_most_all():
    assert expected_experts(CFG, 1) == pytest.approx(CFG.num_experts_per_tok)
    assert expected_experts(CFG, 64) < CFG.n_routed_experts
    assert expected_experts(CFG, 4096) == pytest.approx(CFG.n_routed_experts, rel=1e-6)


def test_kv_read_per_layer_kind_at_4k():
    window = 128 * 512 * 2
    assert kv_bytes_per_sequence(CFG, 0, 4096) == window                             # window only
    assert kv_bytes_per_sequence(CFG, 2, 4096) == window + (512 * 512 + 1024 * 128) * 2  # C4: top-512 + index keys
    assert kv_bytes_per_sequence(CFG, 3, 4096) == window + 32 * 512 * 2              # C128: every entry


def test_batch_one_floor_by_hand():
    specs = tensor_specs(CFG)
    expert = sum(s.nbytes for n, s in specs.items() if n.startswith("layers.0.ffn.experts.0."))
    floor = step_bytes(CFG, 1, 4096)
    assert floor.experts == pytest.approx(CFG.num_hidden_layers * CFG.num_experts_per_tok * expert)
    assert floor.embedding == CFG.hidden_size * 2
    dense = sum(s.nbytes for n, s in specs.items() if not n.startswith("mtp.") and ".experts." not in n
                and n != "embed.weight" and not n.endswith("tid2eid"))
    assert floor.weights == dense
    assert 1.9e9 < floor.total < 2.05e9  # the bf16 LM head (1.06 GB), FP8 attention, six MXFP4 experts a layer
    with_mtp = step_bytes(CFG, 1, 4096, mtp=True)
    assert with_mtp.total - floor.total > specs["head.weight"].nbytes  # the MTP layer and the LM head again
