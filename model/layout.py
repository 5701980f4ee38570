"""The released checkpoint's tensor inventory, derived from a ModelConfig (section 5 of the architecture spec).

`tensor_specs(cfg)` lists every tensor a DeepSeek-V4 checkpoint holds -- name, shape, dtype and storage
format -- in a stable order: `embed.weight`, the main layers `layers.{i}.*`, the MTP layer `mtp.0.*`, then
`norm.weight`, `hc_head_*` and `head.weight`. Within a layer the order follows the forward pass, and a
quantised weight's `.scale` comes right after its `.weight`.

Formats:
- "fp8":  e4m3 `[out, in]`; its `.scale` is `[ceil(out/128), ceil(in/128)]`
- "fp4":  MXFP4, int8 `[out, in/2]` (two e2m1 codes a byte); its `.scale` is `[out, in/32]`
- "e8m0": the power-of-two block scales of an fp8 or fp4 weight (float8_e8m0fnu)
- "bf16", "fp32", "int32": plain tensors
With `cfg.fp8_weights` False, every weight the release stores in FP8 or FP4 is bf16 and has no scale.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator

import torch

from dsv4c.model.config import ModelConfig

FORMATS = ("fp8", "fp4", "e8m0", "bf16", "fp32", "int32")
FP8_BLOCK = 128
FP4_BLOCK = 32
_DTYPE_OF_FORMAT = {
    "fp8": torch.float8_e4m3fn,
    "fp4": torch.int8,
    "e8m0": torch.float8_e8m0fnu,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "int32": torch.int32,
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: its name, on-disk shape and dtype, and storage format (one of FORMATS)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    format: str

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"{self.name}: format {self.format!r}; allowed: {list(FORMATS)}")
        if _DTYPE_OF_FORMAT[self.format] != self.dtype:
            raise ValueError(f"{self.name}: format {self.format} is stored as {_DTYPE_OF_FORMAT[self.format]}")

    @property
    def numel(self) -> int:
        """Stored elements (bytes, for packed fp4)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape of the values the tensor holds: `[out, in]` for a packed fp4 `[out, in/2]` weight."""
        if self.format == "fp4":
            return (*self.shape[:-1], 2 * self.shape[-1])
        return self.shape

    @property
    def params(self) -> int:
        """Model parameters this tensor holds; scales are not parameters."""
        return 0 if self.format == "e8m0" else math.prod(self.logical_shape)


def scale_name(weight_name: str) -> str:
    """`X.weight` -> `X.scale`, where the block scales of a quantised weight live."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"{weight_name}: only a `.weight` tensor has a `.scale`")
    return weight_name[: -len(".weight")] + ".scale"


def layer_prefix(cfg: ModelConfig, layer: int) -> str:
    """`layers.{i}.` for a main layer, `mtp.{j}.` for MTP layer j (layer index num_hidden_layers + j)."""
    if not 0 <= layer < cfg.n_layers_total:
        raise ValueError(f"layer {layer}: allowed 0..{cfg.n_layers_total - 1}")
    if layer < cfg.num_hidden_layers:
        return f"layers.{layer}."
    return f"mtp.{layer - cfg.num_hidden_layers}."


# ---- building blocks -----------------------------------------------------------------------------
def _plain(name: str, shape: tuple[int, ...], fmt: str) -> TensorSpec:
    return TensorSpec(name, tuple(shape), _DTYPE_OF_FORMAT[fmt], fmt)


