"""The mHC ops' CUDA implementations (codegen/cuda_impls.py: flatten any leading dims, launch the Triton kernels,
reshape back) against the float64 spec (tests/mhc_spec.py), with the kernels run by Triton's interpreter.

The implementations run in a spawned child that sets TRITON_INTERPRET=1 before it imports Triton (see
test_mhc_kernels.py); the interpreter runs the kernels on CPU tensors. Inputs have two leading dims and
comb logits far from doubly stochastic, so a wrong flattening or a Sinkhorn iteration more or less in the
kernels fails (one iteration moves comb by ~3e-3 relative: test_sinkhorn.py).
Tolerance: relative norm error 1e-5 against float64 (fp32 inputs, fp32 arithmetic in the kernels).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mhc_spec as spec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

TOL = 1e-5
LEAD, N, HIDDEN = (2, 3), 4, 48


def _run(name: str, args: tuple):
    """In the child: the CUDA implementation `name` on CPU tensors, its kernels interpreted."""
    from dsv4c.codegen import cuda_impls

    return cuda_impls.IMPLS[name](*args)


@pytest.fixture(scope="module")
def child(interpreter_pool):
    return interpreter_pool


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN never passes"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture
def x() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))  # fresh each run
    inputs = spec.slow_sinkhorn_inputs(gen, LEAD, N, HIDDEN)
    inputs["block_out"] = torch.randn(*LEAD, HIDDEN, generator=gen)
    inputs["post"] = torch.rand(*LEAD, N, generator=gen) * 2
    inputs["comb"] = torch.rand(*LEAD, N, N, generator=gen) / N
    return inputs


def mix_args(x) -> tuple:
    return x["fn"], x["base"], x["scale"], x["norm_weight"], spec.RMS_EPS, spec.HC_EPS


def check_pre(got, streams, x) -> None:
    """(normed, post, comb) of the pre that runs on `streams` (float64), shapes with the leading dims."""
    normed, post, comb = got
    block, want_post, want_comb = spec.hc_pre(streams, x["fn"], x["base"], x["scale"], spec.RMS_EPS, spec.HC_EPS,
                                              spec.ITERS)
    assert normed.shape == (*LEAD, HIDDEN) and post.shape == (*LEAD, N) and comb.shape == (*LEAD, N, N)
    assert rel_err(comb, want_comb) <= TOL and rel_err(post, want_post) <= TOL
    assert rel_err(normed, spec.rms_norm(block, x["norm_weight"], spec.RMS_EPS)) <= TOL


def test_hc_pre(child, x):
    got = child.submit(_run, "hc_pre", (x["streams"], *mix_args(x), spec.ITERS)).result()
    check_pre(got, x["streams"].double(), x)


def test_hc_post(child, x):
    got = child.submit(_run, "hc_post", (x["block_out"], x["streams"], x["post"], x["comb"])).result()
    assert got.shape == x["streams"].shape
    assert rel_err(got, spec.hc_post(x["block_out"], x["streams"], x["post"], x["comb"])) <= TOL


def test_hc_post_pre(child, x):
    args = (x["block_out"], x["streams"], x["post"], x["comb"], *mix_args(x), spec.ITERS)
    new, *pre = child.submit(_run, "hc_post_pre", args).result()
    want_new = spec.hc_post(x["block_out"], x["streams"], x["post"], x["comb"])
    assert new.shape == x["streams"].shape and rel_err(new, want_new) <= TOL
    check_pre(pre, want_new, x)


def test_hc_head(child, x):
    head = (x["fn"][:N], x["base"][:N], x["scale"][:1], x["norm_weight"], spec.RMS_EPS, spec.HC_EPS)
    got = child.submit(_run, "hc_head", (x["streams"], *head)).result()
    want = spec.rms_norm(spec.hc_head(x["streams"], *head[:3], spec.RMS_EPS, spec.HC_EPS), x["norm_weight"],
                         spec.RMS_EPS)
    assert got.shape == (*LEAD, HIDDEN) and rel_err(got, want) <= TOL
