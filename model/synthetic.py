"""Seeded random weights with realistic scales, in the released checkpoint layout, identical on any device.

Each tensor draws from its own stream of `counter_random` (key `tensor_seed(seed, name)`), whose values
depend only on the element's index: any tensor, or any block of its rows, can be generated alone, on the
CPU or a GPU, with the same bits. Everything after the draw is IEEE-exact or correctly rounded elementwise
arithmetic (one rounded multiply or add, then `quant`'s quantisers: amax, division of fp32 values, frexp,
exp2 of integers, comparisons, integer packing), so CPU and CUDA agree bit for bit; memory stays bounded
by one block of rows. Values are chosen so a forward pass stays numerically healthy at every size
(`randn` below is `counter_random.normal`, mean 0 and standard deviation 1 within 4e-6, range +-5.98):
- linear weights `[out, in]`: randn / sqrt(in), so a projection keeps its input's RMS; then quantised to
  the release format (`quant.quantize_fp8_weight` / `quantize_fp4_weight`) or cast to bf16;
- embeddings randn; norm weights 1 + 0.05 randn;
- mHC: `*_fn [rows, n*D]` randn / sqrt(n*D) so the normalised mixes are O(1), `*_base` 0.1 randn,
  `*_scale` uniform on [0.5, 1.5] (0.5 plus a multiple of 2^-24 in [0, 1), rounded to fp32);
- `attn_sink` randn; compressor `ape` 0.1 randn; router `gate.bias` 0.01 randn;
- `gate.tid2eid`: for every token, the `num_experts_per_tok` experts of largest random key, keys
  distinct by construction (a random word times the expert count plus the expert id), so the choice
  has no ties: distinct expert ids drawn uniformly.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Iterator

import torch

from dsv4c.model import counter_random, quant
from dsv4c.model.config import ModelConfig
from dsv4c.model.layout import FP8_BLOCK, TensorSpec, scale_name, tensor_specs

# Elements drawn at once by default: on the CPU a block that stays in cache, on a GPU enough to fill it.
CPU_CHUNK_ELEMENTS = 2**16
GPU_CHUNK_ELEMENTS = 2**24


def tensor_seed(seed: int, name: str) -> int:
    """The stream key of tensor `name` (stable across runs, platforms and Python hash seeds)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generation_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device, checked usable here; a ValueError that says why otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: got {device!r}; allowed: cpu, cuda, cuda:N") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ValueError(f"device: got {device!r}; allowed: cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device: got {device!r}, but this torch ({torch.__version__}) sees no CUDA GPU; use cpu")
    if (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device: got {device!r}; this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return parsed


def default_chunk_elements(device: torch.device | str) -> int:
    return CPU_CHUNK_ELEMENTS if torch.device(device).type == "cpu" else GPU_CHUNK_ELEMENTS


# ---- one block of rows ---------------------------------------------------------------------------
def row_block(spec: TensorSpec) -> int:
    """Rows that must be generated together: an FP8 weight's 128-row scale blocks, else one row."""
    return FP8_BLOCK if spec.format == "fp8" else 1


def _values(spec: TensorSpec, key: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows [start, stop) of a float tensor's unquantised fp32 values (not a scale), in its logical shape."""
    name, shape = spec.name, spec.logical_shape
    row = math.prod(shape[1:])
    rows = (stop - start, *shape[1:])
    if name.endswith("_scale"):
        return (0.5 + counter_random.uniform(key, start * row, (stop - start) * row, device)).view(rows)
    randn = counter_random.normal(key, start * row, (stop - start) * row, device).view(rows)
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * randn
    if name.endswith("_fn"):
        return randn * shape[-1] ** -0.5
    if name.endswith("_base") or name.endswith(".ape"):
        return 0.1 * randn
    if name.endswith("gate.bias"):
        return 0.01 * randn
    if name.endswith("attn_sink") or name == "embed.weight":
        return randn
    if len(shape) == 2:
        return randn * shape[-1] ** -0.5
    raise AssertionError(f"{name}: no synthetic distribution for this tensor")


def _expert_ids(cfg: ModelConfig, key: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows [start, stop) of a hash layer's tid2eid: each token's top-k experts by distinct random keys."""
    experts = cfg.n_routed_experts
    words = counter_random.words(key, start * experts, (stop - start) * experts, device).view(-1, experts)
    keys = words * experts + torch.arange(experts, device=device)
    return keys.topk(cfg.num_experts_per_tok, dim=-1).indices.to(torch.int32)


def synthesize_rows(cfg: ModelConfig, spec: TensorSpec, seed: int, start: int, stop: int,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Rows [start, stop) of the stored form of `spec` (a non-scale tensor), on `device`: {name: rows},
    plus {name.scale: the scale rows of those rows} for a quantised weight. `start` and, unless it is the
    last row, `stop` must be multiples of `row_block(spec)`; the rows equal those of the whole tensor."""
    rows, block = spec.shape[0], row_block(spec)
    if spec.format == "e8m0" or not 0 <= start < stop <= rows or start % block or (stop % block and stop != rows):
        raise ValueError(f"{spec.name}: cannot generate rows [{start}, {stop}) of a {spec.format} tensor "
                         f"of {rows} rows in blocks of {block}")
    device = torch.device(device)
    key = tensor_seed(seed, spec.name)
    if spec.format == "int32":
        return {spec.name: _expert_ids(cfg, key, start, stop, device)}
    values = _values(spec, key, start, stop, device)
    if spec.format == "fp8":
        weight, scale = quant.quantize_fp8_weight(values)
        return {spec.name: weight, scale_name(spec.name): scale}
    if spec.format == "fp4":
        weight, scale = quant.quantize_fp4_weight(values)
        return {spec.name: weight, scale_name(spec.name): scale}
    return {spec.name: values.to(spec.dtype)}


def row_chunks(spec: TensorSpec, chunk_elements: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering `spec`, each of at most `chunk_elements` values (logical
    elements) or, where one row block is larger, of one row block."""
    rows, block = spec.shape[0], row_block(spec)
    step = max(block, chunk_elements // math.prod(spec.logical_shape[1:]) // block * block)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


# ---- whole tensors and checkpoint streams --------------------------------------------------------
def synthesize(cfg: ModelConfig, spec: TensorSpec, seed: int = 0,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The stored form of `spec` (a non-scale tensor): {name: tensor}, plus {name.scale: scales} for a
    quantised weight."""
    return synthesize_rows(cfg, spec, seed, 0, spec.shape[0], device)


def _weight_of(scale: str) -> str:
    return scale[: -len(".scale")] + ".weight"


def synthetic_tensors(cfg: ModelConfig, seed: int = 0,
                      names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for `names` (default: every tensor of `tensor_specs(cfg)`, in layout order).

    A `.scale` listed right after its `.weight` is taken from the same generation; one asked for alone is
    generated with its weight, so the result never depends on which names are asked for.
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


def synthetic_pieces(cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu",
                     chunk_elements: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `tensor_specs(cfg)` in layout order, as (name, CPU tensor of consecutive rows):
    generated on `device` in blocks of about `chunk_elements` values (default: `default_chunk_elements`),
    a quantised weight's blocks followed by those of its scale. The rows of a tensor's pieces, concatenated,
    are `synthetic_tensors`'s tensor, whatever the device and the chunking."""
    device = generation_device(device)
    chunk = default_chunk_elements(device) if chunk_elements is None else chunk_elements
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk_elements: got {chunk_elements!r}; allowed: a positive integer")
    for spec in tensor_specs(cfg).values():
        if spec.format == "e8m0":
            continue  # generated with its weight, which the layout lists just before it
        scales = []
        for start, stop in row_chunks(spec, chunk):
            rows = synthesize_rows(cfg, spec, seed, start, stop, device)
            yield spec.name, rows.pop(spec.name).cpu()
            scales.extend(rows.items())
        for name, scale in scales:
            yield name, scale.cpu()
