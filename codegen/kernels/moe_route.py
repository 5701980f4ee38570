"""The routing of `dsv4c::moe_fp4` in Triton: router logits, score function, selection and weights, two launches.

The PyTorch twin is codegen/moe_routing.py `route` (the model's own ops); tests/test_moe_fp4.py runs these
kernels under Triton's interpreter against it, alone and inside the whole op. For x [N, D] and router [E, D]:

(1) `_router_kernel`, grid (cdiv(N, block_m), cdiv(E, router_block_e), router_splits): partial logits
    [split, token, expert] = the router rows times the tokens over the split's slice of D, fp32 sums of exact
    products (bf16 x bf16 products are exact in fp32; fp32 activations multiply as fp32 `ieee` dots); the
    tokens are the dot's N side (swap AB), so a decode step pads to block_m rows, not 64. The router is read
    in its own dtype (bf16 in the checkpoint), never as a widened copy.
(2) `_route_kernel`, grid (N,): per token, the partials summed in split order, the scores (sqrt(softplus),
    sigmoid or softmax over E, in fp32), the selection (score-routed: the top_k of scores + bias, largest
    first, the lower expert id first among equal values, a NaN taken as larger than any number as torch.topk
    does; hash: the table's row of the token id), the selected scores normalised and scaled: ids int32 [N, k]
    and weights fp32 [N, k].
Every reduction of one token's values runs in an order fixed by the layer's shape, never by N (see
codegen/kernels/moe_fp4_launch.py), so a token's ids and weights do not depend on the step it is in. Against
the reference the logits differ by fp32 summation order and the scores by the last bits of exp / log (a
few ulps), so the selection equals torch.topk's wherever the k-th and the (k+1)-th biased scores are not that
close; nothing leaves the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.moe_fp4_launch import K_COLUMNS, MoeFp4Launch
from dsv4c.codegen.kernels.pdl import after_predecessor, launch_options
from dsv4c.codegen.moe_routing import Routing

BLOCK_K = tl.constexpr(K_COLUMNS)  # columns of D a router loop step covers
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # F.softplus's default: x itself above it


@triton.jit
def _router_kernel(x_ptr, router_ptr, part_ptr, N, D, E, BLOCKS_PER_SPLIT, BLOCK_T: tl.constexpr,
                   BLOCK_E: tl.constexpr, PRODUCT: tl.constexpr, PDL: tl.constexpr):
    """part[split, tokens, experts] = x[tokens] @ router[experts].T over the split's 128-column blocks."""
    after_predecessor(PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(2)
    t_ok, e_ok = t < N, e < E
    kb_stop = tl.minimum((split + 1) * BLOCKS_PER_SPLIT, D // BLOCK_K)
    acc = tl.zeros([BLOCK_E, BLOCK_T], dtype=tl.float32)
    for kb in range(split * BLOCKS_PER_SPLIT, kb_stop):
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        w = tl.load(router_ptr + e.to(tl.int64)[:, None] * D + k[None, :], mask=e_ok[:, None], other=0.0)
        a = tl.load(x_ptr + t.to(tl.int64)[:, None] * D + k[None, :], mask=t_ok[:, None], other=0.0)
        if PRODUCT == "bf16":
            acc += tl.dot(w.to(tl.bfloat16), tl.trans(a.to(tl.bfloat16)))
        else:
            acc += tl.dot(w.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision="ieee")
    out = part_ptr + (split * N + t.to(tl.int64))[None, :] * E + e[:, None]
    tl.store(out, acc, mask=e_ok[:, None] & t_ok[None, :])


@triton.jit
def _softplus(x):
    """F.softplus (beta 1, threshold 20): x above the threshold, else log1p(exp(x)), log1p to a few ulps as
    log(u) * e / (u - 1) with u = 1 + e (e itself where u rounds to 1)."""
    e = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(x > SOFTPLUS_THRESHOLD, x, log1p)


@triton.jit
def _scores(logits, ok, SCORING: tl.constexpr):
    """The score function of model/layers.py `router_scores` over one token's logits (lanes past E: `ok`
    false; their scores are not read)."""
    if SCORING == "sqrtsoftplus":
        return tl.sqrt_rn(_softplus(logits))
    elif SCORING == "sigmoid":
        return tl.sigmoid(logits)
    else:
        z = tl.where(ok, logits, float("-inf"))
        p = tl.exp(z - tl.max(z, axis=0))
        return p / tl.sum(p, axis=0)


@triton.jit
def _top_k(biased, e, slots, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """The TOP_K lanes of largest `biased` (lanes past E at -inf), largest first, lower lane first among
    equal values, NaN above every number (torch.topk's order): int32 [BLOCK_K] (0 past TOP_K)."""
    rest = tl.where(biased != biased, float("inf"), biased)
    chosen = tl.zeros_like(slots)
    for j in tl.static_range(TOP_K):
        best = tl.max(rest, axis=0)
        lane = tl.min(tl.where(rest == best, e, BLOCK_E), axis=0)
        chosen = tl.where(slots == j, lane, chosen)
        rest = tl.where(e == lane, float("-inf"), rest)
    return chosen


@triton.jit
def _route_kernel(part_ptr, bias_ptr, table_ptr, tokens_ptr, ids_ptr, weights_ptr, N, E, scale,
                  SPLITS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                  SCORING: tl.constexpr, HASH: tl.constexpr, NORMALIZE: tl.constexpr, PDL: tl.constexpr):
    """ids[token], weights[token] of one token from its partial logits (see the module docstring)."""
    after_predecessor(PDL)
    token = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    logits = tl.zeros([BLOCK_E], dtype=tl.float32)
    for split in tl.static_range(SPLITS):  # unrolled: every split's load in flight at once, added in order
        logits += tl.load(part_ptr + (split * N + token).to(tl.int64) * E + e, mask=ok, other=0.0)
    scores = _scores(logits, ok, SCORING)
    slots = tl.arange(0, BLOCK_K)
    if HASH:
        row = tl.load(tokens_ptr + token).to(tl.int64)
        chosen = tl.load(table_ptr + row * TOP_K + slots, mask=slots < TOP_K, other=0).to(tl.int32)
    else:
        bias = tl.load(bias_ptr + e, mask=ok, other=0.0).to(tl.float32)
        chosen = _top_k(tl.where(ok, scores + bias, float("-inf")), e, slots, TOP_K, BLOCK_E)
    picked = tl.sum(tl.where(e[None, :] == chosen[:, None], scores[None, :], 0.0), axis=1)
    if NORMALIZE:
        picked = picked / tl.sum(tl.where(slots < TOP_K, picked, 0.0), axis=0)
    out = token.to(tl.int64) * TOP_K + slots
    tl.store(ids_ptr + out, chosen, mask=slots < TOP_K)
    tl.store(weights_ptr + out, picked * scale, mask=slots < TOP_K)


def route(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
          tokens: torch.Tensor | None, routing: Routing, launch: MoeFp4Launch) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32 [N, k], weights fp32 [N, k]) for x [N, D] (D a multiple of 128; checked by the caller with
    codegen/moe_routing.py `check`), router [E, D], the bias [E] or the table [V, k] and token ids."""
    (n, d), experts, k = x.shape, router.shape[0], routing.top_k
    ids = torch.empty((n, k), dtype=torch.int32, device=x.device)
    weights = torch.empty((n, k), dtype=torch.float32, device=x.device)
    if n == 0:
        return ids, weights
    product = "bf16" if launch.product == "bf16" and router.dtype == x.dtype == torch.bfloat16 else "ieee"
    pdl = launch.pdl and x.is_cuda
    part = torch.empty((launch.router_splits, n, experts), dtype=torch.float32, device=x.device)
    _router_kernel[(triton.cdiv(n, launch.block_m), triton.cdiv(experts, launch.router_block_e),
                    launch.router_splits)](
        x, router.contiguous(), part, n, d, experts, triton.cdiv(d // K_COLUMNS, launch.router_splits),
        BLOCK_T=launch.block_m, BLOCK_E=launch.router_block_e, PRODUCT=product, PDL=pdl, num_warps=launch.num_warps,
        **launch_options(pdl))
    hashed = table is not None
    _route_kernel[(n,)](
        part, bias.contiguous() if bias is not None else part, table.contiguous() if hashed else ids,
        tokens.reshape(-1).contiguous() if hashed else ids, ids, weights, n, experts, float(routing.scale),
        SPLITS=launch.router_splits, TOP_K=k, BLOCK_E=triton.next_power_of_2(experts),
        BLOCK_K=triton.next_power_of_2(k), SCORING=routing.scoring, HASH=hashed, NORMALIZE=routing.normalize,
        PDL=pdl, num_warps=4, **launch_options(pdl))
    return ids, weights
