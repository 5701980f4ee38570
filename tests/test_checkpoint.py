"""Checkpoint layout, the synthetic writer and the validating lazy reader.

Tolerance: bit-exact everywhere (tensors are compared byte for byte).
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4c.model import checkpoint, layout, presets, synthetic
from dsv4c.model.checkpoint import Checkpoint, CheckpointError, summary, write_synthetic
from dsv4c.model.config import ModelConfig


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_synthetic(presets.tiny(), tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint to damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "tiny"))


def edit_shard(root: Path, tensor: str, change) -> str:
    """Rewrite the shard holding `tensor` as change(its tensors); returns the shard's file name."""
    file = json.loads((root / checkpoint.INDEX_NAME).read_text())["weight_map"][tensor]
    tensors = change(load_file(str(root / file)))
    save_file(tensors, str(root / file))
    return file


def edit_index(root: Path, change) -> None:
    index = json.loads((root / checkpoint.INDEX_NAME).read_text())
    change(index["weight_map"])
    (root / checkpoint.INDEX_NAME).write_text(json.dumps(index))


@functools.lru_cache(maxsize=None)
def specs_of(preset: str) -> dict[str, layout.TensorSpec]:
    return layout.tensor_specs(presets.preset(preset))


# ---- layout ----------------------------------------------------------------------------------------
def block_count(cfg: ModelConfig, kind: str) -> int:
    """Tensors of one block: mHC 2x3, 2 norms, 13 attention, gate 2, experts 6 each, shared 6."""
    base = 6 + 2 + 13 + 2 + 6 * cfg.n_routed_experts + 6
    return base + {"window": 0, "hca": 4, "csa": 4 + 7}[kind]


@pytest.mark.parametrize("name", ["tiny", "flash-slice", "flash", "pro"])
def test_tensor_count_per_layer_kind(name):
    cfg = presets.preset(name)
    specs = specs_of(name)
    per_prefix = collections.Counter(".".join(n.split(".")[:2]) + "." if n.startswith(("layers.", "mtp.")) else ""
                                     for n in specs)
    assert per_prefix.pop("") == 6  # embed, norm, head, hc_head_{fn,base,scale}
    assert list(per_prefix) == [layout.layer_prefix(cfg, i) for i in range(cfg.n_layers_total)]
    for layer in range(cfg.n_layers_total):
        prefix = layout.layer_prefix(cfg, layer)
        extra = 10 if prefix.startswith("mtp.") else 0  # enorm, hnorm, e_proj, h_proj, norm, hc_head
        assert per_prefix[prefix] == block_count(cfg, cfg.attention_kind(layer)) + extra, prefix
    assert list(specs)[0] == "embed.weight" and list(specs)[-1] == "head.weight"


def test_flash_layout_spot_checks():
    specs = specs_of("flash")
    e4m3, e8m0 = torch.float8_e4m3fn, torch.float8_e8m0fnu
    expect = {
        "embed.weight": ((129280, 4096), torch.bfloat16), "hc_head_fn": ((4, 16384), torch.float32),
        "hc_head_scale": ((1,), torch.float32), "layers.0.hc_attn_fn": ((24, 16384), torch.float32),
        "layers.0.hc_ffn_scale": ((3,), torch.float32), "layers.0.attn.wq_a.weight": ((1024, 4096), e4m3),
        "layers.0.attn.wq_a.scale": ((8, 32), e8m0), "layers.0.attn.wq_b.weight": ((32768, 1024), e4m3),
        "layers.0.attn.wkv.weight": ((512, 4096), e4m3), "layers.0.attn.wo_a.weight": ((8192, 4096), e4m3),
        "layers.0.attn.wo_b.scale": ((32, 64), e8m0), "layers.0.attn.attn_sink": ((64,), torch.float32),
        "layers.0.ffn.gate.tid2eid": ((129280, 6), torch.int32),
        "layers.2.attn.compressor.wkv.weight": ((1024, 4096), torch.bfloat16),
        "layers.2.attn.compressor.ape": ((4, 1024), torch.float32),
        "layers.2.attn.indexer.wq_b.weight": ((8192, 1024), e4m3),
        "layers.2.attn.indexer.weights_proj.weight": ((64, 4096), torch.bfloat16),
        "layers.2.attn.indexer.compressor.ape": ((4, 256), torch.float32),
        "layers.2.attn.indexer.compressor.norm.weight": ((128,), torch.bfloat16),
        "layers.3.attn.compressor.ape": ((128, 512), torch.float32),
        "layers.3.ffn.gate.bias": ((256,), torch.float32),
        "layers.3.ffn.experts.255.w1.weight": ((2048, 2048), torch.int8),
        "layers.3.ffn.experts.255.w1.scale": ((2048, 128), e8m0),
        "layers.3.ffn.experts.0.w2.weight": ((4096, 1024), torch.int8),
        "layers.3.ffn.shared_experts.w2.scale": ((32, 16), e8m0),
        "mtp.0.e_proj.weight": ((4096, 4096), e4m3), "mtp.0.hc_head_base": ((4,), torch.float32),
        "mtp.0.ffn.gate.bias": ((256,), torch.float32),
    }
    for name, (shape, dtype) in expect.items():
        assert (specs[name].shape, specs[name].dtype) == (shape, dtype), name
    assert "layers.3.ffn.gate.tid2eid" not in specs and "layers.3.attn.indexer.wq_b.weight" not in specs
    assert "layers.0.attn.compressor.ape" not in specs and "mtp.0.attn.compressor.ape" not in specs


