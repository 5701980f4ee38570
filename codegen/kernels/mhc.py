"""Host wrappers of the fused mHC kernels: check the inputs, allocate the outputs, pick the launch, and hand each
kernel launch to a launcher.

hc_pre, hc_post, hc_post_pre, hc_head and hc_post_head take `[N, n, D]` streams (codegen/cuda_impls.py
flattens the ops' leading dims); their PyTorch twins, same signatures and math, are in
codegen/mhc_reference.py. A boundary is two launches (plain hc_post: the first alone), described by
`mix_partials_launch` and `collapse_launch` as `KernelLaunch`es of the kernels in
codegen/kernels/mhc_kernels.py, with the launch given (`launch`) or chosen by `launch_choice`
(codegen/kernels/mhc_launch.py: `mhc_launch`, the tuned one, by default; runtime/batch_invariant.py's block
passes `batch_invariant_launch`). The launcher (codegen/kernels/launcher.py) runs them: Triton's JIT by
default, an artifact's ahead-of-time binaries in the runtime, a spec recorder for ahead-of-time builds
(codegen/aot.py).

The GPU-only paths (PDL, inline PTX, bf16 tensor-core products) are asked for only on non-cpu tensors
(`_on_gpu`): Triton's CPU interpreter runs none of them correctly; meta tensors (ahead-of-time builds) and
cuda take them all.
"""

from __future__ import annotations

import functools

import torch

from dsv4c.codegen.kernels.launcher import JIT, KernelLaunch
from dsv4c.codegen.kernels.mhc_kernels import _collapse_kernel, _mix_partials_kernel
from dsv4c.codegen.kernels.mhc_launch import (MIN_DOT, LaunchChoice, MhcLaunch, cdiv, mhc_launch,
                                              next_power_of_2)
from dsv4c.codegen.targets import Target, target_for_device


def _check_streams(streams: torch.Tensor) -> tuple[int, int, int]:
    if streams.dim() != 3 or not streams.is_floating_point():
        raise ValueError(f"streams must be a float [N, n, D] tensor, got {streams.dtype} {tuple(streams.shape)}")
    return tuple(streams.shape)


def _check_mix_params(fn, base, scale, norm_weight, rows: int, hc: int, hidden: int, scales: int) -> None:
    expected = {"fn": (rows, hc * hidden), "base": (rows,), "scale": (scales,), "norm_weight": (hidden,)}
    for name, tensor in (("fn", fn), ("base", base), ("scale", scale), ("norm_weight", norm_weight)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(tensor.shape)}")
    if fn.dtype != torch.float32:
        raise ValueError(f"fn must be float32 (the model keeps mHC weights in fp32), got {fn.dtype}")


@functools.lru_cache(maxsize=None)
def _device_target(device: torch.device) -> Target:
    return target_for_device(device)


def _launch_for(streams: torch.Tensor, launch: MhcLaunch | None, launch_choice: LaunchChoice) -> MhcLaunch:
    n_tokens, _, hidden = streams.shape
    launch = launch or launch_choice(_device_target(streams.device), n_tokens, hidden, streams.shape[1])
    launch.check(hidden)
    return launch


def _outputs(out, make):
    return out if out is not None else make()


def _m_pad(rows: int) -> int:
    """Columns of a token's partials: the `rows` mixes, sum(x^2), padding to a power of two (>= 16 for dots)."""
    return max(MIN_DOT, next_power_of_2(rows + 1))


def mix_workspace(n_tokens: int, rows: int, launch: MhcLaunch, device) -> torch.Tensor:
    """The split-K partials `[N, split_k, M_PAD]` fp32: each split's `x @ fn.T` (`rows` columns) and its
    sum(x^2) (column `rows`; zero where the collapse sums the squares, `collapse_sums_squares`)."""
    return torch.empty((n_tokens, launch.split_k, _m_pad(rows)), dtype=torch.float32, device=device)


def _options(warps: int, stages: int, pdl: bool) -> dict:
    """Triton's launch options; launch_pdl only where set (the interpreter takes no such option)."""
    return {"num_warps": warps, "num_stages": stages, **({"launch_pdl": True} if pdl else {})}


