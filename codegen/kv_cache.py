"""Physically compressed caches: a row of codes and scales in place of a row of rounded values.

The model rounds what it caches (model/step.py `cache_roundings`): the first `rounded` dims of a row to FP8 e4m3
or FP4 e2m1 with one power-of-two (e8m0) scale per `block` dims, the rest (the RoPE dims of the main KV) as they
are. A `PackedLayout` stores such a row as bytes, `[codes | raw | scales | pad]`:
- codes: `rounded` e4m3 bytes, or `rounded / 2` bytes of two e2m1 codes (the low nibble the even dim);
- raw: the other `width - rounded` dims in the cache's dtype (bf16: 2 bytes each), at an aligned offset;
- scales: `rounded / block` e8m0 bytes (2^(b - 127));
- pad: zeros up to a multiple of the raw dtype's size, so every row's raw part stays aligned.
Main KV at Flash size: 448 + 128 + 7 + 1 = 584 bytes a token (1,024 in bf16); indexer key: 64 + 4 = 68 (256).

Ops (reference implementations here; importing this module registers them, codegen/ops.py does):
- `dsv4c::kv_pack(x [..., width], format, rounded, block) -> uint8 [..., row_bytes]`: quantise as
  model/quant.py's `fake_quant_fp8` / `fake_quant_fp4` do (same scale rule, same rounding) and store.
- `dsv4c::kv_unpack(packed [..., row_bytes], format, width, rounded, block, dtype) -> [..., width] dtype`: the
  values, computed exactly as the fake quantisation computes them (`code * scale` in fp32, cast to dtype).
So `kv_unpack(kv_pack(x))` equals the model's rounding of x bit for bit (a block holding a NaN or an inf is
stored with the NaN scale byte 255 and unpacks to NaN, as the rounding makes it); and packing values the rounding already
produced gives them back bit for bit (a rounded block re-quantises with a scale no larger than its own, by which
its codes scale up exactly: the e4m3 and e2m1 grids are closed under doubling below their maximum).
Nothing here synchronises with the host, so both ops run inside CUDA graphs.
"""

from __future__ import annotations

import dataclasses

import torch

from dsv4c.model import quant

