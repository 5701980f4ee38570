"""The counter-based generator, synthetic weights drawn in blocks, and the writer's device and chunking.

Tolerance: bit-exact for everything the writer stores (generation in blocks, on any device, must give the
same bytes); the generator's statistics are checked with loose bounds (a million draws: the sampling error
of a mean or a standard deviation is about 1e-3, the bounds are 5e-3 and more).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from dsv4c.model import counter_random, layout, presets, quant, synthetic
from dsv4c.model.checkpoint import write_synthetic
from dsv4c.model.prefetch import prefetched

KEY = synthetic.tensor_seed(0, "a tensor")
DRAW = 1_000_000


def file_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))


# ---- the generator ---------------------------------------------------------------------------------
def test_generator_values_are_pinned():
    """The stream's values are part of the checkpoint format: a change here changes every checkpoint."""
    assert counter_random.words(KEY, 0, 4).tolist() == [472881512, 3507659001, 1748403661, 3580282685]
    assert counter_random.words(2**63 - 1, 2**40, 2).tolist() == [1280359193, 2865681926]
    assert counter_random.normal(KEY, 5, 4).tolist() == [1.35546875, 2.7578125, 0.80859375, -0.6328125]


@pytest.mark.parametrize("draw", [counter_random.words, counter_random.uniform, counter_random.normal])
def test_generator_is_deterministic_and_independent_of_chunking(draw):
    whole = draw(KEY, 1000, 5000)
    assert torch.equal(whole, draw(KEY, 1000, 5000))
    cuts = [0, 1, 7, 1024, 4999, 5000]
    parts = [draw(KEY, 1000 + a, b - a) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(draw(KEY + 1, 1000, 5000), whole)


def test_counters_beyond_32_bits_use_their_high_half():
    """Elements 2^32 apart (counters differing only above bit 32) draw different words."""
    low, high = counter_random.words(KEY, 0, 1000), counter_random.words(KEY, 2**32, 1000)
    assert (low != high).float().mean() > 0.99


def test_normal_has_mean_zero_and_standard_deviation_one():
    z = counter_random.normal(KEY, 0, DRAW).double()
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1) < 5e-3
    assert z.abs().max() <= 12 * 127.5 / 256
    assert torch.equal(z * 256, torch.round(z * 256))  # exact multiples of 2^-8
    assert abs((z.abs() < 1).double().mean() - 0.6827) < 5e-3  # within one standard deviation, as a normal
    assert abs((z.abs() > 2).double().mean() - 0.0455) < 3e-3
    assert abs(torch.corrcoef(torch.stack((z[:-1], z[1:])))[0, 1]) < 5e-3  # neighbours uncorrelated


def test_uniform_covers_zero_to_one():
    u = counter_random.uniform(KEY, 0, DRAW).double()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 5e-3 and abs(u.std() - 12**-0.5) < 5e-3
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - DRAW / 10).abs().max() < 0.02 * DRAW / 10


def test_generator_refuses_counters_it_cannot_hold():
    with pytest.raises(ValueError, match="key"):
        counter_random.words(2**63, 0, 1)
    with pytest.raises(ValueError, match="elements"):
        counter_random.normal(KEY, 2**62, 1)


