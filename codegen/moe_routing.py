"""The routing of a MoE layer, as `dsv4c::moe_fp4` computes it: which experts each token uses, with what weight.

model/layers.py `route` with its inputs explicit (no weight dict, no config), for x [N, D]:
    logits  = x.float() @ router.float().T                                 [N, E] fp32
    scores  = sqrt(softplus(logits)) | sigmoid(logits) | softmax(logits)   (`scoring`, the config's scoring_func)
    ids     = table[tokens]                        hash layers: the token id's row of the table [V, k]
            | topk(scores + bias.float(), k)       score-routed layers: the bias only selects
    weights = scores.gather(-1, ids), divided by their sum when `normalize`, times `scale`
`route` below is that math in the model's own ops, in its order (`layers.router_scores` itself for the
scores), so the op's reference computes what a captured graph computes, bit for bit. The model normalises
when `norm_topk_prob` and its scoring is not softmax; `Routing.of_model` says so once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4c.model import layers
from dsv4c.model.config import ModelConfig

SCORINGS = ("sqrtsoftplus", "sigmoid", "softmax")


@dataclass(frozen=True)
class Routing:
    """top_k: experts a token selects (the table's width for hash layers); scoring: one of SCORINGS;
    normalize: divide the selected scores by their sum; scale: the routed scaling factor."""

    top_k: int
    scoring: str
    normalize: bool
    scale: float

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.scoring not in SCORINGS:
            raise ValueError(f"moe routing: top_k {self.top_k} (>= 1), scoring {self.scoring!r} "
                             f"(allowed: {', '.join(SCORINGS)})")

    @staticmethod
    def of_model(cfg: ModelConfig) -> "Routing":
        """The routing model/layers.py `route` does for `cfg`."""
        return Routing(cfg.num_experts_per_tok, cfg.scoring_func,
                       cfg.norm_topk_prob and cfg.scoring_func != "softmax", float(cfg.routed_scaling_factor))


def check(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
          tokens: torch.Tensor | None, routing: Routing, experts: int) -> None:
    """Shapes and dtypes (host metadata only): router [E, D] floating; exactly one of bias [E] (score routing)
    and table [V, top_k] integer (hash routing); tokens, integer ids of x's rows, with the table only."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if router.dim() != 2 or tuple(router.shape) != (experts, x.shape[-1]) or not router.dtype.is_floating_point:
        raise ValueError(f"moe_fp4: router {tuple(router.shape)} {router.dtype}; expected floating "
                         f"[{experts}, {x.shape[-1]}] (the experts by x's width)")
    if (bias is None) == (table is None):
        raise ValueError("moe_fp4: routing needs exactly one of bias (score-routed layers) and table (hash layers)")
    if bias is not None and (tuple(bias.shape) != (experts,) or not bias.dtype.is_floating_point):
        raise ValueError(f"moe_fp4: bias {tuple(bias.shape)} {bias.dtype}; expected floating [{experts}]")
    if table is not None and (table.dim() != 2 or table.shape[1] != routing.top_k or table.dtype.is_floating_point
                              or tokens is None or tokens.dtype.is_floating_point or tokens.numel() != rows):
        raise ValueError(f"moe_fp4: hash routing needs an integer table [V, {routing.top_k}] and the {rows} "
                         f"integer token ids of x's rows; got table {tuple(table.shape)} {table.dtype}, tokens "
                         f"{None if tokens is None else (tuple(tokens.shape), tokens.dtype)}")
    if table is None and tokens is not None:
        raise ValueError("moe_fp4: tokens are read by hash routing only (a table); score routing takes none")
    if routing.top_k > experts:
        raise ValueError(f"moe_fp4: top_k {routing.top_k} of {experts} experts")


def route(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
          tokens: torch.Tensor | None, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [N, k], weights fp32 [N, k]) of x [N, D]: the module docstring's math in the model's ops."""
    scores = layers.router_scores(x, router, routing.scoring)
    if table is not None:
        ids = table[tokens.reshape(-1)].long()
    else:
        ids = (scores + bias.float()).topk(routing.top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if routing.normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * routing.scale
