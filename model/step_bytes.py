"""The fewest bytes a decode step must read: the roofline floor every speed figure is divided by.

Per ../shared/docs/performance.md: every weight the step touches, once, in its stored format (FP8 attention and
shared experts with their scales, the routed experts the batch selects in MXFP4 with scales, bf16 router,
compressor and LM head, the embedding rows of the batch's tokens), plus the cached KV entries each sequence
attends to at the given context (the window, the C4 entries the indexer selects and the indexer keys it scores,
every C128 entry). Routed experts selected: hash and score routing spread a batch's `b * k` choices over E
experts; the expected number of distinct ones, `E * (1 - (1 - k / E) ** b)`, is used (uniform choices).
"""

from __future__ import annotations

import dataclasses

from dsv4c.model.config import ModelConfig
from dsv4c.model.layout import TensorSpec, layer_prefix, tensor_specs


@dataclasses.dataclass(frozen=True)
class StepBytes:
    """Bytes of one step by kind: dense weights, routed experts, embedding rows, cached KV."""

    weights: float
    experts: float
    embedding: float
    kv: float

    @property
    def total(self) -> float:
        return self.weights + self.experts + self.embedding + self.kv


def expected_experts(cfg: ModelConfig, batch: int) -> float:
    """Expected distinct routed experts a layer reads for `batch` tokens choosing k of E uniformly."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return e * (1.0 - (1.0 - k / e) ** batch)


def kv_bytes_per_sequence(cfg: ModelConfig, layer: int, context: int, cache_itemsize: int = 2) -> float:
    """Cached bytes a query at `context` reads in `layer` (bf16 caches: `cache_itemsize` 2)."""
    window = min(context, cfg.sliding_window) * cfg.head_dim
    ratio = cfg.compress_ratios[layer]
    entries = context // ratio if ratio else 0
    if ratio == 4:
        selected = min(entries, cfg.index_topk) * cfg.head_dim + entries * cfg.index_head_dim
    else:
        selected = entries * cfg.head_dim
    return float((window + selected) * cache_itemsize)


def step_bytes(cfg: ModelConfig, batch: int, context: int, mtp: bool = False) -> StepBytes:
    """The floor of one main step (decode, T = 1) at `batch` sequences of `context` tokens; with `mtp`, plus one
    MTP draft step (its layer, the shared LM head again)."""
    specs = tensor_specs(cfg)
    layers = list(range(cfg.num_hidden_layers)) + ([cfg.num_hidden_layers] if mtp else [])
    prefixes = tuple(layer_prefix(cfg, layer) for layer in layers)
    weights = experts = 0.0
    per_expert: dict[str, float] = {}
    for spec in specs.values():
        if spec.name.startswith(("layers.", "mtp.")) and not spec.name.startswith(prefixes):
            continue
        if ".experts." in spec.name:
            layer_key = spec.name.split(".experts.")[0]
            per_expert[layer_key] = per_expert.get(layer_key, 0.0) + spec.nbytes / cfg.n_routed_experts
        elif spec.name == "embed.weight" or spec.name.endswith("tid2eid"):
            continue
        else:
            weights += spec.nbytes * (2 if mtp and spec.name == "head.weight" else 1)
    experts = sum(per_expert.values()) * expected_experts(cfg, batch)
    embedding = _row_bytes(specs["embed.weight"]) * batch * (2 if mtp else 1)
    kv = batch * sum(kv_bytes_per_sequence(cfg, layer, context) for layer in layers)
    return StepBytes(weights, experts, embedding, kv)


def _row_bytes(spec: TensorSpec) -> float:
    return spec.nbytes / spec.shape[0]
