"""mHC as section 2 of the architecture doc writes it, in float64: the reference every mHC implementation (the
model's functions, the fused ops' PyTorch twins, the Triton kernels) is checked against; and inputs on which
the Sinkhorn iteration count shows.

With random inputs the comb logits are close to doubly stochastic after a few iterations, so 19, 20 and 21
iterations agree to ~1e-9 and an off-by-one passes any fp32 tolerance. `slow_sinkhorn_inputs` gives comb
logits of -14 below the diagonal and ~0 on and above it (plus noise): a matrix near the triangular pattern,
which has no doubly stochastic scaling, so Sinkhorn is still moving at iteration 20 (19 or 21 iterations
differ from 20 by ~3e-3 relative; `test_sinkhorn.py` asserts it).
"""

from __future__ import annotations

import torch

RMS_EPS, HC_EPS, ITERS = 1e-6, 1e-6, 20
LOWER_TRIANGLE_LOGIT = -14.0


def mixes(streams: torch.Tensor, fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """Step 1: `(x @ fn.T) * rsqrt(mean(x^2) + rms_eps)`, x the flattened streams."""
    x = streams.double().flatten(-2)
    return (x @ fn.double().T) * torch.rsqrt(x.square().mean(-1, keepdim=True) + rms_eps)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Step 3: `c = softmax(c, -1) + eps; c = c / (c.sum(-2) + eps)`, then iters - 1 times a row
    normalisation followed by a column normalisation, each `c / (sum + eps)`."""
    c = logits.double().softmax(-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def comb_logits(streams, fn, base, scale, rms_eps: float) -> torch.Tensor:
    """Step 2's `c = mixes[2n:].view(n, n) * scale[2] + base[2n:].view(n, n)`."""
    n = streams.shape[-2]
    m = mixes(streams, fn, rms_eps)
    return m[..., 2 * n:].unflatten(-1, (n, n)) * scale.double()[2] + base.double()[2 * n:].view(n, n)


def hc_pre(streams, fn, base, scale, rms_eps: float, hc_eps: float, iters: int):
    """(block input `sum_j pre[j] * streams[j]`, post, comb) of steps 1-4, before the sub-layer's RMSNorm."""
    n = streams.shape[-2]
    m, scale, base = mixes(streams, fn, rms_eps), scale.double(), base.double()
    pre = torch.sigmoid(m[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = sinkhorn(comb_logits(streams, fn, base, scale, rms_eps), iters, hc_eps)
    return (pre.unsqueeze(-1) * streams.double()).sum(-2), post, comb


def hc_post(block_out, streams, post, comb) -> torch.Tensor:
    """Step 5: `new[k] = post[k] * f(a) + sum_j comb[j, k] * streams[j]`."""
    mixed = torch.einsum("...jk,...jd->...kd", comb.double(), streams.double())
    return post.double().unsqueeze(-1) * block_out.double().unsqueeze(-2) + mixed


def hc_head(streams, fn, base, scale, rms_eps: float, hc_eps: float) -> torch.Tensor:
    """`sum_j (sigmoid(mixes * scale + base) + hc_eps)[j] * streams[j]`."""
    pre = torch.sigmoid(mixes(streams, fn, rms_eps) * scale.double()[0] + base.double()) + hc_eps
    return (pre.unsqueeze(-1) * streams.double()).sum(-2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.double()


def slow_sinkhorn_inputs(gen: torch.Generator, lead: tuple[int, ...], n: int, hidden: int) -> dict[str, torch.Tensor]:
    """fp32 streams `[*lead, n, hidden]` and mHC parameters whose comb logits are far from doubly stochastic
    (see the module doc); mixes ~ N(0, 1), so pre and post are ordinary."""
    rows = (2 + n) * n
    lower = torch.ones(n, n).tril(-1).bool()
    base = torch.randn(rows, generator=gen) * 0.5
    base[2 * n:] = torch.where(lower, LOWER_TRIANGLE_LOGIT, 0.0).flatten()
    return {
        "streams": torch.randn(*lead, n, hidden, generator=gen),
        "fn": torch.randn(rows, n * hidden, generator=gen) / (n * hidden) ** 0.5,
        "base": base,
        "scale": torch.tensor([0.5, 0.5, 0.3]),
        "norm_weight": torch.rand(hidden, generator=gen) + 0.5,
    }
