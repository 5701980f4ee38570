"""Seeded random weights with realistic scales, in the released checkpoint layout.

Each tensor comes from its own `torch.Generator`, seeded from (seed, tensor name), so any tensor can be
regenerated alone and memory stays bounded by one tensor. Values are chosen so a forward pass stays
numerically healthy at every size:
- linear weights `[out, in]`: N(0, 1/in), so a projection keeps its input's RMS; then quantised to the
  release format (`quant.quantize_fp8_weight` / `quantize_fp4_weight`) or cast to bf16;
- embeddings N(0, 1); norm weights 1 + N(0, 0.05^2);
- mHC: `*_fn [rows, n*D]` N(0, 1/(n*D)) so the normalised mixes are O(1), `*_base` N(0, 0.1^2),
  `*_scale` uniform in [0.5, 1.5);
- `attn_sink` N(0, 1); compressor `ape` N(0, 0.1^2); router `gate.bias` N(0, 0.01^2);
- `gate.tid2eid`: for every token, `num_experts_per_tok` distinct expert ids drawn uniformly.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import torch

from dsv4c.model import quant
from dsv4c.model.config import ModelConfig
from dsv4c.model.layout import TensorSpec, scale_name, tensor_specs


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor `name` (stable across runs, platforms and Python hash seeds)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _values(spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    """Unquantised fp32 values of a float tensor (not a scale), in its logical shape."""
    name, shape = spec.name, spec.logical_shape
    randn = torch.randn(shape, generator=gen)
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * randn
    if name.endswith("_fn"):
        return randn * shape[-1] ** -0.5
    if name.endswith("_base") or name.endswith(".ape"):
        return 0.1 * randn
    if name.endswith("_scale"):
        return 0.5 + torch.rand(shape, generator=gen)
    if name.endswith("gate.bias"):
        return 0.01 * randn
    if name.endswith("attn_sink") or name == "embed.weight":
        return randn
    if len(shape) == 2:
        return randn * shape[-1] ** -0.5
    raise AssertionError(f"{name}: no synthetic distribution for this tensor")


def synthesize(cfg: ModelConfig, spec: TensorSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """The stored form of `spec` (a non-scale tensor): {name: tensor}, plus {name.scale: scales} for a
    quantised weight (both come from one draw)."""
    gen = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    if spec.format == "int32":
        vocab, top_k = spec.shape
        ids = torch.rand(vocab, cfg.n_routed_experts, generator=gen).topk(top_k, dim=-1).indices
        return {spec.name: ids.to(torch.int32)}
    values = _values(spec, gen)
    if spec.format == "fp8":
        weight, scale = quant.quantize_fp8_weight(values)
        return {spec.name: weight, scale_name(spec.name): scale}
    if spec.format == "fp4":
        weight, scale = quant.quantize_fp4_weight(values)
        return {spec.name: weight, scale_name(spec.name): scale}
    return {spec.name: values.to(spec.dtype)}


def _weight_of(scale: str) -> str:
    return scale[: -len(".scale")] + ".weight"


def synthetic_tensors(cfg: ModelConfig, seed: int = 0,
                      names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for `names` (default: every tensor of `tensor_specs(cfg)`, in layout order).

    A `.scale` listed right after its `.weight` is taken from the same draw; one asked for alone is
    regenerated from its weight's seed, so the result never depends on which names are asked for.
    """
    specs = tensor_specs(cfg)
    pending: dict[str, torch.Tensor] = {}
    for name in specs if names is None else names:
        if name not in specs:
            raise KeyError(f"{name}: not a tensor of this layout")
        if name not in pending:
            source = _weight_of(name) if specs[name].format == "e8m0" else name
            pending = synthesize(cfg, specs[source], seed)
        yield name, pending.pop(name)
