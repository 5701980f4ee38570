"""The bench's correctness check: two runners' next-token logits compared step by step from identical token
histories.

Both runners decode the same rows for a few steps, the second fed the first's greedy tokens (teacher forcing),
so that every step of both starts from the same tokens and a difference at one step does not send the two
down different paths. Two correct faithful implementations still differ: FP8 activation rounding is chaotic
(a change in the last bits of an input moves the logits by a few hundredths), and a random model's head has
near ties, where either token is right. So a selection is checked only where the reference's top-1 logit leads
its runner-up by more than `CLEAR_MARGIN`: there the runner's greedy token must be the reference's. The
largest and the normwise relative logit difference are reported beside the count; NaN never passes.
"""

from __future__ import annotations

import dataclasses

import torch

CLEAR_MARGIN = 0.25  # logits: several times the few hundredths that faithful FP8 rounding moves a logit by


@dataclasses.dataclass(frozen=True)
class TokenCheck:
    """clear: selections (step, row) whose reference top-1 leads by more than CLEAR_MARGIN; agree: how many of
    them the runner's greedy token matches; near_ties: the other selections (not checked);
    max_abs_diff / rel_diff: the largest and the normwise relative difference of the logits (NaN where either
    side has a NaN)."""

    clear: int
    agree: int
    near_ties: int
    max_abs_diff: float
    rel_diff: float

    @property
    def passed(self) -> bool | None:
        """True when every clear selection agrees and no logit is NaN; None when no selection is clear (the
        check cannot tell)."""
        if self.max_abs_diff != self.max_abs_diff:  # NaN
            return False
        if self.clear == 0:
            return None
        return self.agree == self.clear

    def summary(self) -> str:
        return (f"{self.agree}/{self.clear} clear selections agree, {self.near_ties} near ties; logits differ by "
                f"at most {self.max_abs_diff:.3g} (relative {self.rel_diff:.2e})")


def check_logits(ours: torch.Tensor, reference: torch.Tensor) -> TokenCheck:
    """Compare logits [steps, rows, vocab] of a runner and of the reference, both computed from the same token
    histories."""
    if ours.shape != reference.shape:
        raise ValueError(f"token check: logits {tuple(ours.shape)} against the reference's {tuple(reference.shape)}")
    ours, reference = ours.double(), reference.double()
    top = reference.topk(2, dim=-1).values
    clear = (top[..., 0] - top[..., 1]) > CLEAR_MARGIN
    agree = ours.argmax(-1) == reference.argmax(-1)
    nan = bool(ours.isnan().any() or reference.isnan().any())
    diff = (ours - reference)
    max_abs = float("nan") if nan else diff.abs().max().item()
    rel = float("nan") if nan else (diff.norm() / reference.norm()).item()
    return TokenCheck(clear=int(clear.sum()), agree=int((clear & agree).sum()), near_ties=int((~clear).sum()),
                      max_abs_diff=max_abs, rel_diff=rel)
