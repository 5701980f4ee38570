"""The fused mHC Triton kernels (codegen/kernels/mhc_kernels.py, run through the host wrappers of
codegen/kernels/mhc.py) against their PyTorch twins (codegen/mhc_reference.py), and the launch heuristics
(codegen/kernels/mhc_launch.py, pure Python: checked in this process).

The kernels run under Triton's CPU interpreter in one child process (the `mhc` fixture), which sets
TRITON_INTERPRET=1 before it imports Triton: Triton decides at import and decoration time whether its
functions (tl.sum included) are interpreted, so setting it here would change Triton for every later test of
the session. This process never imports the kernels; it draws the inputs, runs the reference and compares.

Every case draws fresh random inputs, fills the outputs with NaN before the kernel runs (so an element the
kernel fails to write fails the check), and compares with these tolerances:
- fp32 outputs (post, comb; and everything with fp32 streams): rtol 1e-5, atol 1e-5 -- fp32 arithmetic in
  another order (split-K sums, fused multiply-adds);
- bf16 outputs (block inputs, new streams): rtol 1e-2, atol 1e-2 -- an fp32 difference may flip a bf16
  rounding, one ulp being 2^-8 relative; the kernels round to nearest even as torch does.
hc_post_pre / hc_post_head check their second half against the reference run on their own new streams
(see _check_post_then_pre).
"""

import dataclasses
import importlib.util
import os
import zlib

import pytest
from child_pool import child_pool
import torch

from dsv4c.codegen import mhc_reference as ref
from dsv4c.codegen.kernels.mhc_launch import MhcLaunch, mhc_launch
from dsv4c.codegen.targets import target

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

RMS_EPS, HC_EPS = 1e-6, 1e-6
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
FP32_TOL = TOL[torch.float32]
# (tokens, hidden): T = 1, 7, 64, 257 with hidden sizes that are not powers of two (masked tails), the Flash
# hidden size at one token only: the interpreter's time grows with tokens x hidden.
SHAPES = [(1, 4096), (7, 200), (64, 96), (257, 72)]
DTYPES = [torch.float32, torch.bfloat16]


# ---- the interpreter process ----------------------------------------------------------------------------
def _kernel_module():
    import dsv4c.codegen.kernels.mhc as module

    return module


def _run_op(name, args, kwargs):
    return getattr(_kernel_module(), name)(*args, **kwargs)


def _wrong_partials_message(launch):
    """The error a launch gives for a partials buffer that is not mix_workspace's shape."""
    try:
        _kernel_module().mix_partials_launch(torch.randn(2, 4, 32), None, torch.randn(24, 128),
                                             torch.empty(2, launch.split_k, 24), launch, 4)
    except ValueError as error:
        return str(error)
    return "no error"


class _Interpreter:
    """Calls into the child process: `mhc.hc_pre(...)` runs the kernel wrapper there and returns its outputs."""

    def __init__(self, pool):
        self.pool = pool

    def call(self, fn, *args):
        return self.pool.submit(fn, *args).result()

    def __getattr__(self, name):
        if not name.startswith("hc_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.call(_run_op, name, args, kwargs)


def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _ptx_facts(target_name, tokens):
    """The tuned launch's split-K kernel (the one outside runtime/batch_invariant.py's block) built for a GPU."""
    from dsv4c.codegen import aot
    from dsv4c.codegen.kernels.mhc_launch import mhc_launch

    t = target(target_name)
    spec = next(spec for spec in aot.mhc_specs(t, ["hc_post_pre"], [tokens], 4096, 4, 20, torch.bfloat16,
                                               launch_choice=mhc_launch)
                if spec.kernel == "_mix_partials_kernel")
    ptx = aot.compile_spec(t, spec).asm["ptx"]
    return [line for line in ptx.splitlines() if line.startswith(".target")], {
        op: op in ptx for op in ("wgmma", "tcgen05.mma", "mma.sync", "fma.rn.f32")}


@pytest.fixture(scope="module")
def compiler():
    with child_pool(_start_compiler) as pool:
        yield pool


@pytest.fixture(scope="module")
def mhc(interpreter_pool):
    return _Interpreter(interpreter_pool)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))  # str hashes change every run


