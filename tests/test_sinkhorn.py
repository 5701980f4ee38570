"""The Sinkhorn iteration count of mHC (`hc_sinkhorn_iters` = 20): every PyTorch path against the float64 spec
(tests/mhc_spec.py, section 2 of the architecture doc) on comb logits far from doubly stochastic, where one
iteration more or less moves comb by ~3e-3 relative (asserted here: the inputs can show an off-by-one).

Paths: model/layers.py `sinkhorn` and `hc_pre` (the model, with the config's count), codegen/mhc_reference.py
`hc_pre` and `hc_post_pre` (the fused ops' twins) and the registered `dsv4c::hc_pre` op. The Triton kernels
are checked on the same inputs in test_mhc_cuda_wrappers.py.
Tolerance: relative norm error 1e-5 against float64 (fp32 arithmetic; measured ~6e-8).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import mhc_spec as spec
from dsv4c.codegen import mhc_reference
from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops)
from dsv4c.model import layers
from dsv4c.model.presets import tiny

TOL = 1e-5
N, HIDDEN, TOKENS = 4, 64, 6


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN never passes"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def inputs(name: str) -> dict[str, torch.Tensor]:
    """Fresh inputs each run (a per-test seed drawn from the global generator)."""
    seed = zlib.crc32(name.encode()) ^ int(torch.randint(0, 2**31, ()))
    return spec.slow_sinkhorn_inputs(torch.Generator().manual_seed(seed), (TOKENS,), N, HIDDEN)


def test_the_inputs_show_one_iteration_more_or_less():
    x = inputs("sensitivity")
    logits = spec.comb_logits(x["streams"], x["fn"], x["base"], x["scale"], spec.RMS_EPS)
    want = spec.sinkhorn(logits, spec.ITERS, spec.HC_EPS)
    for iters in (spec.ITERS - 1, spec.ITERS + 1):
        assert rel_err(spec.sinkhorn(logits, iters, spec.HC_EPS), want) > 100 * TOL, iters


def test_model_sinkhorn_matches_the_spec():
    x = inputs("sinkhorn")
    logits = spec.comb_logits(x["streams"], x["fn"], x["base"], x["scale"], spec.RMS_EPS)
    got = layers.sinkhorn(logits.float(), spec.ITERS, spec.HC_EPS)
    assert rel_err(got, spec.sinkhorn(logits, spec.ITERS, spec.HC_EPS)) <= TOL


def test_model_hc_pre_uses_the_configured_count():
    cfg = tiny()
    assert (cfg.hc_sinkhorn_iters, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps) == (spec.ITERS, N, spec.HC_EPS,
                                                                                  spec.RMS_EPS)
    x = inputs("hc_pre")
    block, post, comb = layers.hc_pre(x["streams"], x["fn"], x["base"], x["scale"], cfg)
    want_block, want_post, want_comb = spec.hc_pre(x["streams"], x["fn"], x["base"], x["scale"], spec.RMS_EPS,
                                                   spec.HC_EPS, spec.ITERS)
    assert rel_err(comb, want_comb) <= TOL
    assert rel_err(post, want_post) <= TOL and rel_err(block, want_block) <= TOL


@pytest.mark.parametrize("implementation", ["mhc_reference", "dsv4c::hc_pre"])
def test_fused_hc_pre_matches_the_spec(implementation):
    x = inputs(implementation)
    fn = mhc_reference.hc_pre if implementation == "mhc_reference" else torch.ops.dsv4c.hc_pre
    normed, post, comb = fn(x["streams"], x["fn"], x["base"], x["scale"], x["norm_weight"], spec.RMS_EPS,
                            spec.HC_EPS, spec.ITERS)
    block, want_post, want_comb = spec.hc_pre(x["streams"], x["fn"], x["base"], x["scale"], spec.RMS_EPS,
                                              spec.HC_EPS, spec.ITERS)
    assert rel_err(comb, want_comb) <= TOL and rel_err(post, want_post) <= TOL
    assert rel_err(normed, spec.rms_norm(block, x["norm_weight"], spec.RMS_EPS)) <= TOL


def test_fused_hc_post_pre_matches_the_spec():
    """The next sub-layer's pre runs on the new streams: its comb goes through the same Sinkhorn."""
    x = inputs("hc_post_pre")
    gen = torch.Generator().manual_seed(1)
    block_out, post_in = torch.randn(TOKENS, HIDDEN, generator=gen), torch.rand(TOKENS, N, generator=gen) * 2
    comb_in = spec.sinkhorn(torch.randn(TOKENS, N, N, generator=gen), spec.ITERS, spec.HC_EPS).float()
    new, normed, post, comb = mhc_reference.hc_post_pre(block_out, x["streams"], post_in, comb_in, x["fn"], x["base"],
                                                        x["scale"], x["norm_weight"], spec.RMS_EPS, spec.HC_EPS,
                                                        spec.ITERS)
    want_new = spec.hc_post(block_out, x["streams"], post_in, comb_in)
    block, want_post, want_comb = spec.hc_pre(want_new, x["fn"], x["base"], x["scale"], spec.RMS_EPS, spec.HC_EPS,
                                              spec.ITERS)
    assert rel_err(new, want_new) <= TOL
    assert rel_err(comb, want_comb) <= TOL and rel_err(post, want_post) <= TOL
    assert rel_err(normed, spec.rms_norm(block, x["norm_weight"], spec.RMS_EPS)) <= TOL
