"""One MoE layer in the release format and a call of `dsv4c::moe_fp4` on it, for tests/test_moe_fp4*.py.

The layer: tiny widened to D = 256 (two 128-column blocks), E = 8 routed experts of width 128, top 3, its
router (bf16), its selection bias or hash table, MXFP4 routed experts and the FP8 shared expert, built so that
every token selects expert EVERY and none selects NONE (a hash table built so, or a bias of +-1000). Score-
routed calls keep only rows whose k-th and (k+1)-th biased scores are MARGIN apart: random weights make near
ties common, and a selection is compared only where it is not decided by the last bits of an fp32 sum.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import torch

from dsv4c.codegen import moe_routing
from dsv4c.codegen.moe_fp4 import reference
from dsv4c.codegen.moe_routing import Routing
from dsv4c.model import layers, quant
from dsv4c.model.presets import tiny

CFG = tiny().replace(hidden_size=256, moe_intermediate_size=128, num_experts_per_tok=3)
D, I, E, K = CFG.hidden_size, CFG.moe_intermediate_size, CFG.n_routed_experts, CFG.num_experts_per_tok
ROUTING = Routing.of_model(CFG)
EVERY, NONE = 0, E - 1  # the expert every token selects, the one none does
ROUTED_LIMIT, SHARED_LIMIT = 2.0, 1.5
PREFIX = "ffn."
MARGIN = 1e-3  # least gap between a kept row's k-th and (k+1)-th biased score (fp32 sums err by ~1e-6 here)


def gen_for(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any() and not want.isnan().any(), "NaN never passes"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def layer_weights(gen: torch.Generator, hash_layer: bool, inter: int = I) -> dict[str, torch.Tensor]:
    """Router, routed experts (MXFP4) and shared expert (FP8) of width `inter`, by checkpoint name under
    PREFIX; routed so that every token selects EVERY and none NONE."""
    w = {f"{PREFIX}gate.weight": (torch.randn(E, D, generator=gen) * D ** -0.5).to(torch.bfloat16)}
    if hash_layer:
        others = torch.stack([torch.randperm(NONE - 1, generator=gen)[:K - 1] + 1 for _ in range(CFG.vocab_size)])
        w[f"{PREFIX}gate.tid2eid"] = torch.cat((torch.full((CFG.vocab_size, 1), EVERY), others), 1).to(torch.int32)
    else:
        bias = torch.randn(E, generator=gen) * 0.1
        bias[EVERY], bias[NONE] = 1e3, -1e3
        w[f"{PREFIX}gate.bias"] = bias
    for e in range(E):
        for name, (rows, cols) in (("w1", (inter, D)), ("w3", (inter, D)), ("w2", (D, inter))):
            packed, scale = quant.quantize_fp4_weight(torch.randn(rows, cols, generator=gen) * cols ** -0.5)
            w[f"{PREFIX}experts.{e}.{name}.weight"], w[f"{PREFIX}experts.{e}.{name}.scale"] = packed, scale
    for name, (rows, cols) in (("w1", (inter, D)), ("w3", (inter, D)), ("w2", (D, inter))):
        packed, scale = quant.quantize_fp8_weight(torch.randn(rows, cols, generator=gen) * cols ** -0.5)
        w[f"{PREFIX}shared_experts.{name}.weight"], w[f"{PREFIX}shared_experts.{name}.scale"] = packed, scale
    return w


def op_operands(w: dict[str, torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """(the six routed lists w1, s1, w3, s3, w2, s2; the shared expert's six tensors) of `layer_weights`."""
    suffixes = ("w1.weight", "w1.scale", "w3.weight", "w3.scale", "w2.weight", "w2.scale")
    lists = [[w[f"{PREFIX}experts.{e}.{s}"] for e in range(E)] for s in suffixes]
    return lists, [w[f"{PREFIX}shared_experts.{s}"] for s in suffixes]


def decoded(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's weights as the model multiplies them (exact fp32 decodes)."""
    out = {}
    for name, value in w.items():
        if name.endswith(".scale"):
            continue
        scale = w.get(name[:-len("weight")] + "scale")
        if scale is None:
            out[name] = value
        elif value.dtype == torch.int8:
            out[name] = quant.dequant_fp4_weight(value, scale)
        else:
            out[name] = quant.dequant_fp8_weight(value, scale)
    return out


class Call(NamedTuple):
    """The op's operands on x [N, D]: routing (router, bias or table and token ids) and experts."""

    x: torch.Tensor
    router: torch.Tensor
    bias: torch.Tensor | None
    table: torch.Tensor | None
    tokens: torch.Tensor | None
    lists: list[list[torch.Tensor]]
    shared: list[torch.Tensor]

    def rows(self, start: int, stop: int) -> "Call":
        """The same layer on rows start .. stop of x (and their token ids)."""
        tokens = self.tokens[start:stop] if self.tokens is not None else None
        return self._replace(x=self.x[start:stop], tokens=tokens)

    def routing_operands(self) -> tuple:
        return self.x, self.router, self.bias, self.table, self.tokens

    def route(self, routing: Routing = ROUTING) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference routing (codegen/moe_routing.py, the model's ops)."""
        return moe_routing.route(*self.routing_operands(), routing)

    def reference(self, activations: str, shared_act_quant: bool, routing: Routing = ROUTING) -> torch.Tensor:
        return reference(*self.routing_operands(), *self.lists, self.shared, routing.top_k, routing.scoring,
                         routing.normalize, routing.scale, ROUTED_LIMIT, SHARED_LIMIT, activations,
                         shared_act_quant)


def selection_gaps(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Per row: the k-th largest biased score minus the (k+1)-th, as the reference computes them."""
    biased = layers.router_scores(x, router, routing.scoring) + bias.float()
    top = biased.topk(routing.top_k + 1, dim=-1).values
    return top[:, -2] - top[:, -1]


def layer_call(key: str, tokens: int, hash_layer: bool, dtype: torch.dtype, inter: int = I,
               scale: float = 3.0) -> Call:
    """A call on `tokens` random rows (times `scale`) and token ids; score-routed: rows with clear margins."""
    gen = gen_for(key, tokens, hash_layer, str(dtype))
    w = layer_weights(gen, hash_layer, inter)
    router, bias = w[f"{PREFIX}gate.weight"], w.get(f"{PREFIX}gate.bias")
    x = (torch.randn(4 * tokens, D, generator=gen) * scale).to(dtype)
    if not hash_layer:
        x = x[selection_gaps(x, router, bias, ROUTING) > MARGIN]
        assert len(x) >= tokens, "too few rows with clear selection margins"
    token_ids = torch.randint(0, CFG.vocab_size, (tokens,), generator=gen) if hash_layer else None
    lists, shared = op_operands(w)
    return Call(x[:tokens].contiguous(), router, bias, w.get(f"{PREFIX}gate.tid2eid"), token_ids, lists, shared)
