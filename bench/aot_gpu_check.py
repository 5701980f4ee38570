"""GPU check of the ahead-of-time mHC kernels: compile tiny for h100 on the GPU machine, load the artifact on
cuda and on cpu, generate 8 greedy tokens for two prompts on each and compare; then each mHC op on CUDA (the
Triton kernels) against the CPU reference. Run there: `python3 bench/aot_gpu_check.py` (writes /tmp/ck, /tmp/art).
"""
import shutil
import time

import torch
torch.set_num_threads(8)
from dsv4c.compiler.numerics import Numerics
from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.compiler.presets import tiny
from dsv4c.compiler.checkpoint import write_synthetic
from dsv4c.runtime.loader import load
from dsv4c.runtime.artifact import load_artifact
import triton
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
t0 = time.time()
shutil.rmtree("/tmp/ck", ignore_errors=True); shutil.rmtree("/tmp/art", ignore_errors=True)
write_synthetic(tiny(), "/tmp/ck", seed=3)
opts = CompileOptions(targets=("h100",), numerics=Numerics.plain(torch.float32), max_seq_len=64, prefill_chunk=2, mtp=False)
compile_checkpoint("/tmp/ck", "/tmp/art", opts, progress=lambda m: print(round(time.time() - t0, 1), m, flush=True))
man = load_artifact("/tmp/art").manifest
print("kernels:", {k: len(v) for k, v in man["kernels"].items()}, "built with triton", man["versions"]["triton"], flush=True)
prompts = [[5, 7, 11, 13, 17], [3, 1, 4]]
out = {}
for dev in ("cuda", "cpu"):
    eng = load("/tmp/art", device=dev)
    t1 = time.time()
    try:
        out[dev] = eng.generate(prompts, 8).tokens
    except Exception as e:
        import traceback; traceback.print_exc(limit=3); out[dev] = repr(e)[:300]
    if dev == "cuda":
        torch.cuda.synchronize()
    print(dev, "tokens", out[dev], "in", round(time.time() - t1, 2), "s", flush=True)
print("MATCH" if out["cuda"] == out["cpu"] else "MISMATCH", flush=True)
# the ops on CUDA go through the Triton kernels: compare to the CPU reference on random inputs
from dsv4c.codegen import ops, cuda_impls
g = torch.Generator().manual_seed(0)
n, d = 4, 128
s = torch.randn(2, 3, n, d, generator=g)
fn, base = torch.randn((2 + n) * n, n * d, generator=g) * 0.1, torch.randn((2 + n) * n, generator=g)
sc, w = torch.rand(3, generator=g), torch.rand(d, generator=g)
args = (fn, base, sc, w, 1e-6, 1e-6, 20)
ref = torch.ops.dsv4c.hc_pre(s, *args)
got = torch.ops.dsv4c.hc_pre(s.cuda(), *[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
print("kernel module:", cuda_impls._kernels().__name__)
print("hc_pre max err", max(float((a.cpu() - b).abs().max()) for a, b in zip(got, ref)))
cu = lambda xs: [x.cuda() if isinstance(x, torch.Tensor) else x for x in xs]
o, p, c = torch.randn(2, 3, d, generator=g), torch.rand(2, 3, n, generator=g), torch.rand(2, 3, n, n, generator=g)
for name, a in (("hc_post", (o, s, p, c)), ("hc_post_pre", (o, s, p, c, *args)), ("hc_head", (s, fn[:n], base[:n], sc[:1], w, 1e-6, 1e-6))):
    r = getattr(torch.ops.dsv4c, name)(*a); k = getattr(torch.ops.dsv4c, name)(*cu(a))
    r, k = (r,) if isinstance(r, torch.Tensor) else r, (k,) if isinstance(k, torch.Tensor) else k
    print(name, "max err", max(float((x.cpu() - y).abs().max()) for x, y in zip(k, r)), "on", k[0].device)