def test_parameter_counts_match_the_released_models():
    for name, released in (("flash", 284e9), ("pro", 1.6e12)):
        specs = specs_of(name).values()
        main = layout.parameter_count(s for s in specs if not s.name.startswith("mtp."))
        assert abs(main / released - 1) < 0.02, (name, main)
    assert 155e9 < layout.total_bytes(specs_of("flash").values()) < 165e9  # "about 160 GB"


def test_bf16_and_fp8_expert_variants():
    cfg = presets.tiny().replace(fp8_weights=False, expert_dtype="fp8")
    specs = layout.tensor_specs(cfg)
    assert not any(n.endswith(".scale") for n in specs)
    assert specs["layers.0.attn.wq_a.weight"].dtype == torch.bfloat16
    assert specs["layers.0.ffn.experts.0.w1.weight"].shape == (128, 128)
    fp8 = layout.tensor_specs(presets.tiny().replace(expert_dtype="fp8"))
    assert fp8["layers.0.ffn.experts.0.w2.weight"].dtype == torch.float8_e4m3fn
    assert fp8["layers.0.ffn.experts.0.w2.scale"].shape == (1, 1)


# ---- writer and reader round trip -----------------------------------------------------------------
def test_round_trip_is_bit_exact(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir)
    cfg = ckpt.config
    assert cfg == presets.tiny()
    for name, tensor in synthetic.synthetic_tensors(cfg, seed=0):
        assert same_bytes(ckpt.get(name), tensor), name
    for file in ckpt.files:  # safetensors' own loader reads the hand-written files identically
        for name, tensor in load_file(str(tiny_dir / file)).items():
            assert same_bytes(tensor, ckpt.get(name)) and ckpt.headers[name].file == file


def test_written_files_follow_the_release_conventions(tiny_dir):
    index = json.loads((tiny_dir / checkpoint.INDEX_NAME).read_text())
    specs = layout.tensor_specs(presets.tiny())
    assert index["metadata"]["total_size"] == layout.total_bytes(specs.values())
    assert list(index["weight_map"]) == list(specs)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    assert sorted(p.name for p in tiny_dir.glob("*.safetensors")) == files
    assert ModelConfig.from_json(tiny_dir / "config.json") == presets.tiny()


def test_one_layer_a_shard_and_splits_stay_within_a_layer(tmp_path):
    specs = layout.tensor_specs(presets.tiny()).values()
    default = checkpoint.shard_groups(specs, checkpoint.DEFAULT_SHARD_BYTES)
    assert [s[0].name.split(".")[0:2] for s in default] == [
        ["embed", "weight"], ["layers", "0"], ["layers", "1"], ["layers", "2"], ["mtp", "0"], ["norm", "weight"]]
    small = checkpoint.shard_groups(specs, 64 * 1024)
    assert len(small) > len(default)
    for shard in small:
        assert len({checkpoint._group_key(s.name) for s in shard}) == 1
        assert sum(s.nbytes for s in shard) <= 64 * 1024 or len(shard) == 1


def test_synthetic_values_are_seeded_per_tensor_and_sane():
    cfg = presets.tiny()
    names = ["layers.1.attn.wq_a.scale", "layers.1.attn.wq_a.weight", "layers.0.ffn.gate.tid2eid"]
    alone = dict(synthetic.synthetic_tensors(cfg, 0, names))
    together = dict(synthetic.synthetic_tensors(cfg, 0))
    other_seed = dict(synthetic.synthetic_tensors(cfg, 1, names))
    for name in names:
        assert same_bytes(alone[name], together[name])
        # (a scale may well coincide: it is a power of two near the weights' amax)
        assert name.endswith(".scale") or not same_bytes(alone[name], other_seed[name])
    tid2eid = together["layers.0.ffn.gate.tid2eid"]
    assert tid2eid.min() >= 0 and tid2eid.max() < cfg.n_routed_experts
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in tid2eid.tolist())
    weights = layout.tensor_specs(cfg)
    wq_b = layout.scale_name("layers.1.attn.wq_b.weight")
    from dsv4c.model.quant import dequant_fp8_weight
    values = dequant_fp8_weight(together["layers.1.attn.wq_b.weight"], together[wq_b])
    assert abs(values.std().item() - cfg.q_lora_rank ** -0.5) < 0.01
    assert torch.isfinite(values).all() and weights[wq_b].format == "e8m0"


