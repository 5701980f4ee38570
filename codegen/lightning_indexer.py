"""`dsv4c::lightning_indexer`: the C4 layers' Lightning Indexer selection over packed FP4 keys (codegen/kv_cache.py).

    lightning_indexer(q [B, T, H, d], head_w fp32 [B, T, H], cache uint8 [B, E, R], start int64 [B], ratio, topk,
                      block) -> (ids int64 [B, T, k], valid bool [B, T, k]),   k = min(topk, E)

Rows are `PackedLayout("e2m1", d, d, block, q.dtype)` (codes and e8m0 scales only: 68 bytes at d = 128). Query t of
sequence b sits at p = start[b] + t and scores entry i of its cache as
    score = sum_h head_w[b, t, h] * relu(q[b, t, h] . key_i)      in fp32, -inf unless (i + 1) * ratio <= p + 1;
head_w holds the model's weights_proj output times dim^-0.5 * heads^-0.5 already (the model scales it before the
product, so the op takes it scaled). ids are the k best entries, valid = (score > -inf). q's values must be bf16
values (the indexer's FP4-rounded queries are): the kernels multiply them exactly on bf16 tensor cores.

The value is model/attention.py `indexer_select`'s math on the unpacked keys, `torch.topk` included (ids sorted by
score, its order among ties), so a graph holding the op equals the graph it replaced bit for bit on CPU. On CUDA
tensors the Triton kernels of codegen/kernels/lightning_indexer.py run instead: the same set of ids wherever the
k-th and k+1-th scores differ by more than fp32 summation order, listed in ascending entry order, ties at the k-th
score taken lowest entry first, masked entries (valid False) only where fewer than k are visible. The attention
that reads them (`dsv4c::sparse_decode_attention`, through `where(valid, ids, -1)`) is a softmax over the set: its
result does not depend on their order beyond the order of its own fp32 sums.
"""

from __future__ import annotations

import torch

from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.codegen.kv_cache import PackedLayout, unpack_reference
from dsv4c.model.attention import visible_entries

KERNEL_MODULE = "dsv4c.codegen.kernels.lightning_indexer"


def check(q: torch.Tensor, head_w: torch.Tensor, cache: torch.Tensor, start: torch.Tensor, ratio: int, topk: int,
          block: int) -> PackedLayout:
    """The key layout, after checking shapes and dtypes (host metadata only)."""
    layout = PackedLayout("e2m1", q.shape[-1], q.shape[-1], block, q.dtype)
    ok = (q.dim() == 4 and head_w.dtype == torch.float32 and head_w.shape == q.shape[:3] and cache.dim() == 3
          and cache.dtype == torch.uint8 and cache.shape[0] == q.shape[0] and cache.shape[2] == layout.row_bytes
          and start.dtype == torch.int64 and start.shape == q.shape[:1] and ratio > 0 and topk >= 0)
    if not ok:
        raise ValueError(f"lightning_indexer: q {tuple(q.shape)}, head_w {tuple(head_w.shape)} {head_w.dtype} (need "
                         f"fp32 [B, T, H]), cache {tuple(cache.shape)} {cache.dtype} (need uint8 rows of "
                         f"{layout.row_bytes} B: {layout.describe()}), start {tuple(start.shape)} {start.dtype}, "
                         f"ratio {ratio}, topk {topk}")
    return layout


def scores(q: torch.Tensor, head_w: torch.Tensor, cache: torch.Tensor, start: torch.Tensor, ratio: int,
           block: int) -> torch.Tensor:
    """fp32 [B, T, E]: every entry's score, -inf where not visible (the model's expressions, in its order)."""
    layout = check(q, head_w, cache, start, ratio, 0, block)
    keys = unpack_reference(cache, "e2m1", layout.width, layout.rounded, block, q.dtype)
    positions = start.unsqueeze(1) + torch.arange(q.shape[1], device=q.device)
    logits = torch.einsum("bthd,bsd->bths", q.float(), keys.float()).relu()
    total = (logits * head_w.unsqueeze(-1)).sum(dim=2)
    return total.masked_fill(~visible_entries(positions, cache.shape[1], ratio), float("-inf"))


def reference(q: torch.Tensor, head_w: torch.Tensor, cache: torch.Tensor, start: torch.Tensor, ratio: int, topk: int,
              block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's definition: `torch.topk` of `scores`, valid where the score is finite."""
    check(q, head_w, cache, start, ratio, topk, block)
    top = scores(q, head_w, cache, start, ratio, block).topk(min(topk, cache.shape[1]), dim=-1)
    return top.indices, top.values > float("-inf")


def cuda_impl(q, head_w, cache, start, ratio, topk, block):
    """The Triton kernels (imported when the first CUDA call arrives; the reference where Triton is missing)."""
    kernels = triton_kernels(KERNEL_MODULE, "lightning_indexer")
    if kernels is None:
        return reference(q, head_w, cache, start, ratio, topk, block)
    check(q, head_w, cache, start, ratio, topk, block)
    return kernels.lightning_indexer(q, head_w, cache, start, ratio, topk, block)


lightning_indexer = torch.library.custom_op("dsv4c::lightning_indexer", reference, mutates_args=())


@lightning_indexer.register_fake
def _(q, head_w, cache, start, ratio, topk, block):
    check(q, head_w, cache, start, ratio, topk, block)
    size = (*q.shape[:2], min(topk, cache.shape[1]))
    return q.new_empty(size, dtype=torch.int64), q.new_empty(size, dtype=torch.bool)


lightning_indexer.register_kernel("cuda")(cuda_impl)
