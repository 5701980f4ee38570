"""transformers' `DeepseekV4ForCausalLM` (5.24.0) as an independent fp32 reference for tests.

API: `to_transformers_config(cfg)`, `load_transformers_model(ckpt_dir)`, `transformers_logits(model, ids,
prefill)`; `transformers_model_from_tensors(cfg, tensors)` is the loader's core, for tests that edit tensors.

How a released-layout checkpoint gets in (facts checked against transformers 5.24.0 on CPU):
- transformers' own route, `from_pretrained(dir, quantization_config=FineGrainedFP8Config(dequantize=True))`,
  needs `accelerate` (ImportError "Loading an FP8 quantized model requires accelerate" without it; a
  `device_map` needs it too). With it, it loads the released names (its FP8 quantizer renames `.scale` to
  `weight_scale_inv`) and dequantises FP8 and MXFP4 (int8 weights are unpacked as e2m1, low nibble first),
  but `Fp8Dequantize` derives the block size as `dim // scale_dim`, so a dim that is not a multiple of 128
  with more than one block is dequantised with the wrong blocks, silently (tiny's `wo_a`, in = 192), or
  raises "not divisible by scale grid"; and a weight whose `.scale` is missing is loaded as raw e4m3 codes
  with no report. Released Flash/Pro dims are all multiples of 128, so only small configs are hit.
- So this module dequantises itself, with transformers' own `Fp8Dequantize._dequantize_one` on weights
  zero-padded to whole 128x128 blocks (FP4's [1, 32] blocks are always whole), and loads the dequantised
  tensors under their released names through `from_pretrained(state_dict=...)`, which applies the
  `deepseek_v4` conversion mapping (renames, per-expert w1/w3 -> gate_up_proj, w2 -> down_proj). No
  `accelerate` needed. transformers does not build MTP: `mtp.*` tensors are dropped before loading.
- `from_pretrained` leaves a missing weight randomly initialised and only lists it in `missing_keys`; the
  loader here fails on any missing, unexpected or mismatched key, and on any FP8/FP4 weight without scale.
- A released config.json whose HCA ratio is not 128 cannot be read by `DeepseekV4Config` (its legacy
  `compress_ratios` path maps only 0/4/128: KeyError 16 for `tiny`), so the config always comes from
  `to_transformers_config`.

Top-k ties: the Lightning Indexer's score `sum_h w[h] * relu(q_h . k)` is exactly 0 whenever every head's
dot product is negative, frequent with tiny's 4 index heads; `torch.topk` then picks among equal scores in
an implementation-defined order that changes with the tensor length (prefill-vs-one-shot logits differed by
0.74 on tiny). `load_transformers_model(..., break_index_ties=True)` (default) adds a forward hook to each
indexer scorer that orders exactly-zero scores by entry index (lowest wins); other scores are untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from transformers import DeepseekV4ForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from dsv4c.compiler.transformers_model import new_cache, to_transformers_config, transformers_model
from dsv4c.model.config import ModelConfig

__all__ = ["load_transformers_model", "read_checkpoint", "to_transformers_config", "transformers_logits",
           "transformers_model_from_tensors"]

FP8_BLOCK = 128


# ---- loading -------------------------------------------------------------------------------------
def read_checkpoint(ckpt_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """config.json and every tensor of a released-layout checkpoint (sharded with an index, or one file)."""
    root = Path(ckpt_dir)
    cfg = ModelConfig.from_json(root / "config.json")
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(root / file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return cfg, tensors


def dequantize(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released tensors -> fp32 `.weight`s without `.scale`s, decoded by transformers' `Fp8Dequantize`
    (FP8 weights padded to whole 128x128 blocks first). Other tensors pass through unchanged."""
    decoder = Fp8Dequantize(None)
    scales = {name for name in tensors if name.endswith(".scale")}
    out = {}
    for name, tensor in tensors.items():
        if name in scales:
            if name.removesuffix(".scale") + ".weight" not in tensors:
                raise AssertionError(f"{name}: a scale without its weight")
            continue
        scale = tensors.get(name.removesuffix(".weight") + ".scale") if name.endswith(".weight") else None
        if scale is None:
            if tensor.dtype in (torch.float8_e4m3fn, torch.int8):
                raise AssertionError(f"{name}: {tensor.dtype} weight without its .scale")
            out[name] = tensor
        elif tensor.dtype == torch.int8:  # MXFP4: [out, in/2] with [out, in/32] scales
            if tuple(scale.shape) != (tensor.shape[0], tensor.shape[1] * 2 // 32):
                raise AssertionError(f"{name}: FP4 scale shape {tuple(scale.shape)} for weight {tuple(tensor.shape)}")
            out[name] = decoder._dequantize_one(tensor, scale, torch.float32)
        else:  # FP8 e4m3 with [ceil(out/128), ceil(in/128)] scales
            rows, cols = tensor.shape
            if tuple(scale.shape) != (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)):
                raise AssertionError(f"{name}: FP8 scale shape {tuple(scale.shape)} for weight {(rows, cols)}")
            padded = tensor.new_zeros(scale.shape[0] * FP8_BLOCK, scale.shape[1] * FP8_BLOCK)
            padded[:rows, :cols] = tensor
            out[name] = decoder._dequantize_one(padded, scale, torch.float32)[:rows, :cols].contiguous()
    return out


def transformers_model_from_tensors(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], *,
                                    break_index_ties: bool = True) -> DeepseekV4ForCausalLM:
    """An fp32 eval-mode model from released-layout tensors decoded by transformers' own dequantiser; fails
    unless every weight is loaded exactly once (anything missing, unexpected or mismatched, apart from the
    dropped `mtp.*`)."""
    return transformers_model(cfg, dequantize(tensors), dtype=torch.float32, break_index_ties=break_index_ties)


def load_transformers_model(ckpt_dir: str | Path, *, break_index_ties: bool = True) -> DeepseekV4ForCausalLM:
    """transformers' DeepSeek-V4 in fp32 from a released-layout checkpoint directory (see module doc)."""
    cfg, tensors = read_checkpoint(ckpt_dir)
    return transformers_model_from_tensors(cfg, tensors, break_index_ties=break_index_ties)


# ---- running -------------------------------------------------------------------------------------
@torch.no_grad()
def transformers_logits(model: DeepseekV4ForCausalLM, token_ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits `[B, T, V]` (fp32) for every position: the first `prefill` tokens in one call, then one token
    per call through transformers' cache (sliding window plus compressor states)."""
    batch, length = token_ids.shape
    if not 1 <= prefill <= length:
        raise ValueError(f"prefill: got {prefill}; allowed: 1..{length}")
    cache = new_cache(model)
    logits = [model(input_ids=token_ids[:, :prefill], cache=cache, use_cache=True).logits]
    for t in range(prefill, length):
        logits.append(model(input_ids=token_ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert cache.get_seq_length() == length
    return torch.cat(logits, dim=1).float()