# ---- atomic writes ---------------------------------------------------------------------------------
def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """A generation error (in the background thread) reaches the caller; the half-written folder goes."""
    real, calls = synthetic.synthesize_rows, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 150:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "synthesize_rows", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic(presets.tiny(), tmp_path / "out")
    assert os.listdir(tmp_path) == [] and len(calls) == 150


def test_failed_write_stops_the_generating_thread(tmp_path, monkeypatch):
    """A writing error leaves nothing on disk and no generating thread behind."""
    real, shards = checkpoint.encode_header, []

    def failing(specs):
        shards.append(1)
        if len(shards) == 3:
            time.sleep(0.5)  # the generating thread fills its queue and waits on it
            raise OSError("disk full")
        return real(specs)

    monkeypatch.setattr(checkpoint, "encode_header", failing)
    threads = threading.active_count()
    with pytest.raises(OSError, match="disk full"):
        write_synthetic(presets.tiny(), tmp_path / "out", chunk_elements=4096)
    assert os.listdir(tmp_path) == [] and threading.active_count() == threads


def test_existing_target_is_refused_unless_overwritten(tiny_copy, tmp_path):
    before = sorted(os.listdir(tiny_copy))
    with pytest.raises(FileExistsError, match="already exists"):
        write_synthetic(presets.tiny(), tiny_copy, seed=5)
    assert sorted(os.listdir(tiny_copy)) == before
    write_synthetic(presets.tiny(), tiny_copy, seed=5, overwrite=True)
    name = "layers.0.attn.attn_sink"
    want = dict(synthetic.synthetic_tensors(presets.tiny(), 5, [name]))[name]
    assert same_bytes(Checkpoint.open(tiny_copy).get(name), want)
    assert sorted(os.listdir(tmp_path)) == ["tiny"]
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        write_synthetic(presets.tiny(), tmp_path / "notes", overwrite=True)