FORMATS = ("e4m3", "e2m1")
_FORMAT_MAX = {"e4m3": quant.FP8_MAX, "e2m1": quant.FP4_MAX}
_AMAX_FLOOR = {"e4m3": quant.FP8_AMAX_FLOOR, "e2m1": quant.FP4_AMAX_FLOOR}
RAW_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """The byte layout of one cache row of `width` values in `dtype`, the first `rounded` stored as `format` codes
    with a scale per `block`."""

    format: str
    width: int
    rounded: int
    block: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        ok = (self.format in FORMATS and self.dtype in RAW_DTYPES and 0 < self.rounded <= self.width
              and self.block > 0 and self.rounded % self.block == 0 and self.code_bytes % self.dtype.itemsize == 0)
        if not ok or (self.format == "e2m1" and self.block % 2):
            raise ValueError(f"packed layout: {self} is not storable (format in {FORMATS}, dtype in {RAW_DTYPES}, "
                             f"rounded a multiple of block, codes a whole number of raw elements)")

    @property
    def code_bytes(self) -> int:
        return self.rounded if self.format == "e4m3" else self.rounded // 2

    @property
    def raw_bytes(self) -> int:
        return (self.width - self.rounded) * self.dtype.itemsize

    @property
    def scale_bytes(self) -> int:
        return self.rounded // self.block

    @property
    def scale_offset(self) -> int:
        return self.code_bytes + self.raw_bytes

    @property
    def row_bytes(self) -> int:
        used = self.scale_offset + self.scale_bytes
        align = self.dtype.itemsize if self.raw_bytes else 1
        return -(-used // align) * align

    def describe(self) -> str:
        """One line: e.g. `e4m3[448]/64 + bfloat16[64] = 584 B (1024 B raw)`."""
        raw = f" + {str(self.dtype).removeprefix('torch.')}[{self.width - self.rounded}]" if self.raw_bytes else ""
        return (f"{self.format}[{self.rounded}]/{self.block}{raw} = {self.row_bytes} B "
                f"({self.width * self.dtype.itemsize} B raw)")


def _scales(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """The power-of-two scale of each block of fp32 `blocks [..., n, block]`: `[..., n, 1]`."""
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(_AMAX_FLOOR[fmt])
    return quant.power_of_two_scale(amax, _FORMAT_MAX[fmt])


def _scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes of positive powers of two (fp32), without a host check: 127 + log2(scale); 255 (e8m0's NaN)
    for the NaN or inf scale of a block holding a NaN or an inf, so the whole block unpacks to NaN, as the
    model's rounding makes it."""
    _, exponent = torch.frexp(scale)
    return torch.where(scale.isfinite(), exponent - 1 + 127, 255).clamp(0, 255).to(torch.uint8)


def pack_reference(x: torch.Tensor, format: str, rounded: int, block: int) -> torch.Tensor:
    """x `[..., width]` -> uint8 `[..., row_bytes]` in `PackedLayout(format, width, rounded, block, x.dtype)`."""
    layout = PackedLayout(format, x.shape[-1], rounded, block, x.dtype)
    blocks = x[..., :rounded].to(torch.float32).unflatten(-1, (-1, block))
    scale = _scales(blocks, format)
    scaled = blocks / scale
    if format == "e4m3":
        codes = scaled.clamp(-quant.FP8_MAX, quant.FP8_MAX).to(torch.float8_e4m3fn).flatten(-2).view(torch.uint8)
    else:
        codes = quant.pack_fp4(quant.float_to_e2m1(scaled).flatten(-2)).view(torch.uint8)
    raw = x[..., rounded:].contiguous().view(torch.uint8)
    pad = layout.row_bytes - layout.scale_offset - layout.scale_bytes
    zeros = codes.new_zeros((*codes.shape[:-1], pad))
    return torch.cat((codes, raw, _scale_bytes(scale).flatten(-2), zeros), dim=-1)


def unpack_reference(packed: torch.Tensor, format: str, width: int, rounded: int, block: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """uint8 `[..., row_bytes]` -> the row's values `[..., width]` in dtype (the model's rounded values)."""
    layout = PackedLayout(format, width, rounded, block, dtype)
    codes = packed[..., :layout.code_bytes].contiguous()
    if format == "e4m3":
        values = codes.view(torch.float8_e4m3fn).to(torch.float32)
    else:
        values = quant.e2m1_to_float(quant.unpack_fp4(codes))
    scale = quant.e8m0_to_float(packed[..., layout.scale_offset:layout.scale_offset + layout.scale_bytes])
    rounded_values = (values.unflatten(-1, (-1, block)) * scale.unsqueeze(-1)).flatten(-2).to(dtype)
    raw = packed[..., layout.code_bytes:layout.scale_offset].contiguous().view(dtype)
    return torch.cat((rounded_values, raw), dim=-1)


kv_pack = torch.library.custom_op("dsv4c::kv_pack", pack_reference, mutates_args=())
kv_unpack = torch.library.custom_op("dsv4c::kv_unpack", unpack_reference, mutates_args=())


@kv_pack.register_fake
def _(x, format, rounded, block):
    layout = PackedLayout(format, x.shape[-1], rounded, block, x.dtype)
    return x.new_empty((*x.shape[:-1], layout.row_bytes), dtype=torch.uint8)


@kv_unpack.register_fake
def _(packed, format, width, rounded, block, dtype):
    layout = PackedLayout(format, width, rounded, block, dtype)
    if packed.dtype != torch.uint8 or packed.shape[-1] != layout.row_bytes:
        raise ValueError(f"kv_unpack: packed {tuple(packed.shape)} {packed.dtype} is not uint8 rows of "
                         f"{layout.row_bytes} bytes ({layout.describe()})")
    return packed.new_empty((*packed.shape[:-1], width), dtype=dtype)
