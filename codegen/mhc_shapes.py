"""Leading-dim handling shared by every implementation of the mHC ops: they accept `[..., n, D]` streams
and compute on `[N, n, D]` tokens."""

from __future__ import annotations

import torch


def tokens(streams: torch.Tensor) -> tuple[torch.Size, torch.Tensor]:
    """(leading dims, streams flattened to `[N, n, D]`)."""
    if streams.dim() < 2:
        raise ValueError(f"mHC streams must be [..., n, D], got shape {tuple(streams.shape)}")
    return streams.shape[:-2], streams.reshape(-1, *streams.shape[-2:])


def flat_post_inputs(block_out, streams, post, comb):
    """(leading dims, (block_out `[N, D]`, streams `[N, n, D]`, post `[N, n]`, comb `[N, n, n]`))."""
    lead, flat = tokens(streams)
    n = flat.shape[1]
    return lead, (block_out.reshape(-1, block_out.shape[-1]), flat, post.reshape(-1, n), comb.reshape(-1, n, n))


def pre_outputs(lead: torch.Size, normed, post, comb):
    """A pre's (normed, post, comb) on `N` tokens reshaped back to the leading dims."""
    n = post.shape[-1]
    return normed.reshape(*lead, normed.shape[-1]), post.reshape(*lead, n), comb.reshape(*lead, n, n)
