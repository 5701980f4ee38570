"""Token sampling: greedy, temperature and top-p, and the acceptance rule of speculative sampling.

`target_probs` turns logits into the distribution a token is drawn from; greedy is temperature 0.
Speculative verification compares the main model's distribution p with the draft's q: a draft token d
is accepted with probability min(1, p(d) / q(d)), and a rejection draws from max(0, p - q) normalised,
which leaves the output distribution exactly p (greedy: accept iff d is p's argmax).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_p keeps the smallest set of tokens whose mass reaches top_p."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature: got {self.temperature}; allowed: >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: got {self.top_p}; allowed: 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Distribution `[..., V]` (fp32) a token is drawn from; greedy gives a one-hot on the argmax."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = (logits / params.temperature).softmax(-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of `probs` `[N, V]`."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Token ids `[N]` from logits `[N, V]`."""
    if params.greedy:
        return logits.float().argmax(-1)
    return draw(target_probs(logits, params), generator)


def verify_draft(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted `[N]` bool, replacement token `[N]` for rejected rows) of drafts drawn from q.

    p, q: `[N, V]` distributions from `target_probs`; a row whose q is not a distribution (the draft had
    NaN or inf logits) is always rejected and its replacement drawn from p.
    """
    rows = torch.arange(draft.shape[0], device=draft.device)
    p_d, q_d = p[rows, draft], q[rows, draft]
    usable = torch.isfinite(q).all(-1) & (q_d > 0)
    if params.greedy:
        accepted = usable & (p_d > 0)
        return accepted, p.argmax(-1)
    u = torch.rand(draft.shape, generator=generator, device=draft.device)
    accepted = usable & (u * q_d <= p_d)
    residual = torch.where(usable.unsqueeze(-1), (p - torch.nan_to_num(q)).clamp_min(0), p)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    return accepted, draw(residual / residual.sum(-1, keepdim=True), generator)
