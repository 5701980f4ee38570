"""The SwiGLU clamps of spec section 4: `silu(clamp(w1 x, max=limit)) * clamp(w3 x, -limit, limit)` in every
routed expert and, as `Numerics.shared_expert_clamp` says, in the shared expert.

Synthetic weights never reach the limit (their largest gate/up is ~5 against swiglu_limit 10), so here the
MoE weights are drawn so that gate and up exceed the limit on a good part of the elements (asserted), and
model/layers.py `moe` is compared with a float64 implementation of section 4 written here. One of the two
expert kinds is silenced in each test (its w2 zero) so that each clamp is checked on its own.
Tolerance: relative norm error 1e-5 against float64 (fp32 arithmetic, plain numerics); leaving a clamp out
moves the output by far more (asserted on the float64 side).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv4c.model import layers
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny

TOL = 1e-5
# Every expert selected (top-k = all): no near-tie in the selection can differ between fp32 and float64.
CFG = tiny().replace(num_experts_per_tok=tiny().n_routed_experts)
NUM = Numerics.plain(torch.float32)
TOKENS = 16
PROJECTION_STD = 12.0  # of gate and up: |value| > 10 on ~40% of the elements


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN never passes"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def expert(gen: torch.Generator, silent: bool) -> dict[str, torch.Tensor]:
    """w1, w3 giving gate and up of std PROJECTION_STD on unit inputs; w2 zero when `silent`."""
    d, i = CFG.hidden_size, CFG.moe_intermediate_size
    w = {f"w{k}.weight": torch.randn(i, d, generator=gen) * PROJECTION_STD / d ** 0.5 for k in (1, 3)}
    w["w2.weight"] = torch.zeros(d, i) if silent else torch.randn(d, i, generator=gen) / i ** 0.5
    return w


def moe_weights(silent: str) -> dict[str, torch.Tensor]:
    """A score-routed MoE layer (prefix "") whose `silent` kind ("routed" or "shared") contributes zero."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))  # fresh each run
    w = {"gate.weight": torch.randn(CFG.n_routed_experts, CFG.hidden_size, generator=gen) * 0.1,
         "gate.bias": torch.zeros(CFG.n_routed_experts)}
    for e in range(CFG.n_routed_experts):
        w.update({f"experts.{e}.{k}": v for k, v in expert(gen, silent == "routed").items()})
    w.update({f"shared_experts.{k}": v for k, v in expert(gen, silent == "shared").items()})
    return w


def swiglu(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, clamp: bool) -> torch.Tensor:
    """Section 4's expert in float64, without the routing weight."""
    gate, up = x @ w[prefix + "w1.weight"].double().T, x @ w[prefix + "w3.weight"].double().T
    if clamp:
        gate, up = gate.clamp(max=CFG.swiglu_limit), up.clamp(-CFG.swiglu_limit, CFG.swiglu_limit)
    return (F.silu(gate) * up) @ w[prefix + "w2.weight"].double().T


def spec_moe(x: torch.Tensor, w: dict[str, torch.Tensor], routed_clamp: bool, shared_clamp: bool) -> torch.Tensor:
    """Section 4 in float64 with every expert selected: weights `s / sum(s) * routed_scaling_factor`,
    s = sqrt(softplus(x @ W_g.T)); the shared expert added unweighted."""
    x = x.double()
    scores = torch.sqrt(F.softplus(x @ w["gate.weight"].double().T))
    weights = scores / scores.sum(-1, keepdim=True) * CFG.routed_scaling_factor
    out = swiglu(x, w, "shared_experts.", shared_clamp)
    for e in range(CFG.n_routed_experts):
        out = out + weights[:, e:e + 1] * swiglu(x, w, f"experts.{e}.", routed_clamp)
    return out


def beyond_the_limit(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> tuple[float, float]:
    """Fractions of gate elements above the limit and of up elements outside [-limit, limit]."""
    gate, up = x @ w[prefix + "w1.weight"].T, x @ w[prefix + "w3.weight"].T
    return (gate > CFG.swiglu_limit).float().mean().item(), (up.abs() > CFG.swiglu_limit).float().mean().item()


def run_moe(x, w, num, compiled: bool) -> torch.Tensor:
    """`layers.moe` eagerly (only selected experts run) or traced by Dynamo (every expert on every token)."""
    def step(x, tokens, w):
        return layers.moe(x, tokens, w, "", CFG, False, num)

    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, backend="eager", fullgraph=True)
    return step(x, torch.zeros(x.shape[0], dtype=torch.long), w)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "dynamo"])
def test_routed_experts_are_clamped(compiled):
    w, x = moe_weights(silent="shared"), torch.randn(TOKENS, CFG.hidden_size)
    for e in range(CFG.n_routed_experts):
        assert min(beyond_the_limit(x, w, f"experts.{e}.")) > 0.1
    want = spec_moe(x, w, routed_clamp=True, shared_clamp=True)
    assert rel_err(spec_moe(x, w, routed_clamp=False, shared_clamp=True), want) > 100 * TOL
    assert rel_err(run_moe(x, w, NUM, compiled), want) <= TOL


@pytest.mark.parametrize("clamp", [True, False], ids=["clamped", "unclamped"])
def test_shared_expert_clamp_follows_the_switch(clamp):
    """DeepSeek's code clamps the shared expert (the default); `shared_expert_clamp=False` leaves it out."""
    w, x = moe_weights(silent="routed"), torch.randn(TOKENS, CFG.hidden_size)
    assert min(beyond_the_limit(x, w, "shared_experts.")) > 0.1
    want = spec_moe(x, w, routed_clamp=True, shared_clamp=clamp)
    assert rel_err(spec_moe(x, w, routed_clamp=True, shared_clamp=not clamp), want) > 100 * TOL
    assert Numerics().shared_expert_clamp and NUM.shared_expert_clamp
    assert rel_err(run_moe(x, w, NUM.replace(shared_expert_clamp=clamp), compiled=False), want) <= TOL
