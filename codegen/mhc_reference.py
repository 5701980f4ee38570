"""PyTorch twins of the fused mHC kernels (codegen/kernels/mhc.py): the same math as the model, fp32 inside.

Every function takes tokens flattened: `streams [N, n, D]` for any N. They call compiler/layers.py's
`hc_pre`, `hc_post`, `hc_head` and `rms_norm` (through a small config holding the four mHC numbers), so
the fused ops compute exactly what the model computes at a layer boundary:

    hc_pre       streams -> (RMSNorm(sum_j pre[j] * streams[j]), post, comb)        before a sub-layer
    hc_post      (block_out, streams, post, comb) -> post[k] * out + sum_j comb[j,k] * streams[j]
    hc_post_pre  hc_post, then hc_pre of the next sub-layer on the new streams      between sub-layers
    hc_post_head hc_post, then hc_head                                              after the last layer
    hc_head      streams -> RMSNorm(sum_j pre[j] * streams[j])                      before the LM head

Shapes: `fn [(2+n)*n, n*D]` fp32 (rows: n pre, n post, n*n comb), `base [(2+n)*n]`, `scale [3]`; for the
head `fn [n, n*D]`, `base [n]`, `scale [1]`. `norm_weight [D]` is the RMSNorm that follows the collapse
(attn_norm / ffn_norm / the final norm). Outputs: block inputs and streams in streams' dtype, post `[N, n]`
and comb `[N, n, n]` in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4c.model import layers


@dataclass(frozen=True)
class _HcNumbers:
    """The fields of ModelConfig that compiler/layers.py's mHC functions read."""

    hc_mult: int
    rms_norm_eps: float
    hc_eps: float
    hc_sinkhorn_iters: int


def _numbers(streams: torch.Tensor, rms_eps: float, hc_eps: float, iters: int) -> _HcNumbers:
    if streams.dim() != 3:
        raise ValueError(f"streams must be [N, n, D], got shape {tuple(streams.shape)}")
    return _HcNumbers(streams.shape[1], float(rms_eps), float(hc_eps), int(iters))


def hc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           norm_weight: torch.Tensor, rms_eps: float, hc_eps: float,
           iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed `[N, D]` in streams' dtype, post `[N, n]` fp32, comb `[N, n, n]` fp32)."""
    cfg = _numbers(streams, rms_eps, hc_eps, iters)
    block_in, post, comb = layers.hc_pre(streams, fn, base, scale, cfg)
    return layers.rms_norm(block_in, norm_weight, rms_eps), post, comb


def hc_post(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor) -> torch.Tensor:
    """New streams `[N, n, D]` in streams' dtype: `post[k] * out + sum_j comb[j, k] * streams[j]`."""
    return layers.hc_post(block_out, streams, post, comb)


def hc_post_pre(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
                rms_eps: float, hc_eps: float,
                iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(new streams, normed, post of the next sub-layer, comb of the next sub-layer)."""
    new_streams = hc_post(block_out, streams, post, comb)
    return (new_streams, *hc_pre(new_streams, fn, base, scale, norm_weight, rms_eps, hc_eps, iters))


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            norm_weight: torch.Tensor, rms_eps: float, hc_eps: float) -> torch.Tensor:
    """normed `[N, D]` in streams' dtype: the final collapse of the streams and the final RMSNorm."""
    cfg = _numbers(streams, rms_eps, hc_eps, 1)
    return layers.rms_norm(layers.hc_head(streams, fn, base, scale, cfg), norm_weight, rms_eps)


def hc_post_head(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                 fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
                 rms_eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(new streams, normed): the last layer's hc_post, then hc_head on its result."""
    new_streams = hc_post(block_out, streams, post, comb)
    return new_streams, hc_head(new_streams, fn, base, scale, norm_weight, rms_eps, hc_eps)