def _randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _streams(gen, tokens, hc, hidden, dtype):
    per_stream = torch.rand(1, hc, 1, generator=gen) * 2 + 0.25  # streams of different magnitudes
    return (torch.randn(tokens, hc, hidden, generator=gen) * per_stream).to(dtype)


def _mix_params(gen, rows, hc, hidden, dtype, scales):
    """fn, base, scale, norm_weight, scaled so the logits are O(1) like a trained model's."""
    fn = _randn(gen, rows, hc * hidden, scale=2.0 / (hc * hidden) ** 0.5)
    return (fn, _randn(gen, rows, scale=0.5), torch.rand(scales, generator=gen) + 0.5,
            (torch.rand(hidden, generator=gen) + 0.5).to(dtype))


def _post_inputs(gen, tokens, hc, hidden, dtype):
    """block_out, streams, post, comb as hc_pre of the previous sub-layer would give them."""
    streams = _streams(gen, tokens, hc, hidden, dtype)
    _, post, comb = ref.hc_pre(streams, *_mix_params(gen, (2 + hc) * hc, hc, hidden, dtype, 3), RMS_EPS, HC_EPS, 20)
    return _randn(gen, tokens, hidden, dtype=dtype), streams, post, comb


def _poisoned(*tensors):
    return tuple(torch.full_like(t, float("nan")) for t in tensors)


def _check(got, expected, tol):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert not got.isnan().any(), "an output element was not written (or is NaN)"
    torch.testing.assert_close(got, expected, **tol)


def _check_post_then_pre(got, args, dtype, head=False):
    """hc_post_pre / hc_post_head: the new streams against the reference hc_post, then the rest against the
    reference hc_pre / hc_head of the kernel's own new streams. With bf16 streams an fp32 difference in the
    post mix may round one element of the new streams to the neighbouring bf16 value, which moves the next
    mixes by ~1e-4 at these small hidden sizes: that is the rounding of the model, not an error of the kernel,
    so the rest is also compared with the full reference at 1e-3."""
    new, *rest = got
    _check(new, ref.hc_post(*args[:4]), TOL[dtype])
    expected = (ref.hc_head(new, *args[4:]),) if head else ref.hc_pre(new, *args[4:])
    for g, e in zip(rest, expected):
        _check(g, e, TOL[dtype] if g.dtype == dtype else FP32_TOL)
    full = ref.hc_post_head(*args)[1:] if head else ref.hc_post_pre(*args)[1:]
    for g, e in zip(rest, full):
        _check(g, e, TOL[dtype] if g.dtype == dtype else dict(rtol=1e-3, atol=1e-3))