def _on_gpu(tensor: torch.Tensor) -> bool:
    """Whether a launch over `tensor` may take the GPU-only paths: PDL (a CUDA launch attribute), inline PTX
    and bf16 tl.dot (which Triton's CPU interpreter gets wrong). cpu tensors (the interpreter) take none;
    meta (ahead-of-time builds) and cuda take them all."""
    return tensor.device.type != "cpu"


def _check_partials(partials: torch.Tensor, n_tokens: int, rows: int, launch: MhcLaunch) -> None:
    """The kernels index the partials by their own constants: the buffer must be `mix_workspace`'s shape."""
    expected = (n_tokens, launch.split_k, _m_pad(rows))
    if tuple(partials.shape) != expected or partials.dtype != torch.float32 or not partials.is_contiguous():
        raise ValueError(f"partials must be a contiguous float32 {expected} tensor (mix_workspace), got "
                         f"{partials.dtype} {tuple(partials.shape)}")


def mix_partials_launch(x, post_mix_inputs, fn, partials, launch: MhcLaunch, hc: int) -> KernelLaunch:
    """The split-K kernel (`_mix_partials_kernel`). x: streams [N, n, D], or with `post_mix_inputs` =
    (streams, post, comb, new_streams) the block output [N, D] (hc_post is computed on the way, and written
    unless the collapse writes it, `launch.collapse_stores_new`). fn None: hc_post alone, no partials (and
    no dependent collapse)."""
    n_tokens, hidden = x.shape[0], x.shape[-1]
    s, p, c, new = post_mix_inputs if post_mix_inputs is not None else (x, x, x, x)
    mix = fn is not None
    if mix:
        _check_partials(partials, n_tokens, fn.shape[0], launch)
    args = dict(x_ptr=x, s_ptr=s, post_ptr=p, comb_ptr=c, new_ptr=new, fn_ptr=fn if mix else x,
                part_ptr=partials if mix else x, N=n_tokens, M=fn.shape[0] if mix else 0)
    constexprs = dict(D=hidden, HC=hc, HC_PAD=next_power_of_2(hc), M_PAD=_m_pad(fn.shape[0] if mix else 1),
                      BLOCK_T=launch.block_t, BLOCK_D=launch.block_d, CHUNKS=launch.chunks, SPLIT=launch.split_k,
                      POST=post_mix_inputs is not None,
                      STORE_NEW=post_mix_inputs is not None and not (mix and launch.collapse_stores_new), MIX=mix,
                      SQ=not (mix and post_mix_inputs is not None and launch.collapse_sums_squares), DOT=launch.dot,
                      PRECISION=launch.precision, PDL=launch.pdl and mix and _on_gpu(x),
                      WAIT=launch.split_k_pdl and _on_gpu(x),
                      BF16_X=(new if post_mix_inputs is not None else x).dtype == torch.bfloat16 and _on_gpu(x),
                      OPAQUE=_on_gpu(x))
    return KernelLaunch(_mix_partials_kernel, (cdiv(n_tokens, launch.block_t), launch.split_k), args,
                        constexprs, _options(launch.num_warps, launch.num_stages, constexprs["WAIT"]))


def collapse_launch(streams, post_mix_inputs, partials, base, scale, norm_weight, normed, post, comb, rms_eps,
                    hc_eps, iters: int, launch: MhcLaunch) -> KernelLaunch:
    """The collapse kernel (`_collapse_kernel`) over `streams` [N, n, D]; with `post_mix_inputs` = (block_out,
    streams, post, comb, new) it recomputes the new streams from those instead (and writes them to `new` with
    `launch.collapse_stores_new`). post and comb None: hc_head (pre only)."""
    n_tokens, hc, hidden = streams.shape
    _check_partials(partials, n_tokens, base.shape[0], launch)
    head = post is None
    x, s, p, c, new = post_mix_inputs if post_mix_inputs is not None else (streams,) * 5
    args = dict(x_ptr=x, s_ptr=s, post_in_ptr=p, comb_in_ptr=c, new_ptr=new, part_ptr=partials, base_ptr=base,
                scale_ptr=scale, norm_w_ptr=norm_weight, normed_ptr=normed, post_ptr=normed if head else post,
                comb_ptr=normed if head else comb, N=n_tokens, M=base.shape[0], rms_eps=float(rms_eps),
                hc_eps=float(hc_eps))
    own_sq = post_mix_inputs is not None and launch.collapse_sums_squares
    constexprs = dict(D=hidden, HC=hc, HC_PAD=next_power_of_2(hc), M_PAD=_m_pad(base.shape[0]),
                      SPLIT=launch.split_k, SPLIT_PAD=next_power_of_2(launch.split_k), ITERS=int(iters),
                      BLOCK_T=launch.collapse_t, BLOCK_D=next_power_of_2(hidden), HEAD=head,
                      POST=post_mix_inputs is not None,
                      STORE_NEW=post_mix_inputs is not None and launch.collapse_stores_new,
                      NEW_SPLIT=hc // 2 if own_sq and not head else hc, OWN_SQ=own_sq,
                      FAST=launch.fast_reciprocal and not head and _on_gpu(streams),
                      PDL=launch.pdl and _on_gpu(streams), OPAQUE=_on_gpu(streams))
    grid = (cdiv(n_tokens, launch.collapse_t), 1 if head else 2)
    return KernelLaunch(_collapse_kernel, grid, args, constexprs,
                        _options(launch.collapse_warps, 1, constexprs["PDL"]))