def _linear(cfg: ModelConfig, name: str, out: int, inp: int, fmt: str) -> Iterator[TensorSpec]:
    """`name.weight` (and `name.scale`) of an `inp -> out` projection stored as fp8, fp4 or bf16."""
    if fmt in ("fp8", "fp4") and not cfg.fp8_weights:
        fmt = "bf16"
    if fmt == "fp8":
        yield _plain(f"{name}.weight", (out, inp), "fp8")
        yield _plain(f"{name}.scale", (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)), "e8m0")
    elif fmt == "fp4":
        if inp % FP4_BLOCK:
            raise ValueError(f"{name}: fp4 needs an input width divisible by {FP4_BLOCK}, got {inp}")
        yield _plain(f"{name}.weight", (out, inp // 2), "fp4")
        yield _plain(f"{name}.scale", (out, inp // FP4_BLOCK), "e8m0")
    else:
        yield _plain(f"{name}.weight", (out, inp), fmt)


def _hc(cfg: ModelConfig, name: str, head: bool = False) -> Iterator[TensorSpec]:
    """mHC parameters `{name}_fn`, `_base`, `_scale` (fp32): a sub-layer's mix has (2+n)*n rows and 3
    scales (pre, post, comb); the `hc_head` collapse has n rows and one scale."""
    n, dim = cfg.hc_mult, cfg.hidden_size
    rows, scales = (n, 1) if head else (cfg.hc_mix_dim, 3)
    yield _plain(f"{name}_fn", (rows, n * dim), "fp32")
    yield _plain(f"{name}_base", (rows,), "fp32")
    yield _plain(f"{name}_scale", (scales,), "fp32")


def _compressor(cfg: ModelConfig, p: str, ratio: int, width: int) -> Iterator[TensorSpec]:
    coff = 2 if ratio == 4 else 1
    yield _plain(f"{p}wkv.weight", (coff * width, cfg.hidden_size), "bf16")
    yield _plain(f"{p}wgate.weight", (coff * width, cfg.hidden_size), "bf16")
    yield _plain(f"{p}ape", (ratio, coff * width), "fp32")
    yield _plain(f"{p}norm.weight", (width,), "bf16")


def _indexer(cfg: ModelConfig, p: str) -> Iterator[TensorSpec]:
    heads, width = cfg.index_n_heads, cfg.index_head_dim
    yield from _linear(cfg, f"{p}wq_b", heads * width, cfg.q_lora_rank, "fp8")
    yield _plain(f"{p}weights_proj.weight", (heads, cfg.hidden_size), "bf16")
    yield from _compressor(cfg, f"{p}compressor.", 4, width)


def _attention(cfg: ModelConfig, p: str, ratio: int) -> Iterator[TensorSpec]:
    dim, heads, hd, groups = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
    yield from _linear(cfg, f"{p}wq_a", cfg.q_lora_rank, dim, "fp8")
    yield _plain(f"{p}q_norm.weight", (cfg.q_lora_rank,), "bf16")
    yield from _linear(cfg, f"{p}wq_b", heads * hd, cfg.q_lora_rank, "fp8")
    yield from _linear(cfg, f"{p}wkv", hd, dim, "fp8")
    yield _plain(f"{p}kv_norm.weight", (hd,), "bf16")
    if ratio > 0:
        yield from _compressor(cfg, f"{p}compressor.", ratio, hd)
    if ratio == 4:
        yield from _indexer(cfg, f"{p}indexer.")
    yield from _linear(cfg, f"{p}wo_a", groups * cfg.o_lora_rank, heads * hd // groups, "fp8")
    yield from _linear(cfg, f"{p}wo_b", dim, groups * cfg.o_lora_rank, "fp8")
    yield _plain(f"{p}attn_sink", (heads,), "fp32")


def _expert(cfg: ModelConfig, p: str, fmt: str) -> Iterator[TensorSpec]:
    dim, inter = cfg.hidden_size, cfg.moe_intermediate_size
    yield from _linear(cfg, f"{p}w1", inter, dim, fmt)
    yield from _linear(cfg, f"{p}w2", dim, inter, fmt)
    yield from _linear(cfg, f"{p}w3", inter, dim, fmt)


def _moe(cfg: ModelConfig, p: str, layer: int) -> Iterator[TensorSpec]:
    yield _plain(f"{p}gate.weight", (cfg.n_routed_experts, cfg.hidden_size), "bf16")
    if cfg.is_hash_layer(layer):
        yield _plain(f"{p}gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), "int32")
    else:
        yield _plain(f"{p}gate.bias", (cfg.n_routed_experts,), "fp32")
    for e in range(cfg.n_routed_experts):
        yield from _expert(cfg, f"{p}experts.{e}.", cfg.expert_dtype)
    yield from _expert(cfg, f"{p}shared_experts.", "fp8")


def _block(cfg: ModelConfig, layer: int) -> Iterator[TensorSpec]:
    """Every tensor of one transformer block (main or MTP), in forward order."""
    p, dim = layer_prefix(cfg, layer), cfg.hidden_size
    yield from _hc(cfg, f"{p}hc_attn")
    yield _plain(f"{p}attn_norm.weight", (dim,), "bf16")
    yield from _attention(cfg, f"{p}attn.", cfg.compress_ratios[layer])
    yield from _hc(cfg, f"{p}hc_ffn")
    yield _plain(f"{p}ffn_norm.weight", (dim,), "bf16")
    yield from _moe(cfg, f"{p}ffn.", layer)


def _mtp(cfg: ModelConfig, layer: int) -> Iterator[TensorSpec]:
    """An MTP layer: the embedding/hidden merge, one block, its own hc_head and final norm."""
    p, dim = layer_prefix(cfg, layer), cfg.hidden_size
    yield _plain(f"{p}enorm.weight", (dim,), "bf16")
    yield _plain(f"{p}hnorm.weight", (dim,), "bf16")
    yield from _linear(cfg, f"{p}e_proj", dim, dim, "fp8")
    yield from _linear(cfg, f"{p}h_proj", dim, dim, "fp8")
    yield from _block(cfg, layer)
    yield _plain(f"{p}norm.weight", (dim,), "bf16")
    yield from _hc(cfg, f"{p}hc_head", head=True)


def _all(cfg: ModelConfig) -> Iterator[TensorSpec]:
    vocab, dim = cfg.vocab_size, cfg.hidden_size
    yield _plain("embed.weight", (vocab, dim), "bf16")
    for layer in range(cfg.num_hidden_layers):
        yield from _block(cfg, layer)
    for layer in range(cfg.num_hidden_layers, cfg.n_layers_total):
        yield from _mtp(cfg, layer)
    yield _plain("norm.weight", (dim,), "bf16")
    yield from _hc(cfg, "hc_head", head=True)
    yield _plain("head.weight", (vocab, dim), "bf16")


def tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the released checkpoint layout for `cfg`, by name, in a stable order."""
    specs: dict[str, TensorSpec] = {}
    for spec in _all(cfg):
        if spec.name in specs:
            raise AssertionError(f"layout lists {spec.name} twice")
        specs[spec.name] = spec
    return specs


# ---- counting ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FormatCount:
    """Totals over the tensors of one storage format."""

    tensors: int = 0
    params: int = 0
    bytes: int = 0

    def __add__(self, other: "FormatCount") -> "FormatCount":
        return FormatCount(self.tensors + other.tensors, self.params + other.params, self.bytes + other.bytes)


def count_by_format(specs: Iterable[TensorSpec]) -> dict[str, FormatCount]:
    """Tensor, parameter and byte totals per format, in FORMATS order (formats with no tensor left out)."""
    totals = {fmt: FormatCount() for fmt in FORMATS}
    for spec in specs:
        totals[spec.format] += FormatCount(1, spec.params, spec.nbytes)
    return {fmt: count for fmt, count in totals.items() if count.tensors}


def parameter_count(specs: Iterable[TensorSpec]) -> int:
    """Model parameters (fp4 weights count two a byte; scales count none)."""
    return sum(spec.params for spec in specs)


def total_bytes(specs: Iterable[TensorSpec]) -> int:
    """Bytes of tensor data (the index's `metadata.total_size`), headers not included."""
    return sum(spec.nbytes for spec in specs)