@pytest.mark.parametrize("tokens, hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_pre(mhc, tokens, hidden, dtype):
    gen, hc = _gen("pre", tokens, hidden, str(dtype)), 4
    streams = _streams(gen, tokens, hc, hidden, dtype)
    args = (streams, *_mix_params(gen, (2 + hc) * hc, hc, hidden, dtype, 3), RMS_EPS, HC_EPS, 20)
    expected = ref.hc_pre(*args)
    got = mhc.hc_pre(*args, out=_poisoned(*expected))
    for g, e in zip(got, expected):
        _check(g, e, TOL[dtype] if g.dtype == dtype else FP32_TOL)


@pytest.mark.parametrize("tokens, hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_post(mhc, tokens, hidden, dtype):
    gen = _gen("post", tokens, hidden, str(dtype))
    inputs = _post_inputs(gen, tokens, 4, hidden, dtype)
    expected = ref.hc_post(*inputs)
    _check(mhc.hc_post(*inputs, out=_poisoned(expected)[0]), expected, TOL[dtype])


def test_a_nan_stays_nan_whatever_its_bits(mhc):
    """A NaN whose low bits are set (0x7FFFFFFF: the NaN a GPU's arithmetic makes of any NaN operand; Triton's
    interpreter keeps an operand's bits) in one token's post weight makes that token's new stream NaN in every
    column, as the reference's; rounding it to bf16 by adding to its bits would carry it into -0, and the
    runtime's non-finite check would then see nothing wrong."""
    gen = _gen("nan")
    block_out, streams, post, comb = _post_inputs(gen, 3, 4, 72, torch.bfloat16)
    post = post.clone()
    post[1, 2] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    expected = ref.hc_post(block_out, streams, post, comb)
    got = mhc.hc_post(block_out, streams, post, comb, out=torch.zeros_like(expected))
    assert expected[1, 2].isnan().all() and got[1, 2].isnan().all()
    mask = torch.ones_like(got, dtype=torch.bool)
    mask[1, 2] = False
    torch.testing.assert_close(got[mask], expected[mask], **TOL[torch.bfloat16])


@pytest.mark.parametrize("tokens, hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_post_pre(mhc, tokens, hidden, dtype):
    gen, hc = _gen("post_pre", tokens, hidden, str(dtype)), 4
    args = (*_post_inputs(gen, tokens, hc, hidden, dtype), *_mix_params(gen, (2 + hc) * hc, hc, hidden, dtype, 3),
            RMS_EPS, HC_EPS, 20)
    _check_post_then_pre(mhc.hc_post_pre(*args, out=_poisoned(*ref.hc_post_pre(*args))), args, dtype)


@pytest.mark.parametrize("tokens, hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_head(mhc, tokens, hidden, dtype):
    gen, hc = _gen("head", tokens, hidden, str(dtype)), 4
    args = (_streams(gen, tokens, hc, hidden, dtype), *_mix_params(gen, hc, hc, hidden, dtype, 1), RMS_EPS, HC_EPS)
    expected = ref.hc_head(*args)
    _check(mhc.hc_head(*args, out=_poisoned(expected)[0]), expected, TOL[dtype])


@pytest.mark.parametrize("hc, tokens, hidden", [(3, 5, 72), (2, 1, 96)])
def test_other_stream_counts(mhc, hc, tokens, hidden):
    """n != 4 streams take the tile form of the Sinkhorn (n = 4 is unrolled entry by entry): hc_pre and
    hc_post_pre against the reference, fp32."""
    gen, dtype = _gen("streams", hc, tokens, hidden), torch.float32
    args = (_streams(gen, tokens, hc, hidden, dtype), *_mix_params(gen, (2 + hc) * hc, hc, hidden, dtype, 3),
            RMS_EPS, HC_EPS, 20)
    expected = ref.hc_pre(*args)
    for g, e in zip(mhc.hc_pre(*args, out=_poisoned(*expected)), expected):
        _check(g, e, FP32_TOL)
    args = (*_post_inputs(gen, tokens, hc, hidden, dtype), *_mix_params(gen, (2 + hc) * hc, hc, hidden, dtype, 3),
            RMS_EPS, HC_EPS, 20)
    _check_post_then_pre(mhc.hc_post_pre(*args, out=_poisoned(*ref.hc_post_pre(*args))), args, dtype)


@pytest.mark.parametrize("tokens, hidden", [(1, 200), (64, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_post_head(mhc, tokens, hidden, dtype):
    gen, hc = _gen("post_head", tokens, hidden, str(dtype)), 4
    args = (*_post_inputs(gen, tokens, hc, hidden, dtype), *_mix_params(gen, hc, hc, hidden, dtype, 1),
            RMS_EPS, HC_EPS)
    _check_post_then_pre(mhc.hc_post_head(*args, out=_poisoned(*ref.hc_post_head(*args))), args, dtype, head=True)


@pytest.mark.parametrize("hc, iters", [(3, 1), (2, 7), (8, 20)])
def test_other_stream_counts_and_iterations(mhc, hc, iters):
    """n not a power of two (padded lanes masked), one Sinkhorn iteration, more streams than Flash."""
    tokens, hidden, dtype = 5, 72, torch.bfloat16
    gen = _gen("hc", hc, iters)
    args = (*_post_inputs(gen, tokens, hc, hidden, dtype), *_mix_params(gen, (2 + hc) * hc, hc, hidden, dtype, 3),
            RMS_EPS, HC_EPS, iters)
    _check_post_then_pre(mhc.hc_post_pre(*args, out=_poisoned(*ref.hc_post_pre(*args))), args, dtype)


@pytest.mark.parametrize("name, tokens, dot", [("h100", 3, False), ("b200", 20, True)])
def test_gpu_launch_heuristics_under_the_interpreter(mhc, name, tokens, dot):
    """The GPU launches (one token per collapse program, GPU-sized splits; broadcast products for a few
    tokens, tl.dot beyond) compute the same function."""
    hidden, hc, dtype = 200, 4, torch.bfloat16
    gen = _gen("gpu-launch", name)
    launch = mhc_launch(target(name), tokens, hidden)
    assert launch.collapse_t == 1 and launch.split_k > 1 and launch.dot == dot
    assert launch.collapse_stores_new  # from 3 tokens the collapse program writes the new streams
    args = (*_post_inputs(gen, tokens, hc, hidden, dtype), *_mix_params(gen, (2 + hc) * hc, hc, hidden, dtype, 3),
            RMS_EPS, HC_EPS, 20)
    _check_post_then_pre(mhc.hc_post_pre(*args, launch=launch, out=_poisoned(*ref.hc_post_pre(*args))), args,
                         dtype)


@pytest.mark.parametrize("collapse_stores_new, collapse_sums_squares, hc",
                         [(False, False, 4), (True, False, 4), (False, True, 4), (True, True, 4), (True, True, 3)])
def test_either_kernel_may_write_the_new_streams_and_sum_their_squares(mhc, collapse_stores_new,
                                                                       collapse_sums_squares, hc):
    """hc_post_pre and hc_post_head with the new streams written, and the RMS scale of the next mixes taken
    from them, by the split-K kernel or by the collapse programs (which rebuild them from the same inputs,
    each writing half of them when both sum the squares; n = 3 splits them around a padded lane): the same
    outputs, none left unwritten."""
    tokens, hidden, dtype = 7, 200, torch.bfloat16
    gen = _gen("stores-new", collapse_stores_new, collapse_sums_squares, hc)
    launch = dataclasses.replace(mhc_launch(target("cpu"), tokens, hidden), collapse_stores_new=collapse_stores_new,
                                 collapse_sums_squares=collapse_sums_squares)
    post_inputs = _post_inputs(gen, tokens, hc, hidden, dtype)
    args = (*post_inputs, *_mix_params(gen, (2 + hc) * hc, hc, hidden, dtype, 3), RMS_EPS, HC_EPS, 20)
    _check_post_then_pre(mhc.hc_post_pre(*args, launch=launch, out=_poisoned(*ref.hc_post_pre(*args))), args,
                         dtype)
    args = (*post_inputs, *_mix_params(gen, hc, hc, hidden, dtype, 1), RMS_EPS, HC_EPS)
    _check_post_then_pre(mhc.hc_post_head(*args, launch=launch, out=_poisoned(*ref.hc_post_head(*args))), args,
                         dtype, head=True)


def _with_recorded_choice(name, args, out):
    """In the child: wrapper `name` with a launch choice that notes what it is asked, then picks
    `batch_invariant_launch`: (its outputs, [(target, tokens, hidden, hc)] asked)."""
    from dsv4c.codegen.kernels.mhc_launch import batch_invariant_launch

    asked = []

    def choice(t, tokens, hidden, hc):
        asked.append((t.name, tokens, hidden, hc))
        return batch_invariant_launch(t, tokens, hidden, hc)
    return getattr(_kernel_module(), name)(*args, launch_choice=choice, out=out), asked


def test_wrappers_launch_by_the_launch_choice_given(mhc):
    """hc_post and hc_post_head (the wrappers runtime/batch_invariant.py's block does not register) with a launch
    choice: asked once for the boundary's sizes, and its launch (the batch-invariant one, above 8 tokens) gives
    the reference's outputs, bf16 streams."""
    tokens, hidden, hc, dtype = 9, 200, 4, torch.bfloat16
    gen = _gen("launch-choice")
    post_inputs = _post_inputs(gen, tokens, hc, hidden, dtype)
    expected = ref.hc_post(*post_inputs)
    got, asked = mhc.call(_with_recorded_choice, "hc_post", post_inputs, _poisoned(expected)[0])
    assert asked == [("cpu", tokens, hidden, hc)]
    _check(got, expected, TOL[dtype])
    args = (*post_inputs, *_mix_params(gen, hc, hc, hidden, dtype, 1), RMS_EPS, HC_EPS)
    got, asked = mhc.call(_with_recorded_choice, "hc_post_head", args, _poisoned(*ref.hc_post_head(*args)))
    assert asked == [("cpu", tokens, hidden, hc)]
    _check_post_then_pre(got, args, dtype, head=True)


def test_launch_heuristics_cover_every_column():
    for name in ("cpu", "h100", "b200", "gb300"):
        for tokens in (1, 7, 8, 64, 65, 256, 1024):
            for hidden in (16, 96, 200, 4096, 7168):
                launch = mhc_launch(target(name), tokens, hidden)
                launch.check(hidden)
                assert (launch.split_k - 1) * launch.chunks * launch.block_d < hidden, "an empty split"
    gpu = mhc_launch(target("h100"), 1, 4096)
    # one token: the fn read spread over about every SM (128 one-chunk programs at Flash's D = 4096 timed
    # faster than 64 or 32 on an H100, BENCHMARKS.md)
    assert gpu.split_k >= target("h100").sm_count - 4 and gpu.chunks == 1 and gpu.collapse_t == 1


def test_launch_is_built_with_named_fields_and_validated():
    fields = dict(block_t=16, block_d=64, chunks=1, split_k=1, num_warps=4, num_stages=1, collapse_t=1,
                  collapse_warps=4, dot=True)
    with pytest.raises(TypeError, match="positional"):
        MhcLaunch(*fields.values())
    with pytest.raises(ValueError, match="power of two"):
        MhcLaunch(**{**fields, "block_t": 24})
    with pytest.raises(ValueError, match="precision must be 'ieee' or 'tf32x3'"):
        MhcLaunch(**fields, precision="tf32")
    with pytest.raises(ValueError, match="covers 64 < D=96"):
        MhcLaunch(**fields).check(96)


def test_wrappers_refuse_a_wrong_workspace_or_weights(mhc):
    streams = torch.randn(2, 4, 32)
    # the kernels index the partials by their own constants (24 mixes + sum(x^2), padded to 32 columns)
    message = mhc.call(_wrong_partials_message, mhc_launch(target("cpu"), 2, 32))
    assert "partials must be a contiguous float32 (2, " in message
    assert ", 32) tensor (mix_workspace), got torch.float32 (2, " in message
    with pytest.raises(ValueError, match="fn must have shape"):
        mhc.hc_pre(streams, torch.randn(24, 64), torch.randn(24), torch.ones(3), torch.ones(32), 1e-6, 1e-6, 20)


def _triton_functions():
    """In the child: TRITON_INTERPRET as set there and, for every Triton function of the kernel modules,
    whether Triton made it an interpreted one."""
    import sys

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    _kernel_module()
    found = {f"{name}.{attr}": isinstance(value, InterpretedFunction)
             for name, module in list(sys.modules.items()) if name.startswith("dsv4c.codegen.kernels.")
             for attr, value in vars(module).items() if isinstance(value, (InterpretedFunction, JITFunction))}
    return os.environ.get("TRITON_INTERPRET"), found


def test_the_child_interprets_every_kernel(mhc):
    """Triton decides at import whether it interprets: the child set TRITON_INTERPRET=1 before importing it, so
    every Triton function of the kernel modules there is an interpreted one. (This process may hold Triton:
    torch imports it on the first call of any custom op, when torch._dynamo checks for the package.)"""
    flag, functions = mhc.call(_triton_functions)
    assert flag == "1" and functions and all(functions.values()), functions


@pytest.mark.parametrize("name, tokens, arch, product", [
    ("h100", 64, "sm_90a", "wgmma"), ("b200", 64, "sm_100a", "tcgen05.mma"), ("h100", 1, "sm_90a", "fma.rn.f32")])
def test_kernels_build_for_gpu_targets(compiler, name, tokens, arch, product):
    """Built for Hopper and Blackwell without a GPU (Blackwell code is never run here): the PTX targets the
    arch and multiplies as the launch says (tf32x3 on the tensor cores from 9 tokens, FMA below)."""
    targets, products = compiler.submit(_ptx_facts, name, tokens).result()
    assert targets == [f".target {arch}"]
    assert products[product], products