def _check_new_streams(new: torch.Tensor, normed: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    """The collapse rebuilds the new streams from hc_post's inputs while the split-K kernel builds them too,
    and either may write them: `new` may not share memory with an input, and both kernels round to one
    dtype (the streams')."""
    if new.device.type != "meta" and any(new.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                                         for x in inputs):
        raise ValueError("out: the new streams may not share memory with block_out, streams, post or comb")
    if new.dtype != inputs[1].dtype or normed.dtype != inputs[1].dtype:
        raise ValueError(f"out: new streams and normed must have the streams' dtype {inputs[1].dtype}, got "
                         f"{new.dtype} / {normed.dtype}")


def _mixes_and_collapse(x, streams, post_inputs, new, fn, base, scale, norm_weight, rms_eps, hc_eps, iters,
                        launch: MhcLaunch | None, launch_choice: LaunchChoice, normed, post, comb, launcher):
    """Both launches of one boundary. `post_inputs` = (streams, post, comb) with hc_post (x: block output,
    `new` the new streams, written by the split-K kernel or the collapse); None otherwise (x: the streams)."""
    if post_inputs is not None:
        _check_new_streams(new, normed, (x, *post_inputs))
    lc = _launch_for(streams, launch, launch_choice)
    partials = mix_workspace(streams.shape[0], fn.shape[0], lc, streams.device)
    mix_in = (*post_inputs, new) if post_inputs is not None else None
    launcher(mix_partials_launch(x, mix_in, fn, partials, lc, streams.shape[1]))
    launcher(collapse_launch(streams, (x, *post_inputs, new) if post_inputs is not None else None, partials, base,
                             scale, norm_weight, normed, post, comb, rms_eps, hc_eps, iters, lc))


def _new_pre_outputs(streams: torch.Tensor):
    n_tokens, hc, hidden = streams.shape
    return (torch.empty((n_tokens, hidden), dtype=streams.dtype, device=streams.device),
            torch.empty((n_tokens, hc), dtype=torch.float32, device=streams.device),
            torch.empty((n_tokens, hc, hc), dtype=torch.float32, device=streams.device))


def hc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           norm_weight: torch.Tensor, rms_eps: float, hc_eps: float, iters: int, *,
           launch: MhcLaunch | None = None, launch_choice: LaunchChoice = mhc_launch, out=None,
           launcher=JIT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed [N, D] in streams' dtype, post [N, n] fp32, comb [N, n, n] fp32); see mhc_reference.hc_pre.
    `out`: optional (normed, post, comb) to write into. `launcher`: codegen/kernels/launcher.py. `launch`, or
    `launch_choice` where none is given: the launch (module docstring); the same keywords on every wrapper."""
    _, hc, hidden = _check_streams(streams)
    _check_mix_params(fn, base, scale, norm_weight, (2 + hc) * hc, hc, hidden, 3)
    streams = streams.contiguous()
    normed, post, comb = _outputs(out, lambda: _new_pre_outputs(streams))
    _mixes_and_collapse(streams, streams, None, None, fn.contiguous(), base.float(), scale.float(),
                        norm_weight.contiguous(), rms_eps, hc_eps, iters, launch, launch_choice, normed, post, comb,
                        launcher)
    return normed, post, comb


def _post_inputs(block_out, streams, post, comb):
    n_tokens, hc, hidden = _check_streams(streams)
    if tuple(block_out.shape) != (n_tokens, hidden):
        raise ValueError(f"block_out must be [N, D] = {(n_tokens, hidden)}, got {tuple(block_out.shape)}")
    if tuple(post.shape) != (n_tokens, hc) or tuple(comb.shape) != (n_tokens, hc, hc):
        raise ValueError(f"post/comb must be [N, n] / [N, n, n], got {tuple(post.shape)} / {tuple(comb.shape)}")
    return block_out.contiguous(), streams.contiguous(), post.float().contiguous(), comb.float().contiguous()


def hc_post(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, *,
            launch: MhcLaunch | None = None, launch_choice: LaunchChoice = mhc_launch,
            out: torch.Tensor | None = None, launcher=JIT) -> torch.Tensor:
    """New streams [N, n, D] in streams' dtype; see mhc_reference.hc_post."""
    block_out, streams, post, comb = _post_inputs(block_out, streams, post, comb)
    new = _outputs(out, lambda: torch.empty_like(streams))
    launcher(mix_partials_launch(block_out, (streams, post, comb, new), None, None,
                                 _launch_for(streams, launch, launch_choice), streams.shape[1]))
    return new


def hc_post_pre(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
                rms_eps: float, hc_eps: float, iters: int, *, launch: MhcLaunch | None = None,
                launch_choice: LaunchChoice = mhc_launch, out=None,
                launcher=JIT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(new streams, normed, post_next, comb_next); see mhc_reference.hc_post_pre.
    `out`: optional (new_streams, normed, post_next, comb_next) to write into."""
    block_out, streams, post, comb = _post_inputs(block_out, streams, post, comb)
    _, hc, hidden = streams.shape
    _check_mix_params(fn, base, scale, norm_weight, (2 + hc) * hc, hc, hidden, 3)
    new, normed, post_next, comb_next = _outputs(out, lambda: (torch.empty_like(streams),
                                                               *_new_pre_outputs(streams)))
    _mixes_and_collapse(block_out, streams, (streams, post, comb), new, fn.contiguous(), base.float(),
                        scale.float(), norm_weight.contiguous(), rms_eps, hc_eps, iters, launch, launch_choice, normed,
                        post_next, comb_next, launcher)
    return new, normed, post_next, comb_next


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            norm_weight: torch.Tensor, rms_eps: float, hc_eps: float, *, launch: MhcLaunch | None = None,
            launch_choice: LaunchChoice = mhc_launch, out: torch.Tensor | None = None, launcher=JIT) -> torch.Tensor:
    """normed [N, D] in streams' dtype; see mhc_reference.hc_head."""
    n_tokens, hc, hidden = _check_streams(streams)
    _check_mix_params(fn, base, scale, norm_weight, hc, hc, hidden, 1)
    streams = streams.contiguous()
    normed = _outputs(out, lambda: torch.empty((n_tokens, hidden), dtype=streams.dtype, device=streams.device))
    _mixes_and_collapse(streams, streams, None, None, fn.contiguous(), base.float(), scale.float(),
                        norm_weight.contiguous(), rms_eps, hc_eps, 1, launch, launch_choice, normed, None, None,
                        launcher)
    return normed


def hc_post_head(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                 fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
                 rms_eps: float, hc_eps: float, *, launch: MhcLaunch | None = None,
                 launch_choice: LaunchChoice = mhc_launch, out=None,
                 launcher=JIT) -> tuple[torch.Tensor, torch.Tensor]:
    """(new streams, normed): the last layer's hc_post fused with hc_head; see mhc_reference.hc_post_head."""
    block_out, streams, post, comb = _post_inputs(block_out, streams, post, comb)
    n_tokens, hc, hidden = streams.shape
    _check_mix_params(fn, base, scale, norm_weight, hc, hc, hidden, 1)
    new, normed = _outputs(out, lambda: (torch.empty_like(streams), torch.empty(
        (n_tokens, hidden), dtype=streams.dtype, device=streams.device)))
    _mixes_and_collapse(block_out, streams, (streams, post, comb), new, fn.contiguous(), base.float(),
                        scale.float(), norm_weight.contiguous(), rms_eps, hc_eps, 1, launch, launch_choice, normed,
                        None, None, launcher)
    return new, normed
