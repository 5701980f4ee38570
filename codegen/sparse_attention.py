"""`dsv4c::sparse_decode_attention`: DeepSeek-V4's decode attention over packed caches (codegen/kv_cache.py).

    sparse_decode_attention(q [B, T, H, D], new uint8 [B, T, R], ring uint8 [B, C, R], cache uint8 [B, E, R],
                            ids int64 [B, T, K], start int64 [B], sink fp32 [H], scale, window, ratio, rounded,
                            block) -> [B, T, H, D] in q's dtype

Rows are `PackedLayout("e4m3", D, rounded, block, q.dtype)`. Query t of sequence b sits at p = start[b] + t and
attends, in one softmax whose denominator also holds `exp(sink[h])`, to:
- its window: positions p - window + 1 .. p that are >= 0, read from `new[b, pos - start]` (this step's rows)
  or `ring[b, pos % C]` (earlier positions);
- with ratio > 0 and K > 0 (C4): the entries `ids[b, t, :]` of `cache` (an id < 0 is no entry);
- with ratio > 0 and K == 0 (C128): every entry i of `cache` with (i + 1) * ratio <= p + 1.
The value is model/attention.py's `attend` on the unpacked rows (scores in fp32, probabilities rounded to q's
dtype before they multiply V). On CUDA tensors the Triton kernels of codegen/kernels/attention.py run instead:
they read the e4m3 codes and scales of each row directly and split the keys over programs (flash-decoding);
they agree with this reference within the bf16 rounding of their probabilities (the online softmax's
unnormalised ones, multiplied with the exact keys on bf16 tensor cores): about 1e-2 relative.
"""

from __future__ import annotations

import torch

from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.codegen.kv_cache import PackedLayout, unpack_reference
from dsv4c.model.attention import attend, ring_timeline, token_windows, visible_entries
from dsv4c.model.numerics import Numerics

KERNEL_MODULE = "dsv4c.codegen.kernels.attention"


def check(q: torch.Tensor, new: torch.Tensor, ring: torch.Tensor, cache: torch.Tensor, ids: torch.Tensor,
          start: torch.Tensor, rounded: int, block: int) -> PackedLayout:
    """The row layout, after checking shapes and dtypes (host metadata only)."""
    layout = PackedLayout("e4m3", q.shape[-1], rounded, block, q.dtype)
    rows = {t.shape[-1] for t in (new, ring, cache)}
    ok = (q.dim() == 4 and rows == {layout.row_bytes} and all(t.dtype == torch.uint8 for t in (new, ring, cache))
          and new.shape[:2] == q.shape[:2] and ids.dtype == torch.int64 and ids.shape[:2] == q.shape[:2]
          and start.shape == q.shape[:1])
    if not ok:
        raise ValueError(f"sparse_decode_attention: q {tuple(q.shape)}, rows {sorted(rows)} (need "
                         f"{layout.row_bytes}: {layout.describe()}), new {tuple(new.shape)}, ids {tuple(ids.shape)} "
                         f"{ids.dtype}, start {tuple(start.shape)}")
    return layout


def reference(q: torch.Tensor, new: torch.Tensor, ring: torch.Tensor, cache: torch.Tensor, ids: torch.Tensor,
              start: torch.Tensor, sink: torch.Tensor, scale: float, window: int, ratio: int, rounded: int,
              block: int) -> torch.Tensor:
    """The op's definition: the model's `attend` over the unpacked key sets."""
    layout = check(q, new, ring, cache, ids, start, rounded, block)
    unpack = lambda rows: unpack_reference(rows, "e4m3", layout.width, rounded, block, q.dtype)  # noqa: E731
    steps = q.shape[1]
    positions = start.unsqueeze(1) + torch.arange(steps, device=q.device)
    keys = token_windows(ring_timeline(unpack(ring), unpack(new), start), window, steps)
    key_pos = positions.unsqueeze(-1) - window + 1 + torch.arange(window, device=q.device)
    key_sets = [(keys, key_pos >= 0, "per_query")]
    if ratio and ids.shape[-1]:
        entries = unpack(cache).unsqueeze(1).expand(-1, steps, -1, -1)
        chosen = entries.gather(2, ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, layout.width))
        key_sets.append((chosen, ids >= 0, "per_query"))
    elif ratio:
        key_sets.append((unpack(cache), visible_entries(positions, cache.shape[1], ratio), "shared"))
    return attend(q, key_sets, sink, scale, Numerics(dtype=q.dtype))


def cuda_impl(q, new, ring, cache, ids, start, sink, scale, window, ratio, rounded, block):
    """The Triton kernels (imported when the first CUDA call arrives; the reference where Triton is missing)."""
    kernels = triton_kernels(KERNEL_MODULE, "sparse_decode_attention")
    if kernels is None:
        return reference(q, new, ring, cache, ids, start, sink, scale, window, ratio, rounded, block)
    check(q, new, ring, cache, ids, start, rounded, block)
    return kernels.sparse_decode_attention(q, new, ring, cache, ids, start, sink, scale, window, ratio, rounded, block)


sparse_decode_attention = torch.library.custom_op("dsv4c::sparse_decode_attention", reference, mutates_args=())


@sparse_decode_attention.register_fake
def _(q, new, ring, cache, ids, start, sink, scale, window, ratio, rounded, block):
    check(q, new, ring, cache, ids, start, rounded, block)
    return torch.empty_like(q)


sparse_decode_attention.register_kernel("cuda")(cuda_impl)