# ---- synthetic tensors in blocks of rows -----------------------------------------------------------
def test_rows_in_blocks_equal_the_whole_tensor():
    cfg = presets.tiny()
    specs = layout.tensor_specs(cfg)
    names = ["layers.0.attn.wq_b.weight", "layers.0.ffn.experts.1.w2.weight", "embed.weight",
             "layers.1.hc_attn_fn", "layers.1.attn.attn_sink", "layers.0.ffn.gate.tid2eid", "hc_head_scale"]
    for name in names:
        spec = specs[name]
        whole = synthetic.synthesize(cfg, spec, seed=3)
        chunks = synthetic.row_chunks(spec, 1)  # one row (an FP8 weight: one 128-row block) at a time
        assert len(chunks) == -(-spec.shape[0] // synthetic.row_block(spec)), name
        parts = [synthetic.synthesize_rows(cfg, spec, 3, start, stop) for start, stop in chunks]
        for part_name, tensor in whole.items():
            assert same_bytes(torch.cat([p[part_name] for p in parts]), tensor), part_name


def test_rows_must_respect_the_fp8_blocks():
    cfg = presets.tiny()
    spec = layout.tensor_specs(cfg)["layers.0.attn.wq_b.weight"]  # [384, 128]: three 128-row blocks
    with pytest.raises(ValueError, match="blocks of 128"):
        synthetic.synthesize_rows(cfg, spec, 0, 64, 128)
    with pytest.raises(ValueError, match="blocks of 128"):
        synthetic.synthesize_rows(cfg, spec, 0, 0, 100)
    assert synthetic.row_chunks(spec, 200 * 128) == [(0, 128), (128, 256), (256, 384)]


def test_tensors_have_their_intended_scales():
    cfg = presets.tiny()
    tensors = dict(synthetic.synthetic_tensors(cfg, seed=2))
    norm = tensors["layers.0.attn_norm.weight"].float()
    assert abs(norm.mean() - 1) < 0.02 and abs(norm.std() - 0.05) < 0.01
    scale = tensors["layers.0.hc_attn_scale"]
    assert scale.min() >= 0.5 and scale.max() <= 1.5
    fn = tensors["layers.0.hc_attn_fn"]
    assert abs(fn.std() * fn.shape[-1] ** 0.5 - 1) < 0.02
    expert = quant.dequant_fp4_weight(tensors["layers.0.ffn.experts.0.w1.weight"],
                                      tensors["layers.0.ffn.experts.0.w1.scale"])
    assert abs(expert.std() * cfg.hidden_size ** 0.5 - 1) < 0.05
    assert abs(tensors["embed.weight"].float().std() - 1) < 0.01


def test_hash_routing_picks_distinct_uniform_experts():
    cfg = presets.tiny().replace(n_routed_experts=16, num_experts_per_tok=4)
    spec = layout.tensor_specs(cfg)["layers.0.ffn.gate.tid2eid"]
    ids = synthetic.synthesize(cfg, spec, seed=1)[spec.name]
    assert ids.shape == (cfg.vocab_size, 4) and ids.min() >= 0 and ids.max() < 16
    assert all(len(set(row)) == 4 for row in ids.tolist())
    counts = torch.bincount(ids.flatten().long(), minlength=16).double()
    expected = ids.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 40  # chi-square, 15 degrees of freedom: p ~ 5e-4


# ---- the writer --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hashes(tmp_path_factory) -> dict[str, str]:
    return file_hashes(write_synthetic(presets.tiny(), tmp_path_factory.mktemp("whole") / "ckpt", seed=7,
                                       chunk_elements=2**30))


def test_writer_bytes_do_not_depend_on_chunking(tiny_hashes, tmp_path):
    """One block a tensor (above), the default blocks and blocks of 3000 values (uneven row counts; one
    128-row block for FP8 weights), all through the device path on the CPU: the same files."""
    for chunk in (None, 3000):
        root = write_synthetic(presets.tiny(), tmp_path / f"chunk-{chunk}", seed=7, device="cpu",
                               chunk_elements=chunk)
        assert file_hashes(root) == tiny_hashes, chunk


def test_pieces_are_rows_of_the_whole_tensors():
    cfg = presets.tiny().replace(num_hidden_layers=1, compress_ratios=(4, 0), n_routed_experts=2)
    pieces: dict[str, list[torch.Tensor]] = {}
    runs: list[str] = []  # the names in stream order, one entry a run of consecutive pieces
    for name, piece in synthetic.synthetic_pieces(cfg, seed=4, device="cpu", chunk_elements=3000):
        assert piece.device.type == "cpu"
        pieces.setdefault(name, []).append(piece)
        runs += [name] if not runs or runs[-1] != name else []
    assert any(len(p) > 1 for p in pieces.values())
    whole = dict(synthetic.synthetic_tensors(cfg, seed=4))
    assert runs == list(whole)  # layout order, a tensor's pieces together
    for name, tensor in whole.items():
        assert same_bytes(torch.cat(pieces[name]), tensor), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a torch that has no CUDA")
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"device: got 'cuda', but this torch .* sees no CUDA GPU; use cpu"):
        write_synthetic(presets.tiny(), tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()


def test_bad_device_and_chunk_are_refused(tmp_path):
    with pytest.raises(ValueError, match="allowed: cpu, cuda, cuda:N"):
        write_synthetic(presets.tiny(), tmp_path / "out", device="tpu")
    with pytest.raises(ValueError, match="chunk_elements"):
        write_synthetic(presets.tiny(), tmp_path / "out", chunk_elements=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/synthetic_gpu_check.py runs it)")
def test_cuda_writes_the_cpu_bytes(tiny_hashes, tmp_path):
    root = write_synthetic(presets.tiny(), tmp_path / "cuda", seed=7, device="cuda")
    assert file_hashes(root) == tiny_hashes


# ---- computing ahead in a thread -----------------------------------------------------------------------
def test_prefetched_keeps_order_and_raises_where_the_error_was():
    def items():
        yield from range(5)
        raise KeyError("sixth")

    seen = []
    with prefetched(items(), depth=2) as ahead:
        with pytest.raises(KeyError, match="sixth"):
            for item in ahead:
                seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_prefetched_stops_its_thread_when_left_early():
    produced, threads = [], threading.active_count()

    def items():
        for i in range(10**6):
            produced.append(i)
            yield i

    with prefetched(items(), depth=3) as ahead:
        assert next(ahead) == 0
    assert threading.active_count() == threads
    assert len(produced) <= 6  # the consumed item, a full queue and the one being computed
    with pytest.raises(ValueError, match="depth"):
        with prefetched(iter([]), depth=0):
            pass