# ---- validation errors ------------------------------------------------------------------------------
def open_error(root: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(root)
    return str(info.value)


def test_missing_tensor(tiny_copy):
    name = "layers.1.attn.indexer.wq_b.scale"
    edit_shard(tiny_copy, name, lambda t: {k: v for k, v in t.items() if k != name})
    edit_index(tiny_copy, lambda m: m.pop(name))
    message = open_error(tiny_copy)
    assert f"missing tensor {name}" in message and "[2, 1]" in message


def test_wrong_shape(tiny_copy):
    name = "layers.2.attn.attn_sink"
    file = edit_shard(tiny_copy, name, lambda t: {**t, name: torch.zeros(5)})
    message = open_error(tiny_copy)
    assert name in message and file in message and "shape [5], expected [4]" in message


def test_wrong_dtype(tiny_copy):
    name = "layers.0.ffn.experts.3.w2.scale"
    file = edit_shard(tiny_copy, name, lambda t: {**t, name: t[name].view(torch.uint8)})
    message = open_error(tiny_copy)
    assert name in message and file in message and "torch.uint8" in message and "float8_e8m0fnu" in message


def test_unexpected_tensor(tiny_copy):
    name = "layers.0.attn.wq_c.weight"
    file = edit_shard(tiny_copy, "layers.0.attn.wq_a.weight", lambda t: {**t, name: torch.zeros(2)})
    edit_index(tiny_copy, lambda m: m.update({name: file}))
    assert f"unexpected tensor {name} in {file}" in open_error(tiny_copy)


def test_truncated_shard(tiny_copy):
    file = "model-00003-of-00006.safetensors"
    size = (tiny_copy / file).stat().st_size
    os.truncate(tiny_copy / file, size - 100)
    message = open_error(tiny_copy)
    assert file in message and "truncated" in message
    os.truncate(tiny_copy / file, 4)
    assert file in open_error(tiny_copy)


def test_index_naming_a_missing_file(tiny_copy):
    (tiny_copy / "model-00005-of-00006.safetensors").unlink()
    message = open_error(tiny_copy)
    assert "model-00005-of-00006.safetensors" in message and "does not exist" in message and "mtp.0." in message


def test_index_and_headers_must_agree(tiny_copy):
    edit_index(tiny_copy, lambda m: m.update({"norm.weight": "model-00001-of-00006.safetensors"}))
    message = open_error(tiny_copy)
    assert "norm.weight" in message and "model-00006-of-00006.safetensors" in message


def test_index_cannot_point_outside_the_directory(tiny_copy):
    edit_index(tiny_copy, lambda m: m.update({"norm.weight": "../model-00006-of-00006.safetensors"}))
    assert "norm.weight" in open_error(tiny_copy)


def test_corrupt_header_and_config(tiny_copy):
    file = tiny_copy / "model-00002-of-00006.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    file.write_bytes(bytes(data))
    assert "model-00002-of-00006.safetensors" in open_error(tiny_copy)
    (tiny_copy / "config.json").write_text('{"hidden_size": 3}')
    assert "config.json" in open_error(tiny_copy)
    (tiny_copy / "config.json").unlink()
    assert "config.json" in open_error(tiny_copy)


def test_single_file_checkpoint_without_index(tiny_dir, tmp_path):
    root = tmp_path / "single"
    root.mkdir()
    shutil.copy(tiny_dir / "config.json", root)
    tensors = {}
    for file in sorted(tiny_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    save_file(tensors, str(root / checkpoint.SINGLE_NAME))
    ckpt = Checkpoint.open(root)
    assert ckpt.files == (checkpoint.SINGLE_NAME,)
    assert same_bytes(ckpt.get("head.weight"), tensors["head.weight"])


# ---- laziness and summary -------------------------------------------------------------------------
def test_loading_one_layer_opens_only_its_shards(tmp_path):
    root = write_synthetic(presets.tiny(), tmp_path / "many", shard_bytes=96 * 1024)
    ckpt = Checkpoint.open(root)
    assert ckpt.opened_files == () and len(ckpt.files) > 10
    layer = ckpt.layer_tensors(2)
    holding = {h.file for n, h in ckpt.headers.items() if n.startswith("layers.2.")}
    assert 1 < len(holding) < len(ckpt.files)
    assert set(ckpt.opened_files) == holding
    assert "attn.compressor.ape" in layer and "ffn.experts.7.w3.scale" in layer
    assert all(n.startswith("layers.2.") for n in ckpt.tensors("layers.2"))
    with pytest.raises(KeyError, match="no such tensor"):
        ckpt.get("layers.9.attn_norm.weight")


def test_summary_counts(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir)
    result = summary(ckpt)
    specs = layout.tensor_specs(presets.tiny())
    assert (result.n_tensors, result.n_shards, result.layer_pattern) == (339, 6, "wCH|W")
    assert result.params == layout.parameter_count(specs.values())
    assert result.tensor_bytes == layout.total_bytes(specs.values())
    assert result.file_bytes == sum(p.stat().st_size for p in tiny_dir.glob("*.safetensors"))
    assert result.by_format["fp4"] == layout.FormatCount(96, 96 * 128 * 128, 96 * 128 * 64)
    assert result.by_format["int32"] == layout.FormatCount(1, 1024 * 2, 1024 * 2 * 4)
    assert any("wCH|W" in line for line in result.lines())
    assert ckpt.opened_files == ()


class CountingFile:
    """A file object that counts the bytes read through it."""

    def __init__(self, handle, tally):
        self._handle, self._tally = handle, tally

    def read(self, n=-1):
        data = self._handle.read(n)
        self._tally.append(len(data))
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def header_length(path: Path) -> int:
    with open(path, "rb") as handle:
        return int.from_bytes(handle.read(8), "little")


def test_flash_slice_info_reads_headers_only(tmp_path, monkeypatch):
    root = write_synthetic(presets.flash_slice(), tmp_path / "flash-slice", sparse=True)
    on_disk = sum(p.stat().st_blocks * 512 for p in root.iterdir())
    assert on_disk < 64 * 2**20  # the ~19 GB of tensor data are holes
    read = []
    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: CountingFile(open(*a, **k), read), raising=False)
    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: pytest.fail("tensor data opened"))
    ckpt = Checkpoint.open(root)
    result = summary(ckpt)
    assert sum(read) == sum(8 + header_length(root / f) for f in ckpt.files)
    assert (result.n_tensors, result.n_shards, result.layer_pattern) == (7856, 7, "wwcH|W")
    assert result.tensor_bytes == layout.total_bytes(layout.tensor_specs(presets.flash_slice()).values())
    assert result.by_format["fp4"].params == 5 * 256 * 3 * 2048 * 4096
    assert ckpt.opened_files == ()
